"""The mute flag and the switch command are hostile bytes: parsed, never trusted."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edged.control import mute
from edged.control.mute import (
    MAX_FLAG_BYTES,
    MuteFlag,
    parse_command,
    parse_flag,
    read_flag,
    render_flag,
    write_flag,
)
from edged.storage import StorageHealth


@pytest.mark.parametrize(("payload", "muted"), [
    (b"ON", True), (b"on", True), (b" On\n", True), (b"\tOFF \r\n", False), (b"off", False),
])
def test_the_switch_command_is_on_or_off_in_any_case(payload: bytes, muted: bool) -> None:
    assert parse_command(payload) is muted


@pytest.mark.parametrize("payload", [
    b"", b"1", b"true", b"ONN", b"O N", b"on\x00", b"\xff\xfe", "\u00d6N".encode(),
    b"\x1b[31mON", b"ON" * 10_000, b'{"state": "ON"}',
])
def test_anything_else_is_no_command(payload: bytes) -> None:
    assert parse_command(payload) is None


@pytest.mark.parametrize("data", [
    b"", b"muted", b"null", b"[]", b'{"muted": 1}', b'{"muted": "true"}', b'{"mute": true}',
    b"[" * 4000, b'{"muted": fal\x00\xff', b"\xff\xfe", b'{"muted": false}' + b" " * MAX_FLAG_BYTES,
])
def test_a_flag_that_cannot_be_believed_is_none(data: bytes) -> None:
    assert parse_flag(data) is None


def test_the_flag_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "mute.json"
    at = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    write_flag(path, render_flag(True, "mqtt", at))
    assert json.loads(path.read_bytes()) == {"muted": True, "source": "mqtt",
                                             "at": "2026-11-28T08:00:00Z"}
    assert read_flag(path) == (True, False)
    write_flag(path, render_flag(False, "request", at))
    assert read_flag(path) == (False, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mute.json"], "no temporary left"


def test_no_flag_is_not_muted_and_a_damaged_one_is_muted_and_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "mute.json"
    assert read_flag(path) == (False, False)
    path.write_bytes(b'{"muted": fal')
    assert read_flag(path) == (True, True)
    assert not path.exists()
    assert [p.name.startswith("mute.json.damaged-") for p in tmp_path.iterdir()] == [True]


def test_a_retry_of_an_old_mute_never_lands_after_a_newer_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mute the disk refused is retried while an unmute is stored: the slow
    retry must not put the old `muted` back, nor report the newer one saved."""
    asyncio.run(_retry_then_newer_store(tmp_path, monkeypatch))


async def _retry_then_newer_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    health = StorageHealth(1.0)
    flag = MuteFlag(tmp_path, health)
    refusing = True
    slow_write_started = threading.Event()

    def disk(path: Path, data: bytes) -> None:
        if refusing:
            raise OSError(errno.ENOSPC, "No space left on device")
        if json.loads(data)["muted"]:  # the retry of the old mute: a slow disk
            slow_write_started.set()
            time.sleep(0.3)
        write_flag(path, data)

    monkeypatch.setattr(mute, "write_flag", disk)
    assert not await flag.store(True, "mqtt")
    assert health.condition == "full"
    refusing = False
    retry = asyncio.create_task(flag.retry())
    await asyncio.to_thread(slow_write_started.wait, 5)
    assert await flag.store(False, "mqtt")
    await retry
    assert read_flag(tmp_path / "mute.json") == (False, False), "the newest wish is on disk"
    assert health.condition == "ok"
    assert not await flag.retry(), "nothing left to retry"


def in_time(work: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Run `work` on a thread and fail (instead of hanging the suite) if it blocks."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # handed to the test thread
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} blocked"
    if failure:
        raise failure[0]


@pytest.mark.parametrize("planted", ["fifo", "symlink", "oversize"])
def test_a_flag_that_is_not_a_small_regular_file_is_doubted_without_blocking(
    tmp_path: Path, planted: str
) -> None:
    path = tmp_path / "mute.json"
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "symlink":
        (tmp_path / "elsewhere.json").write_bytes(b'{"muted": false}')
        path.symlink_to(tmp_path / "elsewhere.json")
    else:
        path.write_bytes(b'{"muted": false}' + b" " * MAX_FLAG_BYTES)
    readings: list[tuple[bool, bool]] = []
    in_time(lambda: readings.append(read_flag(path)), "reading the flag")
    assert readings == [(True, True)]
    assert not path.exists(), "moved aside"
    assert not path.is_symlink(), "moved aside"
    assert len(list(tmp_path.glob("mute.json.damaged-*"))) == 1


def test_a_fifo_at_the_temporary_name_does_not_block_a_write(tmp_path: Path) -> None:
    path = tmp_path / "mute.json"
    os.mkfifo(tmp_path / ".mute.json.tmp")
    at = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    in_time(lambda: write_flag(path, render_flag(True, "mqtt", at)), "writing the flag")
    assert read_flag(path) == (True, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mute.json"]
