"""The durable transcript outbox, and the durable transcription point.

SQLite in the state directory. A final is committed here before it is
published and deleted only after the broker's PUBACK, so a broker outage, a
crash or a SIGKILL loses nothing: what is still here is published again on
the next start.

Identity. Every outbox belongs to a *stream*: a random id made when the
outbox is created. `seq` counts the stream's finals, and the pair
(`stream_id`, `seq`) names one transcript forever: a final delivered twice
(at-least-once) comes with the same pair. A new outbox (a new SD card, a
purge, a quarantined file) starts a new stream, so a consumer that drops
pairs it has seen never drops a new transcript.

The transcription point. Stream time (samples) continues across restarts
within a stream. `transcribed` is the stream position up to which audio is
transcribed; it is committed in the same transaction as the final that
moves it, and the spool deletes audio only behind the point on disk. On
start, replay begins exactly there: whatever the moment of a crash, a final
is either published once or again with the same `seq`.

Syncs. A new final is committed with a full sync: losing it would lose
words. Its removal after the PUBACK is not synced: the write-ahead log keeps
it through a crash, and a power cut can at worst bring back a final already
delivered, with the same `seq`. The point alone (an empty final) is synced
only when spooled audio behind it is about to be deleted.

Storage failures. Disk full, read-only, unwritable or corrupt: the outbox
keeps working in memory (a bounded queue), reports to `StorageHealth`, and
moves what memory holds back to disk when `retry()` succeeds. A corrupt
file is quarantined (renamed aside) and its readable rows salvaged.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edged.storage import (
    CORRUPT,
    StorageHealth,
    condition_of,
    fsync_directory,
    make_directory,
    quarantine,
)
from edged.untrusted import loggable

log = logging.getLogger("edged.outbox")

STORE = "outbox"
MEMORY_ITEMS = 500  # finals held in memory while the disk fails (~1 KB each)
_SALVAGE_PROBES = 100_000  # row ids tried in a damaged file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_key ON outbox (stream, seq);
CREATE TABLE IF NOT EXISTS stream (
    id TEXT NOT NULL, last_seq INTEGER NOT NULL, transcribed INTEGER NOT NULL,
    dropped INTEGER NOT NULL
);
"""

Key = tuple[str, int]  # (stream id, seq): one transcript, forever


@dataclass(frozen=True)
class OutboxItem:
    stream: str
    seq: int
    payload: bytes

    @property
    def key(self) -> Key:
        return (self.stream, self.seq)


@dataclass(frozen=True)
class StreamInfo:
    """What an outbox says about its stream (also read from a damaged one)."""

    id: str
    last_seq: int
    transcribed: int
    dropped: int


class _Corrupt(sqlite3.DatabaseError):
    sqlite_errorcode = 11


def new_stream_id() -> str:
    return uuid.uuid4().hex


