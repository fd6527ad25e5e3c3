"""The outbox, cases found by mutation testing (docs/testing.md): its limits,
the transcription point and when it reaches the disk, a disk that fails in
every step (full, read-only, unreadable, damaged under us), quarantine and
salvage in detail, and the upgrade from the first file format."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged import outbox as outbox_module
from edged.outbox import Outbox, OutboxItem, StreamInfo
from edged.storage import StorageHealth, quarantine
from tests.support.storage import fill, read_only, tmpfs

STREAM_ID = re.compile(r"[0-9a-f]{32}")


def render(stream: str, seq: int) -> bytes:
    return f"{stream}:{seq}".encode()


def stored(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """What another process reading the file sees (committed data only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def sqlite_error(code: int, text: str) -> sqlite3.Error:
    error = sqlite3.OperationalError(text)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


IOERR, CORRUPT = 10, 11


class FlakyDb:
    """The outbox's connection, with chosen statements failing or watched."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail: dict[str, sqlite3.Error] = {}  # statement start -> error
        self.fail_close = False
        self.statements: list[str] = []
        self.synchronous_at_commit: list[int] = []

    def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        for start, error in self.fail.items():
            if sql.startswith(start):
                raise error
        if sql.startswith(("INSERT INTO outbox", "UPDATE stream")):
            self.synchronous_at_commit.append(
                self.db.execute("PRAGMA synchronous").fetchone()[0])
        return self.db.execute(sql, *args)

    def __enter__(self) -> Any:
        return self.db.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.db.__exit__(*exc)

    def close(self) -> None:
        if self.fail_close:
            self.db.close()
            raise sqlite_error(IOERR, "disk I/O error")
        self.db.close()


def flaky(outbox: Outbox) -> FlakyDb:
    assert outbox._db is not None
    db = FlakyDb(outbox._db)
    outbox._db = db  # type: ignore[assignment]
    return db


# -- limits -----------------------------------------------------------------------------


def test_the_outbox_holds_ten_thousand_finals_by_default(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size_kb=16 * 1024) as state:  # fast syncs
        outbox = Outbox(state / "outbox.sqlite3")
        for _ in range(10_001):
            outbox.add(render, 0)
        assert outbox.depth == 10_000
        assert outbox.dropped == 1
        assert outbox.pending(1)[0].seq == 2
        outbox.close()


def test_finals_held_in_memory_are_bounded_too(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"")  # the state directory cannot be made
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3", memory_items=3)
    for _ in range(5):
        outbox.add(render, 0)
    assert [item.seq for item in outbox.pending()] == [3, 4, 5]
    assert outbox.dropped == 2
    assert outbox.depth == 3


def test_pending_gives_at_most_what_is_asked_for(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    for _ in range(5):
        outbox.add(render, 0)
    assert [item.seq for item in outbox.pending(2)] == [1, 2]
    assert [item.payload for item in outbox.pending(1)] == [render(outbox.stream_id, 1)]
    (tmp_path / "other").mkdir()
    memory_only = Outbox(tmp_path / "other" / "x" / "outbox.sqlite3")
    memory_only._db, memory_only._disk_depth = None, 0
    memory_only.health.failed("outbox", OSError(errno.EROFS, "ro"), "write")
    for _ in range(4):
        memory_only.add(render, 0)
    assert [item.seq for item in memory_only.pending(2)] == [1, 2]
    assert memory_only.pending(0) == []


# -- the transcription point --------------------------------------------------------------


def test_a_new_outbox_starts_at_the_beginning_of_its_stream(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert (outbox.last_seq, outbox.transcribed, outbox.durable_transcribed) == (0, 0, 0)
    assert outbox.dropped == 0
    assert stored(tmp_path / "outbox.sqlite3", "SELECT last_seq, transcribed, dropped "
                  "FROM stream") == [(0, 0, 0)]


def test_a_final_makes_its_point_durable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.add(render, 32_000)
    assert outbox.durable_transcribed == 32_000
    assert stored(path, "SELECT transcribed FROM stream") == [(32_000,)]
    again = Outbox(path)  # a SIGKILL here: the point is there
    assert again.transcribed == again.durable_transcribed == 32_000


def test_a_point_alone_reaches_the_disk_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.mark_transcribed(16_000, durable=False)
    assert outbox.transcribed == 16_000
    assert outbox.durable_transcribed == 0
    assert stored(path, "SELECT transcribed FROM stream") == [(0,)]
    outbox.mark_transcribed(48_000, durable=True)
    assert outbox.durable_transcribed == 48_000
    assert stored(path, "SELECT transcribed FROM stream") == [(48_000,)]
    outbox.mark_transcribed(40_000, durable=True)  # behind: nothing moves
    assert outbox.transcribed == outbox.durable_transcribed == 48_000


def test_a_point_already_reached_is_not_written_again(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.mark_transcribed(16_000, durable=True)
    db = flaky(outbox)
    outbox.mark_transcribed(16_000, durable=True)
    assert not [s for s in db.statements if s.startswith("UPDATE")]


def test_a_degraded_outbox_keeps_the_point_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    db = flaky(outbox)
    db.fail["INSERT"] = sqlite_error(IOERR, "disk I/O error")
    outbox.add(render, 16_000)
    assert outbox.degraded
    del db.fail["INSERT"]
    outbox.mark_transcribed(32_000, durable=True)
    assert outbox.transcribed == 32_000
    assert outbox.durable_transcribed == 0
    assert stored(path, "SELECT transcribed FROM stream") == [(0,)]


def test_a_failing_durable_point_is_reported(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    db = flaky(outbox)
    db.fail["UPDATE"] = sqlite_error(IOERR, "disk I/O error")
    outbox.mark_transcribed(16_000, durable=True)
    assert outbox.transcribed == 16_000
    assert outbox.durable_transcribed == 0
    assert outbox.health.condition == "io_error"
    assert outbox.health.reason == "outbox write: disk I/O error"


def test_a_point_reached_while_degraded_is_not_written_at_a_stop(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.add(render, 16_000)
    db = flaky(outbox)
    db.fail["INSERT"] = sqlite_error(13, "database or disk is full")
    outbox.add(render, 48_000)  # kept in memory only
    del db.fail["INSERT"]  # the disk has room again, but nobody tried yet
    outbox.close()
    assert stored(path, "SELECT transcribed FROM stream") == [(16_000,)], (
        "the point never passes a final that is not on disk")


def test_every_final_and_point_is_committed_with_a_full_sync(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    db = flaky(outbox)
    outbox.add(render, 16_000)
    outbox.mark_transcribed(32_000, durable=True)
    outbox.close()
    full = 2
    assert db.synchronous_at_commit == [full] * 4  # final + its point, point, last point


# -- a disk that fails -----------------------------------------------------------------------


def test_an_outbox_whose_directory_cannot_be_made_works_in_memory(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"")
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
    assert outbox.health.condition == "unwritable"
    assert outbox.depth == 0
    assert outbox.durable_transcribed == 0
    assert STREAM_ID.fullmatch(outbox.stream_id)
    item = outbox.add(render, 16_000)
    assert (item.seq, outbox.depth, outbox.durable_transcribed) == (1, 1, 0)
    outbox.remove(item.key)
    assert outbox.depth == 0
    outbox.close()


def test_an_outbox_it_may_not_even_look_at_starts_a_new_stream_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path).add(render, 16_000)
    real_exists, real_is_file = Path.exists, Path.is_file

    def denied(real: Callable[[Path], bool]) -> Callable[[Path], bool]:
        def check(self: Path) -> bool:
            if self == path:  # as edged's user sees a directory it may not search
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)
        return check

    monkeypatch.setattr(Path, "exists", denied(real_exists))
    monkeypatch.setattr(Path, "is_file", denied(real_is_file))
    outbox = Outbox(path)
    assert outbox.health.condition == "unwritable"
    assert outbox.health.reason == "outbox open: Permission denied (outbox.sqlite3)"
    assert STREAM_ID.fullmatch(outbox.stream_id)
    assert (outbox.last_seq, outbox.transcribed, outbox.dropped) == (0, 0, 0)
    assert outbox.add(render, 0).seq == 1


def test_an_outbox_whose_first_bytes_cannot_be_read_is_left_to_sqlite_not_put_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path)
    kept = first.add(render, 16_000)
    first.close()
    real_open = Path.open

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:  # the look at the header fails; SQLite's own open does not
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    outbox = Outbox(path)
    assert not list(tmp_path.glob("*.damaged-*")), "not damaged: not put aside"
    assert outbox.stream_id == first.stream_id
    assert [item.key for item in outbox.pending()] == [kept.key]


def test_a_closed_outbox_hands_out_only_what_memory_holds(tmp_path: Path) -> None:
    # The publisher may still ask while the daemon stops: what is on disk
    # waits for the next start, and asking is not a crash.
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.add(render, 0)
    outbox.close()
    assert outbox.pending() == []


@pytest.mark.parametrize("found", ["no_outbox", "an_empty_outbox_file"])
def test_a_read_only_card_starts_a_new_stream(tmp_path: Path, found: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if found == "an_empty_outbox_file":
        (state / "outbox.sqlite3").write_bytes(b"")  # created, then the card failed
    with read_only(state):
        outbox = Outbox(state / "outbox.sqlite3")
        assert outbox.health.condition == "read_only"
        assert STREAM_ID.fullmatch(outbox.stream_id)
        assert (outbox.last_seq, outbox.transcribed, outbox.dropped) == (0, 0, 0)
        assert outbox.add(render, 0).seq == 1


def test_a_read_only_card_shows_the_outbox_as_it_was(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite3"
    outbox = Outbox(path, max_items=1)
    outbox.add(render, 16_000)
    kept = outbox.add(render, 32_000)  # the first is dropped: dropped=1
    outbox.close()
    with read_only(state):
        degraded = Outbox(path)
        assert (degraded.last_seq, degraded.transcribed, degraded.dropped) == (2, 32_000, 1)
        assert degraded.durable_transcribed == 32_000
        assert degraded.pending() == [kept]


def test_a_crash_left_finals_in_the_log_a_read_only_card_cannot_read(tmp_path: Path) -> None:
    state, copy = tmp_path / "state", tmp_path / "copy"
    state.mkdir()
    copy.mkdir()
    outbox = Outbox(state / "outbox.sqlite3")
    outbox.add(render, 0)
    outbox.add(render, 0)
    outbox.close()  # checkpointed: the file itself says last_seq 2
    outbox = Outbox(state / "outbox.sqlite3")
    outbox.add(render, 0)
    outbox.add(render, 0)  # only in the write-ahead log: last_seq 4
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal"):  # the -shm was lost
        shutil.copy(state / name, copy / name)
    with read_only(copy):
        degraded = Outbox(copy / "outbox.sqlite3")
        if degraded.stream_id == outbox.stream_id:
            assert degraded.last_seq >= 4, "a seq of this stream would be used twice"


def test_a_write_refused_is_reported_and_the_final_kept(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    db = flaky(outbox)
    db.fail["INSERT"] = sqlite_error(IOERR, "disk I/O error")
    item = outbox.add(render, 16_000)
    assert outbox.health.condition == "io_error"
    assert outbox.health.reason == "outbox write: disk I/O error"
    assert outbox.pending() == [item]
    assert outbox.durable_transcribed == 0


def test_a_read_refused_is_reported(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.add(render, 0)
    db = flaky(outbox)
    db.fail["SELECT stream, seq"] = sqlite_error(IOERR, "disk I/O error")
    assert outbox.pending() == []
    assert outbox.health.reason == "outbox read: disk I/O error"


def test_a_delete_refused_is_reported_and_done_later(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    first, second = outbox.add(render, 0), outbox.add(render, 0)
    db = flaky(outbox)
    db.fail["DELETE"] = sqlite_error(IOERR, "disk I/O error")
    outbox.remove(first.key)
    assert outbox.health.reason == "outbox delete: disk I/O error"
    outbox.remove(second.key)  # degraded: remembered, not tried
    assert outbox.pending() == []
    del db.fail["DELETE"]
    assert outbox.retry()
    assert stored(path, "SELECT seq FROM outbox") == []


def test_a_stop_that_cannot_write_is_reported(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    db = flaky(outbox)
    db.fail["UPDATE"] = sqlite_error(IOERR, "disk I/O error")
    outbox.close()
    assert outbox.health.condition == "io_error"
    assert outbox.health.reason == "outbox close: disk I/O error"


def test_a_connection_that_fails_to_close_is_not_a_crash(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    flaky(outbox).fail_close = True
    outbox.close()


def test_finals_keep_their_order_across_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size_kb=512) as state:
        outbox = Outbox(state / "outbox.sqlite3")
        first = outbox.add(render, 0)
        filler = fill(state)
        second = outbox.add(lambda s, q: bytes(64 * 1024), 0)
        assert outbox.health.condition == "full"
        assert outbox.health.reason == "outbox write: database or disk is full"
        outbox.remove(first.key)  # delivered while degraded
        filler.unlink()  # room again, but the disk was not tried yet
        third = outbox.add(render, 0)
        assert [item.seq for item in outbox.pending()] == [second.seq, third.seq]
        assert outbox.retry()
        assert outbox.depth == 2
        assert outbox.durable_transcribed == outbox.transcribed
        outbox.close()
        again = Outbox(state / "outbox.sqlite3")
        assert [item.seq for item in again.pending()] == [second.seq, third.seq]


def test_a_retry_on_a_disk_still_failing_says_why(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite3"
    Outbox(path).close()
    with read_only(state):
        outbox = Outbox(path)
        outbox.add(render, 0)
        assert not outbox.retry()
        assert outbox.health.condition == "read_only"
        assert outbox.health.reason == "outbox retry: unable to open database file"


def test_a_retry_on_a_healthy_outbox_has_nothing_to_do(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.mark_transcribed(16_000, durable=False)
    assert outbox.retry()
    assert outbox.durable_transcribed == 0
    assert stored(path, "SELECT transcribed FROM stream") == [(0,)]


def test_errors_on_a_card_that_turned_read_only_are_reported_as_read_only(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    writing, stopping = Outbox(state / "outbox.sqlite3"), Outbox(state / "other.sqlite3")
    flaky(writing).fail["INSERT"] = sqlite_error(IOERR, "disk I/O error")
    flaky(stopping).fail["UPDATE"] = sqlite_error(IOERR, "disk I/O error")
    with read_only(state):
        writing.add(render, 0)
        assert writing.health.condition == "read_only"
        stopping.close()
        assert stopping.health.condition == "read_only"


def test_a_retry_after_the_disk_recovered_logs_what_it_moved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite3"
    Outbox(path).close()
    with read_only(state):
        outbox = Outbox(path)
        outbox.add(render, 16_000)
    with caplog.at_level(logging.INFO, "edged.outbox"):
        assert outbox.retry()
    assert "outbox.durable_again moved_from_memory=1" in caplog.text
    assert "outbox.adopted" not in caplog.text, "the same stream goes on"
    assert (outbox.depth, outbox.durable_transcribed) == (1, 16_000)


def test_a_retry_finding_another_stream_on_disk_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state").write_bytes(b"")
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")  # memory: a new stream
    outbox.add(render, 0)
    (tmp_path / "state").unlink()
    (tmp_path / "state").mkdir()
    Outbox(tmp_path / "state" / "outbox.sqlite3").close()  # another process made one
    with caplog.at_level(logging.INFO, "edged.outbox"):
        assert outbox.retry()
    assert "outbox.adopted" in caplog.text
    assert stored(tmp_path / "state" / "outbox.sqlite3", "SELECT id FROM stream") == [
        (outbox.stream_id,)]


def test_an_outbox_damaged_under_us_is_replaced_and_the_point_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    old = outbox.stream_id
    outbox.add(render, 48_000)
    db = flaky(outbox)
    db.fail["INSERT"] = sqlite_error(CORRUPT, "database disk image is malformed")
    with caplog.at_level(logging.ERROR, "edged.storage"):
        outbox.add(render, 64_000)
    assert "reason=corrupt: database disk image is malformed" in caplog.text
    assert outbox.stream_id != old
    assert STREAM_ID.fullmatch(outbox.stream_id)
    assert outbox.transcribed == 64_000
    assert list(tmp_path.glob("outbox.sqlite3.damaged-*"))
    assert outbox.add(render, 80_000).seq == outbox.last_seq


def test_an_outbox_damaged_under_a_retry_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    old = outbox.stream_id
    db = flaky(outbox)
    db.fail["INSERT"] = sqlite_error(IOERR, "disk I/O error")
    kept = outbox.add(render, 16_000)
    db.fail["INSERT"] = sqlite_error(CORRUPT, "database disk image is malformed")
    assert not outbox.retry()
    assert outbox.stream_id != old
    assert list(tmp_path.glob("outbox.sqlite3.damaged-*"))
    assert kept in outbox.pending()


# -- quarantine and salvage ------------------------------------------------------------------------


def damaged_outbox(path: Path, rows: int = 300, max_items: int = 10_000,
                   page_at: float | None = None) -> StreamInfo:
    """An outbox of `rows` finals, then damaged: its header garbled, or (with
    `page_at`) the b-tree header of the page that far into the file, which
    leaves the stream row and the other pages readable."""
    outbox = Outbox(path, max_items=max_items)
    for _ in range(rows):
        outbox.add(lambda s, q: f"{s}:{q}:".encode() + bytes(200), q_point(outbox))
    info = StreamInfo(outbox.stream_id, outbox.last_seq, outbox.transcribed, outbox.dropped)
    outbox.close()
    data = bytearray(path.read_bytes())
    if page_at is None:
        data[:16] = b"not a database!!"
    else:
        page = max(int(len(data) // 4096 * page_at), 5) * 4096
        data[page : page + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    return info


def q_point(outbox: Outbox) -> int:
    return (outbox.last_seq + 1) * 1000


def test_a_damaged_outbox_is_put_aside_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged_outbox(path)
    with caplog.at_level(logging.ERROR, "edged.storage"):
        outbox = Outbox(path)
    assert "reason=corrupt: not an SQLite file (garbled header)" in caplog.text
    assert list(tmp_path.glob("outbox.sqlite3.damaged-*"))
    assert outbox.health.condition == "ok"


def test_a_damaged_outbox_whose_stream_is_readable_names_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    old = damaged_outbox(path, max_items=297, page_at=0.5)
    assert (old.last_seq, old.transcribed, old.dropped) == (300, 300_000, 3)
    again = Outbox(path)
    assert again.stream_id != old.id
    assert again.previous_stream == old


def test_the_rows_after_a_damaged_page_are_salvaged_too(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    old = damaged_outbox(path, page_at=1 / 3).id
    again = Outbox(path)
    seqs = [item.seq for item in again.pending() if item.stream == old]
    assert seqs, "the readable rows are salvaged"
    assert max(seqs) == 300, "past the damaged page too"
    assert all(item.payload.startswith(f"{old}:{item.seq}:".encode())
               for item in again.pending() if item.stream == old)


def test_a_damaged_outbox_that_cannot_be_put_aside_works_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged_outbox(path, rows=3)
    monkeypatch.setattr(outbox_module, "quarantine", lambda path, why: None)
    outbox = Outbox(path)
    assert outbox.degraded
    assert outbox.health.condition == "corrupt"
    assert outbox.health.reason == "outbox open: not an SQLite file (garbled header)"
    assert STREAM_ID.fullmatch(outbox.stream_id)
    assert (outbox.last_seq, outbox.transcribed, outbox.dropped) == (0, 0, 0)
    assert outbox.add(render, 0).seq == 1


def reopen_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The damaged file is put aside, but what takes its place cannot be used."""
    calls = []

    def put_aside_then_garbage(path: Path, why: str) -> Path | None:
        moved = quarantine(path, why)
        if not calls:
            path.write_bytes(b"garbage that is not a database" * 200)
        calls.append(path)
        return moved

    monkeypatch.setattr(outbox_module, "quarantine", put_aside_then_garbage)


def test_a_replacement_that_cannot_be_opened_keeps_the_salvage_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    old = damaged_outbox(path, max_items=297, page_at=1 / 3)  # 3 dropped
    reopen_fails(monkeypatch)
    outbox = Outbox(path, memory_items=4)
    assert outbox.degraded
    assert outbox.health.condition == "corrupt"
    assert outbox.health.reason == "outbox open: not an SQLite file (garbled header)"
    assert STREAM_ID.fullmatch(outbox.stream_id)
    assert outbox.stream_id != old.id
    assert (outbox.last_seq, outbox.transcribed) == (0, 0)
    assert outbox.previous_stream == old
    assert outbox.dropped == 3, "what the lost stream dropped still counts"
    assert [(item.stream, item.seq) for item in outbox.pending()] == [
        (old.id, seq) for seq in (297, 298, 299, 300)], "the newest that fit in memory"
    assert outbox.add(render, 0).seq == 1


def test_a_replacement_that_cannot_be_opened_after_an_unreadable_one_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    damaged_outbox(path, max_items=297)  # header garbled: nothing readable
    reopen_fails(monkeypatch)
    outbox = Outbox(path)
    assert outbox.previous_stream is None
    assert (outbox.last_seq, outbox.transcribed, outbox.dropped) == (0, 0, 0)
    assert outbox.pending() == []


def test_a_card_turning_read_only_as_the_damaged_outbox_is_put_aside_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite3"
    damaged_outbox(path, rows=3)
    with contextlib.ExitStack() as later:

        def put_aside_then_read_only(path: Path, why: str) -> Path | None:
            moved = quarantine(path, why)
            later.enter_context(read_only(state))
            return moved

        monkeypatch.setattr(outbox_module, "quarantine", put_aside_then_read_only)
        outbox = Outbox(path)
        assert outbox.health.condition == "read_only"
        assert outbox.health.reason == "outbox open: unable to open database file"


def test_a_damage_found_at_runtime_whose_replacement_fails_counts_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    for _ in range(3):
        outbox.add(render, 0)
    reopen_fails(monkeypatch)
    flaky(outbox).fail["INSERT"] = sqlite_error(CORRUPT, "database disk image is malformed")
    outbox.add(render, 0)
    assert outbox.degraded
    items = outbox.pending()
    assert len({item.key for item in items}) == len(items)
    assert len(items) == 4, "the three salvaged and the new one, in memory"
    assert outbox.depth == 4, "the state's depth: none left counted on the quarantined file"


def test_a_directory_in_the_outbox_place_that_cannot_be_moved_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "outbox.sqlite3").mkdir()
    monkeypatch.setattr(outbox_module, "quarantine", lambda path, why: None)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert outbox.health.condition == "unwritable"
    assert outbox.health.reason == "outbox open: not a file (outbox.sqlite3)"
    assert outbox.add(render, 0).seq == 1


