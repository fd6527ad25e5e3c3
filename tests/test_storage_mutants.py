"""The state directory's health, cases found by mutation testing (docs/testing.md):
how each error is classified and described (the state topic's `storage` and
`storage_error`), when a degraded disk is tried again, what the log says, and
how damaged files are named when put aside."""

from __future__ import annotations

import calendar
import errno
import logging
import re
import sqlite3
import time
from pathlib import Path

import pytest

from edged import storage
from edged.storage import (
    StorageHealth,
    condition_of,
    describe,
    fsync_directory,
    make_directory,
    quarantine,
)


@pytest.mark.parametrize(
    ("error", "condition"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "full"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (PermissionError(errno.EACCES, "Permission denied"), "unwritable"),
        (OSError(errno.EIO, "Input/output error"), "io_error"),
        (OSError("no errno"), "io_error"),
        (ValueError("not a disk error at all"), "io_error"),
        (sqlite3.Error("made by hand: no result code"), "io_error"),
    ],
)
def test_an_error_is_classified_by_its_errno(error: BaseException, condition: str) -> None:
    assert condition_of(error) == condition


def sqlite_error(code: int) -> sqlite3.Error:
    error = sqlite3.OperationalError("x")
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("code", "condition"),
    [
        (13, "full"),  # SQLITE_FULL
        (8, "read_only"),  # SQLITE_READONLY
        (8 | 1 << 8, "read_only"),  # SQLITE_READONLY_RECOVERY: the primary code counts
        (11, "corrupt"),  # SQLITE_CORRUPT
        (26, "corrupt"),  # SQLITE_NOTADB
        (10 | 3 << 8, "io_error"),  # SQLITE_IOERR_WRITE
        (1, "io_error"),  # SQLITE_ERROR: nothing more specific
    ],
)
def test_a_sqlite_error_is_classified_by_its_primary_result_code(
    code: int, condition: str
) -> None:
    assert condition_of(sqlite_error(code)) == condition


def test_unwritable_is_unwritable_on_a_writable_filesystem(tmp_path: Path) -> None:
    error = PermissionError(errno.EACCES, "Permission denied")
    assert condition_of(error, tmp_path) == "unwritable"


def test_a_reason_names_the_file_but_not_its_path() -> None:
    error = OSError(errno.ENOSPC, "No space left on device",
                    "/var/lib/edged/spool/00000001.spool")
    assert describe(error) == "No space left on device (00000001.spool)"
    assert describe(OSError(errno.ENOSPC, "No space left on device")) == (
        "No space left on device")
    assert describe(PermissionError()) == "PermissionError"


def test_a_reason_for_other_errors_is_their_message_or_their_type() -> None:
    assert describe(sqlite3.DatabaseError("database disk image is malformed")) == (
        "database disk image is malformed")
    assert describe(sqlite3.OperationalError()) == "OperationalError"


# -- when to try the disk again ----------------------------------------------------


def test_a_degraded_disk_is_tried_again_every_retry_interval() -> None:
    health = StorageHealth(retry_s=30.0)
    assert not health.retry_due(now=1e9), "nothing to retry"
    failed_at = time.monotonic()
    health.failed("outbox", OSError(errno.ENOSPC, "full"), "write")
    assert not health.retry_due(now=failed_at + 1)
    assert not health.retry_due(), "not yet: the clock defaults to now"
    assert health.retry_due(now=failed_at + 31)
    assert not health.retry_due(now=failed_at + 32), "re-armed"
    assert not health.retry_due(now=failed_at + 60)
    assert health.retry_due(now=failed_at + 61.5)


def test_a_retry_is_due_exactly_at_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.time, "monotonic", lambda: 1000.0)
    health = StorageHealth(retry_s=30.0)
    health.failed("spool", OSError(errno.EIO, "I/O"), "write")
    assert health.retry_due(now=1030.0)


def test_a_store_at_its_limit_is_looked_at_again_at_once() -> None:
    health = StorageHealth(retry_s=30.0)
    health.full("spool", "free space at the reserve")
    assert health.retry_due()
    assert not health.retry_due()


