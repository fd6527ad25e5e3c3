"""The privacy mute's persisted flag, and the switch command, without daemon knowledge.

The flag is `<state_dir>/mute.json`, `{"muted": true|false, ...}`, written
atomically (a temporary file, fsync, rename, fsync of the directory), so a
power cut leaves the old flag or the new one, never half of either.

The file is hostile like every byte from outside. No file means never muted.
A file that is there but cannot be believed (not JSON, no boolean `muted`,
too large, not readable, a directory, a FIFO, a symlink) means *muted*: a user who muted expects
to stay muted, and a mute that silently turns itself off after an SD card
hiccup would break the one promise the feature makes. So doubt keeps the
microphone closed, the log says so at error level, the damaged file is
renamed aside (never deleted) and a clean muted flag written in its place; an
unmute from the user ends it. (A state directory that cannot even be searched
hides whether there is a flag at all: that is logged, and the daemon listens,
as it keeps working through every other storage failure; see `read_flag`.)

A flag that cannot be written (full, read-only, unwritable state directory)
does not stop the mute: it takes effect in memory at once (privacy first),
the storage condition is reported through `StorageHealth` like the outbox's
and the spool's, and the write is tried again until it succeeds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from edged.storage import (
    NotAFile,
    StorageHealth,
    describe,
    quarantine,
    read_small_file,
    replace_file,
)
from edged.untrusted import loggable

log = logging.getLogger("edged.control")

FLAG_NAME = "mute.json"
STORE = "mute"  # its name in StorageHealth
MAX_FLAG_BYTES = 4096  # the flag is a few dozen bytes: anything larger is not ours

ON = b"ON"
OFF = b"OFF"


def parse_command(payload: bytes) -> bool | None:
    """`ON` (mute) or `OFF` (unmute), any case, surrounding whitespace
    ignored; None for anything else."""
    try:
        word = payload.decode("ascii").strip().upper()
    except UnicodeDecodeError:
        return None
    return {"ON": True, "OFF": False}.get(word)


def switch_state(muted: bool) -> bytes:
    """The retained state topic's payload (what the Home Assistant switch reads)."""
    return ON if muted else OFF


def parse_flag(data: bytes) -> bool | None:
    """The `muted` of a flag file's contents; None if they cannot be believed."""
    if len(data) > MAX_FLAG_BYTES:
        return None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the limit
        return None
    if not isinstance(document, dict):
        return None
    muted = document.get("muted")
    return muted if isinstance(muted, bool) else None


def render_flag(muted: bool, source: str, at: datetime) -> bytes:
    """The flag file's contents; `source` and `at` are for a reader, not parsed."""
    stamp = at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return json.dumps({"muted": muted, "source": source, "at": stamp}).encode() + b"\n"


def write_flag(path: Path, data: bytes) -> None:
    """Replace the flag atomically and durably; raises OSError."""
    replace_file(path, data, 0o644)


class Reading(NamedTuple):
    muted: bool
    doubted: bool  # the file was there but could not be believed (then muted)


def read_flag(path: Path) -> Reading:
    """What the flag at `path` says, doubt meaning muted (module docstring).
    Never raises; a file that is not a flag is quarantined; both are logged."""
    try:
        data = read_small_file(path, MAX_FLAG_BYTES)
    except NotAFile as error:
        # A FIFO, a symlink, a device or a gigabyte: a plain
        # open of a FIFO would block the daemon's start for good.
        log.error("control.mute_flag_damaged file=%s reason=%s muted=true "
                  "why=a_user_who_muted_stays_muted", loggable(path.name), error)
        quarantine(path, "not a mute flag")
        return Reading(muted=True, doubted=True)
    except OSError as error:
        if not _there(path):
            # The state directory itself cannot be searched: whether a flag is
            # in it is unknown, and so is any mute. Storage trouble of that kind
            # is reported by the outbox and the spool, and the daemon keeps
            # working, as the storage promise says.
            log.error("control.mute_flag_unknown file=%s error=%s muted=false "
                      "why=state_dir_not_searchable", loggable(path.name),
                      loggable(describe(error)))
            return Reading(muted=False, doubted=False)
        log.error("control.mute_flag_unreadable file=%s error=%s muted=true "
                  "why=a_user_who_muted_stays_muted", loggable(path.name),
                  loggable(describe(error)))
        return Reading(muted=True, doubted=True)
    if data is None:
        return Reading(muted=False, doubted=False)
    muted = parse_flag(data)
    if muted is None:
        log.error("control.mute_flag_damaged file=%s bytes=%d muted=true "
                  "why=a_user_who_muted_stays_muted", loggable(path.name), len(data))
        quarantine(path, "not a mute flag")
        return Reading(muted=True, doubted=True)
    return Reading(muted=muted, doubted=False)


def _there(path: Path) -> bool:
    """Whether something is known to be at `path` (not: whether it can be read)."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


class MuteFlag:
    """The persisted flag of one state directory, reporting to `health`.

    Every write, first try or retry, writes the newest wish, one write at a
    time: a retry of a store the disk refused can never land after a newer
    store and put the old value back, and only the newest wish on disk
    clears the unsaved condition."""

    def __init__(self, state_dir: Path, health: StorageHealth):
        self.path = state_dir / FLAG_NAME
        self.health = health
        self._wish: tuple[int, bool, str] = (0, False, "")  # (generation, muted, source)
        self._unsaved = False  # the newest wish is not known to be on disk
        self._writing = threading.Lock()  # a thread's write, or one at the stop

    def load(self) -> bool:
        """Whether the daemon starts muted. A flag that had to be doubted is
        written again, as muted (or that write is retried like any other)."""
        reading = read_flag(self.path)
        if reading.doubted:
            self.store_now(True, "doubted_flag")
        return reading.muted

    async def store(self, muted: bool, source: str) -> bool:
        """Persist `muted` (the I/O on a thread); whether it is on disk now."""
        self._want(muted, source)
        return self._report(*await asyncio.to_thread(self._write_wish))

    async def retry(self) -> bool:
        """Try a refused store again (the newest wish); whether the disk took it."""
        if not self._unsaved:
            return False
        return self._report(*await asyncio.to_thread(self._write_wish))

    def store_now(self, muted: bool, source: str) -> bool:
        """`store` without leaving the loop: at the start, and at the stop,
        when no task is left to carry a store out."""
        self._want(muted, source)
        return self._report(*self._write_wish())

    def _want(self, muted: bool, source: str) -> None:
        self._wish = (self._wish[0] + 1, muted, source)
        self._unsaved = True

    def _write_wish(self) -> tuple[int, OSError | None]:
        """Write the newest wish (on a thread, or on the loop); what was written."""
        with self._writing:
            generation, muted, source = self._wish
            try:
                write_flag(self.path, render_flag(muted, source, datetime.now(UTC)))
            except OSError as error:
                return generation, error
            return generation, None

    def _report(self, generation: int, error: OSError | None) -> bool:
        if error is not None:
            self._unsaved = True  # (an older wish's failure too: the retry writes the newest)
            self.health.failed(STORE, error, "write", where=self.path.parent)
            return False
        if generation == self._wish[0]:
            self._unsaved = False
            self.health.recovered(STORE)
        return True
