"""The state directory's health: what the outbox and the spool report.

An SD card fills up, is remounted read-only after errors, corrupts a file,
or a directory ends up owned by someone else. None of that may stop the
microphone, the STT session or MQTT: the outbox and the spool fall back to
memory, report here, and try the disk again every `RETRY_S`. The state
topic, `STATUS=`, the log and Home Assistant all read the one condition
kept here.

The classification is by errno (and SQLite's primary result code), never by
message text.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from edged.untrusted import loggable

log = logging.getLogger("edged.storage")

RETRY_S = 30.0  # how often a degraded disk is tried again (`state_retry_s`)

# Conditions, worst first: the state shows the worst one.
OK = "ok"
FULL = "full"
READ_ONLY = "read_only"
UNWRITABLE = "unwritable"
CORRUPT = "corrupt"
IO_ERROR = "io_error"
_SEVERITY = {OK: 0, FULL: 1, CORRUPT: 2, IO_ERROR: 3, UNWRITABLE: 4, READ_ONLY: 5}

_ERRNO_CONDITIONS = {
    errno.ENOSPC: FULL,
    errno.EDQUOT: FULL,
    errno.EFBIG: FULL,
    errno.EROFS: READ_ONLY,
    errno.EACCES: UNWRITABLE,
    errno.EPERM: UNWRITABLE,
    errno.ENOTDIR: UNWRITABLE,
    errno.EISDIR: UNWRITABLE,
    errno.EEXIST: UNWRITABLE,
}
# SQLite primary result codes (the low byte of the extended code).
_SQLITE_CONDITIONS = {
    3: UNWRITABLE,  # SQLITE_PERM
    8: READ_ONLY,  # SQLITE_READONLY (a read-only file, directory or mount)
    10: IO_ERROR,  # SQLITE_IOERR
    11: CORRUPT,  # SQLITE_CORRUPT
    13: FULL,  # SQLITE_FULL
    14: UNWRITABLE,  # SQLITE_CANTOPEN
    23: UNWRITABLE,  # SQLITE_AUTH
    26: CORRUPT,  # SQLITE_NOTADB
}


def condition_of(error: BaseException, where: Path | None = None) -> str:
    """The storage condition an exception from the disk stands for. SQLite
    says only "unable to open" on a read-only mount: `where` (a directory)
    lets the filesystem's own flag tell."""
    condition = _condition_of(error)
    if where is not None and condition in (UNWRITABLE, IO_ERROR):
        try:
            if os.statvfs(where).f_flag & os.ST_RDONLY:
                return READ_ONLY
        except OSError:
            pass
    return condition


def _condition_of(error: BaseException) -> str:
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(code, int):
            return _SQLITE_CONDITIONS.get(code & 0xFF, IO_ERROR)
        return IO_ERROR
    if isinstance(error, OSError) and error.errno is not None:
        return _ERRNO_CONDITIONS.get(error.errno, IO_ERROR)
    return IO_ERROR


def describe(error: BaseException) -> str:
    """A short reason for logs and the state: no paths beyond a file name."""
    if isinstance(error, OSError):
        name = Path(error.filename).name if isinstance(error.filename, str) else None
        text = error.strerror or type(error).__name__
        return f"{text} ({name})" if name else text
    return str(error) or type(error).__name__


@dataclass
class Problem:
    condition: str
    reason: str
    since: float  # monotonic


class StorageHealth:
    """The problems each store ("outbox", "spool") reports, and when to retry."""

    def __init__(self, retry_s: float = RETRY_S) -> None:
        self.retry_s = retry_s
        self._problems: dict[str, Problem] = {}
        self._next_retry = 0.0

    def failed(self, store: str, error: BaseException, doing: str,
               where: Path | None = None) -> str:
        """A store could not use the disk (in directory `where`); returns the condition."""
        condition = condition_of(error, where)
        reason = f"{store} {doing}: {describe(error)}"
        known = self._problems.get(store)
        if known is None or known.condition != condition:
            log.error("storage.degraded store=%s condition=%s error=%s fallback=memory "
                      "retry_in=%.0fs", store, condition, loggable(reason), self.retry_s)
        self._problems[store] = Problem(condition, reason, known.since if known else
                                        time.monotonic())
        if not self._next_retry:
            self._next_retry = time.monotonic() + self.retry_s
        return condition

    def full(self, store: str, reason: str) -> None:
        """Not an error: the store stopped at its limit (free-space reserve)."""
        if store not in self._problems:
            log.warning("storage.full store=%s reason=%s", store, loggable(reason))
            self._problems[store] = Problem(FULL, f"{store}: {reason}", time.monotonic())

    def recovered(self, store: str) -> None:
        problem = self._problems.pop(store, None)
        if problem is not None:
            log.info("storage.recovered store=%s after_s=%.0f", store,
                     time.monotonic() - problem.since)
        if not self._problems:
            self._next_retry = 0.0

    @property
    def condition(self) -> str:
        if not self._problems:
            return OK
        return max((p.condition for p in self._problems.values()), key=_SEVERITY.__getitem__)

    @property
    def reason(self) -> str | None:
        if not self._problems:
            return None
        worst = self.condition
        return next(p.reason for p in self._problems.values() if p.condition == worst)

    def degraded(self, store: str) -> bool:
        return store in self._problems

    def retry_due(self, now: float | None = None) -> bool:
        """Whether degraded stores should try the disk again now (and re-arm)."""
        if not self._problems:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_retry:
            return False
        self._next_retry = now + self.retry_s
        return True


def fsync_directory(path: Path) -> None:
    """Make a file's creation, rename or removal in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably: a temporary file
    beside it, fsync, rename, fsync of the directory, so that after a power
    cut it holds the old bytes or the new, never a mix. Raises OSError (full,
    read-only, ...) with nothing half-written left behind."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        # Whatever is at the temporary name (a crash's leftover, or a FIFO
        # someone planted, on which an open for writing would block forever)
        # goes first: the file written is always one this call created.
        temporary.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(temporary, flags, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # read-only: nothing was created either
            temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


class NotAFile(Exception):
    """What is at a path is not a small regular file: why (none of its content)."""


def read_small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at `path`, None when nothing is there.

    Whoever can write the directory could have put anything at `path`: a
    symlink, a device, or a FIFO, whose plain open would block the reader
    forever. Those, and a file larger than `limit` bytes, raise `NotAFile`;
    other failures (permissions, I/O, a directory) raise OSError."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR):  # a symlink, a directory
            raise NotAFile("not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise NotAFile("not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise NotAFile(f"larger than {limit} bytes")
    return data


def make_directory(path: Path) -> None:
    """mkdir -p whose new directories survive a power cut: each new one's
    entry in its parent is synced."""
    if path.is_dir():
        return
    make_directory(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_directory(path.parent)


def quarantine(path: Path, why: str) -> Path | None:
    """Rename a damaged file (or whatever is in its place) aside, never delete it.

    Returns the new path, or None when even the rename failed (then the
    caller carries on without it)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{counter}")
        counter += 1
    try:
        path.rename(target)
        fsync_directory(path.parent)
    except OSError as error:
        log.error("storage.quarantine_failed file=%s reason=%s error=%s", loggable(path.name),
                  why, loggable(describe(error)))
        return None
    log.error("storage.quarantined file=%s moved_to=%s reason=%s", loggable(path.name),
              loggable(target.name), why)
    return target