class Outbox:
    def __init__(self, path: Path, health: StorageHealth | None = None,
                 max_items: int = 10_000, memory_items: int = MEMORY_ITEMS):
        self.path = path
        self.health = health or StorageHealth()
        self.max_items = max_items
        self.memory_items = memory_items
        self._db: sqlite3.Connection | None = None
        self._memory: deque[OutboxItem] = deque()  # committed nowhere but here
        self._removed_while_degraded: set[Key] = set()  # delivered, still in the file
        self._also_on_disk: set[Key] = set()  # in memory, read from a read-only file
        self._disk_depth = 0
        self.dropped = 0  # transcripts dropped from a full outbox, ever
        self.durable_transcribed = 0  # the point as the disk has it
        # A stream whose outbox was lost (quarantined): its id and point, when
        # they could be read, so its spooled audio is not transcribed twice.
        self.previous_stream: StreamInfo | None = None
        info = self._open_or_degrade()
        self.stream_id = info.id
        self.last_seq = info.last_seq
        self.transcribed = info.transcribed
        self.dropped = info.dropped

    # -- opening -----------------------------------------------------------------

    def _open_or_degrade(self) -> StreamInfo:
        try:
            return self._open()
        except (sqlite3.Error, OSError) as error:
            self._close_db()
            if condition_of(error) == CORRUPT:
                return self._replace_corrupt(str(error))
            self.health.failed(STORE, error, "open", self.path.parent)
            return self._read_only_view()

    def _open(self) -> StreamInfo:
        make_directory(self.path.parent)
        # A directory (or anything else) where the file should be: put it aside.
        if (self.path.exists() and not self.path.is_file()
                and quarantine(self.path, "not_a_file") is None):
            raise IsADirectoryError(21, "not a file", str(self.path))
        created = not self.path.exists()
        if not created and not _has_sqlite_header(self.path):
            # Before SQLite touches it: a connection that fails on a garbled
            # header deletes the -wal as it closes, and the finals in it with it.
            raise _Corrupt("not an SQLite file (garbled header)")
        db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # The default 2 MB page cache fills as a broker outage fills the
        # outbox; 256 KB keeps memory flat and costs no measurable CPU.
        db.execute("PRAGMA cache_size=-256")
        check = db.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise _Corrupt(f"quick_check: {check[0] if check else 'no answer'}")
        info = self._schema(db)
        if created:
            fsync_directory(self.path.parent)  # the file itself survives a power cut
        self._disk_depth = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.durable_transcribed = info.transcribed
        return info

    def _schema(self, db: sqlite3.Connection) -> StreamInfo:
        """Create or migrate the tables; returns the stream."""
        db.execute("PRAGMA synchronous=FULL")
        with db:
            db.execute("BEGIN IMMEDIATE")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            legacy = "meta" in tables  # version 1: seq as the key, no stream
            if legacy:
                db.execute("ALTER TABLE outbox RENAME TO outbox_v1")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT id, last_seq, transcribed, dropped FROM stream").fetchone()
            if row is None:
                last_seq = dropped = 0
                if legacy:
                    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                    last_seq, dropped = int(meta.get("last_seq", 0)), int(meta.get("dropped", 0))
                    db.execute("INSERT INTO outbox (stream, seq, payload) "
                               "SELECT '', seq, payload FROM outbox_v1 ORDER BY seq")
                info = StreamInfo(new_stream_id(), last_seq, 0, dropped)
                db.execute("INSERT INTO stream VALUES (?, ?, ?, ?)",
                           (info.id, info.last_seq, info.transcribed, info.dropped))
                log.info("outbox.new_stream stream_id=%s", info.id)
            else:
                info = StreamInfo(str(row[0]), int(row[1]), int(row[2]), int(row[3]))
            if legacy:
                db.execute("DROP TABLE outbox_v1")
                db.execute("DROP TABLE meta")
        return info

    def _replace_corrupt(self, why: str) -> StreamInfo:
        """Quarantine a damaged outbox, start a new stream, keep what it still holds."""
        salvaged, previous = _salvage(self.path)
        moved = quarantine(self.path, f"corrupt: {why}")
        for suffix in ("-wal", "-shm"):
            companion = self.path.with_name(self.path.name + suffix)
            if moved is not None and companion.exists():
                companion.rename(moved.with_name(moved.name + suffix))
        self.previous_stream = previous
        self._disk_depth = 0  # those rows are in the quarantined file now
        if moved is None:
            self.health.failed(STORE, _Corrupt(why), "open")
            return StreamInfo(new_stream_id(), 0, 0, 0)
        try:
            info = self._open()
        except (sqlite3.Error, OSError) as error:
            self._close_db()
            self.health.failed(STORE, error, "open", self.path.parent)
            self._memory.extend(salvaged[-self.memory_items:])
            return StreamInfo(new_stream_id(), 0, 0, previous.dropped if previous else 0)
        if salvaged:
            self._write(lambda db: self._insert_all(db, salvaged))
            self._disk_depth += len(salvaged)
        log.warning("outbox.salvaged items=%d previous_stream=%s", len(salvaged),
                    loggable(previous.id) if previous else "unreadable")
        return info

    def _read_only_view(self) -> StreamInfo:
        try:
            return self._read_what_is_readable()
        except OSError:  # not even readable (a directory of another user)
            return StreamInfo(new_stream_id(), 0, 0, 0)

    def _read_what_is_readable(self) -> StreamInfo:
        """The disk cannot be written: carry on in memory, from what it still shows.

        Continuing its stream (not a new one) keeps one stream per device
        while a card is read-only; that is safe only when the view is
        current, which SQLite's read-only mode (WAL included) guarantees."""
        if not self.path.is_file():
            return StreamInfo(new_stream_id(), 0, 0, 0)
        row, rows = None, []
        wal = self.path.with_name(self.path.name + "-wal")
        # Without a write-ahead log (a clean stop checkpoints and removes it),
        # the file alone is current and may be read as immutable; with one,
        # only SQLite's read-only mode (which needs the -shm) sees the truth.
        modes = ["mode=ro"] + ([] if wal.exists() and wal.stat().st_size else ["immutable=1"])
        for mode in modes:
            try:
                db = sqlite3.connect(f"file:{self.path}?{mode}", uri=True)
                try:
                    row = db.execute(
                        "SELECT id, last_seq, transcribed, dropped FROM stream").fetchone()
                    rows = db.execute("SELECT stream, seq, payload FROM outbox ORDER BY id DESC "
                                      "LIMIT ?", (self.memory_items,)).fetchall()
                finally:
                    db.close()
                break
            except sqlite3.Error:
                continue
        if row is None:
            return StreamInfo(new_stream_id(), 0, 0, 0)
        loaded = [OutboxItem(str(s), int(q), bytes(p)) for s, q, p in reversed(rows)]
        self._memory.extend(loaded)
        self._also_on_disk.update(item.key for item in loaded)
        self.durable_transcribed = int(row[2])
        return StreamInfo(str(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    # -- writing -----------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._disk_depth + len(self._memory)

    @property
    def degraded(self) -> bool:
        return self.health.degraded(STORE)

    def add(self, render: Callable[[str, int], bytes], transcribed: int) -> OutboxItem:
        """Commit a new final and the transcription point it moves to.

        `render(stream_id, seq)` makes the payload. Never raises for the
        disk's sake: a final that cannot be committed is kept in memory."""
        seq = self.last_seq + 1
        item = OutboxItem(self.stream_id, seq, render(self.stream_id, seq))
        if self._db is not None and not self.degraded:
            try:
                self._write(lambda db: self._insert_new(db, item, transcribed))
            except (sqlite3.Error, OSError) as error:
                self._disk_failed(error, "write")
            else:
                self.last_seq, self.transcribed = seq, max(self.transcribed, transcribed)
                self.durable_transcribed = self.transcribed
                return item
        self._remember(item)
        self.last_seq, self.transcribed = seq, max(self.transcribed, transcribed)
        return item

    def _insert_new(self, db: sqlite3.Connection, item: OutboxItem, transcribed: int) -> None:
        db.execute("INSERT INTO outbox (stream, seq, payload) VALUES (?, ?, ?)",
                   (item.stream, item.seq, item.payload))
        db.execute("UPDATE stream SET last_seq = ?, transcribed = max(transcribed, ?)",
                   (item.seq, transcribed))
        depth = self._disk_depth + 1
        if depth > self.max_items:
            self._drop_oldest(db, depth - self.max_items)
        self._disk_depth = min(depth, self.max_items)

    def _drop_oldest(self, db: sqlite3.Connection, count: int) -> None:
        db.execute("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                   (count,))
        db.execute("UPDATE stream SET dropped = dropped + ?", (count,))
        self.dropped += count
        log.warning("outbox.full dropped=%d max_items=%d", count, self.max_items)

    def _remember(self, item: OutboxItem) -> None:
        self._memory.append(item)
        if len(self._memory) > self.memory_items:
            self._memory.popleft()
            self.dropped += 1
            log.warning("outbox.memory_full dropped=1 max_items=%d", self.memory_items)

    def mark_transcribed(self, point: int, durable: bool) -> None:
        """Audio before `point` is transcribed with nothing to publish (an empty
        final, a clean close). Written at once only when `durable` is asked
        for: when spooled audio behind it is about to be deleted."""
        if point <= self.transcribed:
            return
        self.transcribed = point
        if durable and self._db is not None and not self.degraded:
            try:
                self._write(lambda db: db.execute(
                    "UPDATE stream SET transcribed = max(transcribed, ?)", (point,)))
            except (sqlite3.Error, OSError) as error:
                self._disk_failed(error, "write")
            else:
                self.durable_transcribed = point

    def _write(self, work: Callable[[sqlite3.Connection], object], sync: bool = True) -> None:
        db = self._db
        assert db is not None
        db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
        depth = self._disk_depth
        try:
            with db:
                db.execute("BEGIN IMMEDIATE")
                work(db)
        except BaseException:
            self._disk_depth = depth  # a failed commit leaves the count as it was
            raise

    def _insert_all(self, db: sqlite3.Connection, items: list[OutboxItem]) -> None:
        for item in items:
            db.execute("INSERT OR IGNORE INTO outbox (stream, seq, payload) VALUES (?, ?, ?)",
                       (item.stream, item.seq, item.payload))

    def _disk_failed(self, error: BaseException, doing: str) -> None:
        if condition_of(error) == CORRUPT:
            # Damaged under us: quarantine, start a new stream, keep going.
            self._close_db()
            info = self._replace_corrupt(str(error))
            self.stream_id, self.last_seq = info.id, info.last_seq
            self.transcribed = max(self.transcribed, info.transcribed)
            return
        self.health.failed(STORE, error, doing, self.path.parent)

    # -- reading and removing ---------------------------------------------------------

    def pending(self, limit: int | None = None) -> list[OutboxItem]:
        """The oldest items waiting for delivery, disk first (they are older)."""
        items: list[OutboxItem] = []
        if self._db is not None and self._disk_depth:
            try:
                rows = self._db.execute(
                    "SELECT stream, seq, payload FROM outbox ORDER BY id LIMIT ?",
                    (-1 if limit is None else limit,)).fetchall()
            except sqlite3.Error as error:
                self._disk_failed(error, "read")
            else:
                items = [OutboxItem(str(s), int(q), bytes(p)) for s, q, p in rows
                         if (str(s), int(q)) not in self._removed_while_degraded]
        for item in self._memory:
            if limit is not None and len(items) >= limit:
                break
            items.append(item)
        return items

    def remove(self, key: Key) -> None:
        """The broker acknowledged this item."""
        for index, item in enumerate(self._memory):
            if item.key == key:
                del self._memory[index]
                if key in self._also_on_disk:
                    self._removed_while_degraded.add(key)
                return
        if self._db is None:
            return
        if self.degraded:
            self._removed_while_degraded.add(key)
            return
        try:
            self._db.execute("PRAGMA synchronous=NORMAL")  # see the module's note on syncs
            deleted = self._db.execute("DELETE FROM outbox WHERE stream = ? AND seq = ?",
                                       key).rowcount
        except sqlite3.Error as error:
            self._removed_while_degraded.add(key)
            self._disk_failed(error, "delete")
            return
        self._disk_depth -= deleted

    # -- getting back to disk --------------------------------------------------------

    def retry(self) -> bool:
        """Try the disk again; move what memory holds there. Whether it worked."""
        if not self.degraded and not self._memory:
            return True
        reopened = self._db is None
        try:
            if reopened:
                info = self._open()
                if info.id != self.stream_id:
                    log.info("outbox.adopted file_stream=%s stream_id=%s", loggable(info.id),
                             self.stream_id)
            self._write(self._move_memory_to_disk)
        except (sqlite3.Error, OSError) as error:
            if reopened:
                self._close_db()
            if condition_of(error) == CORRUPT:
                self._disk_failed(error, "retry")
            else:
                self.health.failed(STORE, error, "retry", self.path.parent)
            return False
        moved = len(self._memory)
        self._memory.clear()
        self._removed_while_degraded.clear()
        self._also_on_disk.clear()
        assert self._db is not None
        self._disk_depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.durable_transcribed = self.transcribed
        self.health.recovered(STORE)
        log.info("outbox.durable_again moved_from_memory=%d", moved)
        return True

    def _move_memory_to_disk(self, db: sqlite3.Connection) -> None:
        self._insert_all(db, list(self._memory))
        for key in self._removed_while_degraded:
            db.execute("DELETE FROM outbox WHERE stream = ? AND seq = ?", key)
        # This process's stream is the one that goes on, whatever the file had.
        db.execute("DELETE FROM stream")
        db.execute("INSERT INTO stream VALUES (?, ?, ?, ?)",
                   (self.stream_id, self.last_seq, self.transcribed, self.dropped))

    def close(self) -> None:
        if self._db is not None and not self.degraded:
            # The last point (empty finals, the clean close) for the next start.
            try:
                self._write(lambda db: db.execute(
                    "UPDATE stream SET transcribed = max(transcribed, ?)", (self.transcribed,)))
            except (sqlite3.Error, OSError) as error:
                self.health.failed(STORE, error, "close", self.path.parent)
        self._close_db()


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _has_sqlite_header(path: Path) -> bool:
    """Whether the file starts as an SQLite database does (an empty one too)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except OSError:
        return True  # unreadable: let SQLite say why
    return not head or head == _SQLITE_MAGIC


def _salvage(path: Path) -> tuple[list[OutboxItem], StreamInfo | None]:
    """What a damaged outbox still yields: its stream, and the rows readable one by one."""
    items: list[OutboxItem] = []
    previous: StreamInfo | None = None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return items, None
    try:
        try:
            row = db.execute("SELECT id, last_seq, transcribed, dropped FROM stream").fetchone()
            if row is not None:
                previous = StreamInfo(str(row[0]), int(row[1]), int(row[2]), int(row[3]))
        except sqlite3.Error:
            pass
        try:
            low, high = db.execute("SELECT min(id), max(id) FROM outbox").fetchone()
        except sqlite3.Error:
            low = high = None
        if low is None or high is None:
            return items, previous
        # One by one: a bad page costs the rows on it, not the rest.
        for rowid in range(int(low), min(int(high), int(low) + _SALVAGE_PROBES) + 1):
            try:
                found = db.execute("SELECT stream, seq, payload FROM outbox WHERE id = ?",
                                   (rowid,)).fetchone()
            except sqlite3.Error:
                continue
            if found is not None:
                items.append(OutboxItem(str(found[0]), int(found[1]), bytes(found[2])))
    finally:
        db.close()
    return items, previous