def test_a_directory_in_the_outbox_place_is_put_aside_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "outbox.sqlite3").mkdir()
    with caplog.at_level(logging.ERROR, "edged.storage"):
        outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert "reason=not_a_file" in caplog.text
    assert outbox.health.condition == "ok"


def test_quick_check_failures_are_named_when_the_file_is_put_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    for _ in range(3):
        outbox.add(render, 0)
    old = outbox.stream_id
    outbox.close()
    # A NULL where the schema says NOT NULL: every page reads, quick_check objects.
    db = sqlite3.connect(path)
    db.execute("PRAGMA writable_schema=ON")
    db.execute("UPDATE sqlite_master SET sql = replace(sql, 'stream TEXT NOT NULL', "
               "'stream TEXT') WHERE name = 'outbox'")
    db.commit()
    db.close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO outbox (stream, seq, payload) VALUES (NULL, 99, x'00')")
    db.execute("PRAGMA writable_schema=ON")
    db.execute("UPDATE sqlite_master SET sql = replace(sql, 'stream TEXT,', "
               "'stream TEXT NOT NULL,') WHERE name = 'outbox'")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, "edged.storage"):
        again = Outbox(path)
    assert again.stream_id != old, "quick_check found the damage at once"
    assert "reason=corrupt: quick_check: NULL value in outbox.stream" in caplog.text
    assert [item.seq for item in again.pending() if item.stream == old] == [1, 2, 3]


