"""The durable transcript outbox: SQLite in the state directory.

A final is committed here before it is published and deleted only after the
broker's PUBACK, so a broker outage, a crash or a SIGKILL loses nothing: what
is still here is published again on the next start. `seq` is assigned here,
in the same transaction, so it increases by one per final across restarts
and consumers can de-duplicate the at-least-once delivery.

Finals are rare (a few a minute), and audio never comes near this file. A
new final is committed with a full sync: losing it would lose words. Its
removal after the PUBACK is not synced: the write-ahead log keeps it through
a crash or SIGKILL, and a power cut can at worst bring back a final already
delivered, with the same `seq`, which is what at-least-once delivery allows.
That halves the syncs (SD card wear, and CPU) per final.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edged.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0), ('dropped', 0);
"""


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    payload: bytes


class Outbox:
    def __init__(self, path: Path, max_items: int = 10_000):
        self.path = path
        self.max_items = max_items
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self.depth = self._scalar("SELECT COUNT(*) FROM outbox")
        # Only this process writes the file: the counter lives in memory and
        # is saved with each new item.
        self.last_seq = self._scalar("SELECT value FROM meta WHERE key = 'last_seq'")
        # Transcripts dropped from a full outbox, ever (kept across restarts).
        self.dropped = self._scalar("SELECT value FROM meta WHERE key = 'dropped'")

    def _scalar(self, sql: str) -> int:
        row = self._db.execute(sql).fetchone()
        return int(row[0]) if row else 0

    def add(self, render: Callable[[int], bytes]) -> OutboxItem:
        """Commit a new item; `render(seq)` makes its payload."""
        self._db.execute("PRAGMA synchronous=FULL")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self.last_seq + 1
            payload = render(seq)
            self._db.execute("INSERT INTO outbox (seq, payload) VALUES (?, ?)", (seq, payload))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            depth = self.depth + 1
            if depth > self.max_items:
                self._drop_oldest(depth - self.max_items)
                depth = self.max_items
        # Counted once committed: a failed commit leaves them as they were.
        self.depth, self.last_seq = depth, seq
        return OutboxItem(seq, payload)

    def _drop_oldest(self, count: int) -> None:
        self._db.execute(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
            (count,),
        )
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (count,))
        self.dropped += count
        log.warning("outbox.full dropped=%d max_items=%d", count, self.max_items)

    def pending(self) -> list[OutboxItem]:
        rows = self._db.execute("SELECT seq, payload FROM outbox ORDER BY seq").fetchall()
        return [OutboxItem(int(seq), bytes(payload)) for seq, payload in rows]

    def remove(self, seq: int) -> None:
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            deleted = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        self.depth -= deleted

    def close(self) -> None:
        self._db.close()