def test_a_new_failure_after_a_recovery_waits_a_whole_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    health = StorageHealth(retry_s=30.0)
    health.failed("outbox", OSError(errno.EROFS, "ro"), "write")
    health.recovered("outbox")
    assert health.condition == "ok"
    clock[0] = 2000.0
    health.failed("outbox", OSError(errno.EROFS, "ro"), "write")
    assert not health.retry_due(now=2010.0)
    assert health.retry_due(now=2030.0)


def test_one_store_recovering_keeps_the_other_ones_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage.time, "monotonic", lambda: 1000.0)
    health = StorageHealth(retry_s=30.0)
    health.failed("outbox", OSError(errno.ENOSPC, "full"), "write")
    health.failed("spool", OSError(errno.ENOSPC, "full"), "write")
    health.recovered("spool")
    assert health.condition == "full"
    assert not health.retry_due(now=1010.0)
    assert health.retry_due(now=1030.0)


# -- what the log says ----------------------------------------------------------------


def test_a_degraded_store_is_logged_once_per_condition(caplog: pytest.LogCaptureFixture) -> None:
    health = StorageHealth()
    with caplog.at_level(logging.INFO, "edged.storage"):
        health.failed("outbox", OSError(errno.ENOSPC, "full"), "write")
        health.failed("outbox", OSError(errno.ENOSPC, "full"), "write")
        health.failed("outbox", OSError(errno.EROFS, "ro"), "write")
    assert caplog.text.count("storage.degraded") == 2
    assert "condition=read_only" in caplog.text


def test_a_recovery_is_logged_with_the_time_since_the_first_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [100.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    health = StorageHealth()
    with caplog.at_level(logging.INFO, "edged.storage"):
        health.failed("outbox", OSError(errno.ENOSPC, "full"), "write")
        clock[0] = 150.0
        health.failed("outbox", OSError(errno.ENOSPC, "full"), "retry")
        clock[0] = 200.0
        health.recovered("outbox")
        health.full("spool", "free space at the reserve")
        clock[0] = 212.0
        health.recovered("spool")
        health.recovered("spool")  # again: nothing to say
    recoveries = re.findall(r"storage.recovered store=(\w+) after_s=(\d+)", caplog.text)
    assert recoveries == [("outbox", "100"), ("spool", "12")]


# -- files and directories ------------------------------------------------------------


def test_new_directories_are_made_with_their_parents(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    make_directory(deep)
    assert deep.is_dir()
    make_directory(deep)  # already there: nothing to do


def test_only_a_directory_is_synced_as_a_directory(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_directory(tmp_path / "file")


def test_a_damaged_file_is_put_aside_under_the_utc_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # nine hours from UTC, no summer time
    time.tzset()
    try:
        (tmp_path / "outbox.sqlite3").write_bytes(b"x")
        before = time.time()
        moved = quarantine(tmp_path / "outbox.sqlite3", "test")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert moved is not None
    match = re.fullmatch(r"outbox\.sqlite3\.damaged-(\d{8}T\d{6})", moved.name)
    assert match, moved.name
    stamp = calendar.timegm(time.strptime(match[1], "%Y%m%dT%H%M%S"))
    assert abs(stamp - before) < 5
    assert moved.read_bytes() == b"x"


def test_files_put_aside_in_the_same_second_are_numbered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = time.gmtime(1_800_000_000)
    monkeypatch.setattr(storage.time, "gmtime", lambda *_: frozen)
    names = []
    for content in (b"1", b"2", b"3"):
        (tmp_path / "01.spool").write_bytes(content)
        moved = quarantine(tmp_path / "01.spool", "test")
        assert moved is not None
        names.append((moved.name, moved.read_bytes()))
    assert names == [("01.spool.damaged-20270115T080000", b"1"),
                     ("01.spool.damaged-20270115T080000-1", b"2"),
                     ("01.spool.damaged-20270115T080000-2", b"3")]