# -- the first file format --------------------------------------------------------------------


def version_one(path: Path, meta: dict[str, int], seqs: list[int]) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
    db.executemany("INSERT INTO outbox VALUES (?, ?)", [(s, f"v1:{s}".encode()) for s in seqs])
    db.commit()
    db.close()


def test_an_outbox_of_the_first_format_is_upgraded_keeping_its_finals(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    version_one(path, {"last_seq": 7, "dropped": 2}, [5, 6, 7])
    outbox = Outbox(path)
    assert STREAM_ID.fullmatch(outbox.stream_id)
    assert (outbox.last_seq, outbox.dropped, outbox.transcribed) == (7, 2, 0)
    assert outbox.pending() == [OutboxItem("", s, f"v1:{s}".encode()) for s in (5, 6, 7)]
    assert outbox.add(render, 0).seq == 8
    assert sorted(row[0] for row in stored(path, "SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")) == ["outbox", "stream"]
    outbox.close()
    again = Outbox(path)  # and opens as the new format from then on
    assert (again.stream_id, again.last_seq, again.dropped) == (outbox.stream_id, 8, 2)
    assert [item.seq for item in again.pending()] == [5, 6, 7, 8]


def test_an_outbox_of_the_first_format_without_counters_starts_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    version_one(path, {}, [])
    outbox = Outbox(path)
    assert (outbox.last_seq, outbox.dropped) == (0, 0)
    assert outbox.add(render, 0).seq == 1


# -- syncing ----------------------------------------------------------------------------------


def test_a_new_outbox_file_is_synced_into_its_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(outbox_module, "fsync_directory", synced.append)
    Outbox(tmp_path / "outbox.sqlite3").close()
    assert synced == [tmp_path]
    Outbox(tmp_path / "outbox.sqlite3").close()
    assert synced == [tmp_path], "an existing file is not synced again"


def test_a_delivered_final_is_gone_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    first, second = outbox.add(render, 0), outbox.add(render, 0)
    outbox.remove(first.key)
    assert stored(path, "SELECT seq FROM outbox") == [(2,)], "committed at once"
    third = outbox.add(render, 0)
    outbox.close()
    assert outbox.health.condition == "ok"
    assert [item.key for item in Outbox(path).pending()] == [second.key, third.key]


def test_health_is_shared_with_the_caller(tmp_path: Path) -> None:
    health = StorageHealth()
    (tmp_path / "state").write_bytes(b"")
    Outbox(tmp_path / "state" / "outbox.sqlite3", health)
    assert health.degraded("outbox")
