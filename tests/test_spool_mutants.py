"""The disk spool, cases found by mutation testing (docs/testing.md): every kind
of damage a segment can carry and what recovery makes of it, the limits, a
disk that fails in each step, reading and releasing at the edges, and what
is synced when."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.audio import spool as spool_module
from edged.audio.spool import SEGMENT_BYTES, Spool
from edged.storage import StorageHealth
from tests.support.storage import read_only

MB = 1024 * 1024
SECOND = 16_000
STREAM = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
HEADER = 24  # file header: magic, stream id
RECORD = 28  # record header: magic, start, wall, length, crc


def pcm(value: int, samples: int) -> bytes:
    return value.to_bytes(2, "little", signed=True) * samples


def values(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "little", signed=True)
            for i in range(0, len(data), 2)]


def file_header(stream: str = STREAM) -> bytes:
    return struct.pack("<8s16s", b"EDGSPL02", bytes.fromhex(stream))


def record(start: int, data: bytes, wall: float = 0.0, length: int | None = None) -> bytes:
    """A record as the spool writes it (`length` to lie about its size)."""
    head = struct.pack("<4sQdI", b"EDGR", start, wall, len(data) if length is None else length)
    return head + struct.pack("<I", zlib.crc32(data, zlib.crc32(head))) + data


def flipped(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    return bytes(damaged)


def new_spool(directory: Path, max_bytes: int = 10 * MB, transcribed: int = 0,
              health: StorageHealth | None = None, **limits: Any) -> Spool:
    limits.setdefault("keep_free_bytes", 0)
    limits.setdefault("keep_free_ratio", 0)
    spool = Spool(directory, max_bytes, health, **limits)
    spool.recover(STREAM, transcribed)
    return spool


def write_seconds(spool: Spool, first: int, seconds: int, wall: float = 1000.0) -> None:
    """One record per second; sample value = its second + 1."""
    for second in range(first, first + seconds):
        spool.append(second * SECOND, pcm(second + 1, SECOND), wall + second)


def value_at(spool: Spool, position: int) -> int:
    start, data = spool.read(position, 2)
    assert start == position, f"no audio at {position}"
    return values(data)[0]


class FlakyOs:
    """The `os` module as the spool sees it, with chosen calls failing or counted."""

    def __init__(self, **overrides: Callable[..., Any]) -> None:
        self.overrides = overrides
        self.fsyncs = 0

    def __getattr__(self, name: str) -> Any:
        if name in self.overrides:
            return self.overrides[name]
        if name == "fsync":
            def counted(fd: int) -> None:
                self.fsyncs += 1
                os.fsync(fd)
            return counted
        return getattr(os, name)


def fails(code: int, text: str) -> Callable[..., Any]:
    def call(*_: Any) -> Any:
        raise OSError(code, text)
    return call


# -- enabled or not --------------------------------------------------------------


def test_a_spool_of_zero_bytes_is_off(tmp_path: Path) -> None:
    health = StorageHealth()
    spool = Spool(tmp_path / "spool", 0, health)
    assert spool.recover(STREAM, 5000) == 5000
    spool.append(5000, pcm(1, 100), 0.0)
    assert not (tmp_path / "spool").exists()
    assert health.condition == "ok"


def test_a_tiny_spool_is_still_on_and_recovers_what_is_there(tmp_path: Path) -> None:
    write_seconds(new_spool(tmp_path), 0, 2)
    assert Spool(tmp_path, 1).recover(STREAM, 0) == 2 * SECOND


def test_nothing_is_written_for_no_audio(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, b"", 0.0)
    assert spool.records == []
    assert not list(tmp_path.glob("*.spool"))


# -- recovery ----------------------------------------------------------------------


def test_a_restart_goes_on_writing_after_the_recovered_audio(tmp_path: Path) -> None:
    first = new_spool(tmp_path)
    write_seconds(first, 0, 40)  # two segments
    first.close()
    second = new_spool(tmp_path)
    assert second.end == 40 * SECOND
    write_seconds(second, 40, 40)  # two more, numbered after them
    assert second.size == sum(p.stat().st_size for p in tmp_path.glob("*.spool"))
    second.close()
    third = new_spool(tmp_path)
    assert third.end == 80 * SECOND
    assert [value_at(third, s * SECOND) for s in (0, 39, 40, 79)] == [1, 40, 41, 80]


def test_recovery_logs_how_much_audio_it_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_seconds(new_spool(tmp_path), 0, 3)
    with caplog.at_level(logging.INFO, "edged.spool"):
        new_spool(tmp_path, transcribed=SECOND)
    assert "spool.recovered seconds=2.0 segments=1 resume_from=1.000s" in caplog.text


def test_a_record_ending_at_the_transcription_point_is_done(tmp_path: Path) -> None:
    write_seconds(new_spool(tmp_path), 0, 3)
    again = new_spool(tmp_path, transcribed=2 * SECOND)
    assert [(r.start, r.end) for r in again.records] == [(2 * SECOND, 3 * SECOND)]


def test_a_spool_directory_that_cannot_be_made_is_reported(tmp_path: Path) -> None:
    (tmp_path / "state").write_bytes(b"a file where the state directory should be")
    health = StorageHealth()
    spool = Spool(tmp_path / "state" / "spool", 10 * MB, health)
    assert spool.recover(STREAM, 7) == 7
    assert health.condition == "unwritable"
    assert spool.last_error == "spool recover: Not a directory (spool)"


def test_a_segment_cut_off_before_its_first_record_is_removed(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").write_bytes(file_header())  # created, then the power went
    (tmp_path / "00000002.spool").write_bytes(file_header()[:5])  # cut inside the header
    (tmp_path / "00000003.spool").write_bytes(file_header() + record(0, pcm(7, 100)))
    spool = new_spool(tmp_path)
    assert spool.end == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000003.spool"]


def test_a_segment_of_ours_with_nothing_readable_is_put_aside(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").write_bytes(file_header() + b"\x00" * 100)
    spool = new_spool(tmp_path)
    assert spool.records == []
    (moved,) = tmp_path.iterdir()
    assert moved.name.startswith("00000001.spool.damaged-")


def test_damage_of_every_kind_is_named_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = (file_header() + record(0, pcm(1, 100))
            + b"JUNK" + bytes(20)  # no record magic
            + record(100, pcm(2, 100))
            + record(200, pcm(3, 100), length=3)  # odd length
            + record(300, pcm(4, 100))
            + record(400, pcm(5, 100), length=0)  # no audio
            + record(500, pcm(6, 100))
            + flipped(record(600, pcm(7, 100)), 40)  # checksum does not match
            + record(700, pcm(8, 100)))
    (tmp_path / "00000001.spool").write_bytes(data)
    (tmp_path / "00000002.spool").write_bytes(file_header() + record(800, pcm(9, 100))
                                              + record(900, pcm(10, 100))[:10])
    (tmp_path / "00000003.spool").write_bytes(file_header() + record(1000, pcm(11, 100))
                                              + record(1100, pcm(12, 100))[:RECORD])
    with caplog.at_level(logging.WARNING, "edged.spool"):
        spool = new_spool(tmp_path)
    reasons = [line.split("reason=")[1].split()[0] for line in caplog.text.splitlines()
               if "spool.corrupt" in line]
    assert reasons == ["bad_magic", "bad_length", "bad_length", "bad_checksum",
                       "truncated_header", "truncated_audio"]
    kept = [0, 100, 300, 500, 700, 800, 1000]
    assert [r.start for r in spool.records] == kept
    assert [value_at(spool, p) for p in kept] == [1, 2, 4, 6, 8, 9, 11]


def test_what_damage_took_is_counted_to_the_byte(tmp_path: Path) -> None:
    junk = b"x" * 1000
    (tmp_path / "00000001.spool").write_bytes(
        file_header() + record(0, pcm(1, 100)) + junk + record(100, pcm(2, 100)))
    assert new_spool(tmp_path).dropped == len(junk) // 2


def test_a_stray_byte_between_records_costs_nothing(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").write_bytes(
        file_header() + record(0, pcm(1, 100)) + b"\x07" + record(100, pcm(2, 100)))
    spool = new_spool(tmp_path)
    assert spool.end == 200
    assert spool.dropped == 0
    assert value_at(spool, 100) == 2


def test_a_record_magic_inside_damaged_audio_does_not_fool_the_reader(tmp_path: Path) -> None:
    fake = b"EDGR" * 50  # audio that happens to contain the record magic
    damaged = flipped(record(100, fake + pcm(2, 100)), 20)  # its checksum
    (tmp_path / "00000001.spool").write_bytes(
        file_header() + record(0, pcm(1, 100)) + damaged + record(300, pcm(3, 100))
        + record(400, pcm(4, 100)))
    spool = new_spool(tmp_path)
    assert [(r.start, r.end) for r in spool.records] == [(0, 100), (300, 400), (400, 500)]
    assert spool.dropped == len(damaged) // 2


def test_a_garbled_header_costs_its_own_bytes(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").write_bytes(
        b"G" * HEADER + record(0, pcm(1, 100)) + record(100, pcm(2, 100)))
    spool = new_spool(tmp_path, transcribed=1000)
    assert spool.dropped == HEADER // 2
    assert spool.end == 1200, "copied into this stream after its point"


def test_the_longest_record_allowed_is_read(tmp_path: Path) -> None:
    longest = pcm(3, 64 * SECOND)
    (tmp_path / "00000001.spool").write_bytes(file_header() + record(0, longest))
    spool = new_spool(tmp_path)
    assert spool.end == 64 * SECOND
    assert spool.dropped == 0


def test_damaged_files_are_put_aside_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "00000001.spool").write_bytes(file_header() + record(0, pcm(1, 100))
                                              + b"junk" * 10)
    (tmp_path / "00000002.spool").write_bytes(file_header(OTHER) + record(0, pcm(2, 100))
                                              + b"junk" * 10)
    with caplog.at_level(logging.ERROR, "edged.storage"):
        spool = new_spool(tmp_path)
        spool.release(spool.end)
    assert caplog.text.count("reason=damaged records") == 2
    assert len(list(tmp_path.glob("*.damaged-*"))) == 2


def test_a_file_with_nothing_readable_is_put_aside_as_such_not_salvaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "00000001.spool").write_bytes(bytes(range(256)) * 4)
    with caplog.at_level(logging.INFO):
        new_spool(tmp_path)
    assert "reason=no readable record" in caplog.text
    assert "storage.quarantined file=00000001.spool" in caplog.text
    assert "spool.salvaged" not in caplog.text, "nothing in it to salvage"
    assert len(list(tmp_path.glob("00000001.spool.damaged-*"))) == 1


def test_an_empty_segment_on_a_read_only_card_is_left_not_called_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "00000001.spool").write_bytes(file_header())  # cut off before a record
    with read_only(tmp_path), caplog.at_level(logging.INFO):
        new_spool(spool_dir)
    assert "spool.unlink_failed file=00000001.spool" in caplog.text
    assert "quarantine" not in caplog.text, "nothing in it was damaged"
    assert (spool_dir / "00000001.spool").exists()


def test_intact_files_of_a_lost_stream_are_adopted_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lost = Spool(tmp_path, 10 * MB, keep_free_bytes=0, keep_free_ratio=0)
    lost.recover(OTHER, 0)
    write_seconds(lost, 0, 40)  # two segments
    lost.close()
    spool = Spool(tmp_path, 10 * MB, keep_free_bytes=0, keep_free_ratio=0)
    with caplog.at_level(logging.INFO, "edged.spool"):
        position = spool.recover(STREAM, 100 * SECOND)
    assert "spool.salvaged seconds=40.0 files=2" in caplog.text
    assert position == spool.end == 140 * SECOND
    assert isinstance(position, int), "stream time is a whole number of samples"
    spool.append(spool.end, pcm(9, 100), 0.0)  # and goes on after it
    assert spool.end == 140 * SECOND + 100
    assert [value_at(spool, s * SECOND) for s in (100, 139)] == [1, 40]
    assert not list(tmp_path.glob("*.damaged-*"))


def test_files_with_unreadable_headers_are_each_adopted(tmp_path: Path) -> None:
    # Two files whose headers are gone, from streams whose positions overlap:
    # what does not collide with audio already kept is still adopted.
    (tmp_path / "00000001.spool").write_bytes(b"G" * HEADER + record(0, pcm(1, 100)))
    (tmp_path / "00000002.spool").write_bytes(
        b"G" * HEADER + record(0, pcm(2, 100)) + record(100, pcm(3, 100)))
    spool = new_spool(tmp_path, transcribed=1000)
    assert spool.end == 1200
    assert [value_at(spool, p) for p in (1000, 1100)] == [1, 3]


def test_a_file_that_turns_unreadable_during_recovery_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "00000001.spool").write_bytes(file_header(OTHER) + record(0, pcm(1, 100)))
    (tmp_path / "00000002.spool").write_bytes(file_header(OTHER) + record(100, pcm(2, 100)))
    reads: dict[str, int] = {}
    real = Path.read_bytes

    def flaky(path: Path) -> bytes:
        reads[path.name] = reads.get(path.name, 0) + 1
        if path.name == "00000001.spool" and reads[path.name] > 1:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    spool = new_spool(tmp_path, transcribed=1000)
    assert [(r.start, r.end) for r in spool.records] == [(1000, 1100)]
    assert value_at(spool, 1000) == 2


# -- writing -------------------------------------------------------------------------


def test_audio_already_spooled_is_not_written_again(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 1000.0)
    spool.append(0, pcm(1, 100), 1000.0)  # the same again: nothing new
    spool.append(50, pcm(2, 100), 2000.0)  # half of it is new
    assert [(r.start, r.end, r.wall) for r in spool.records] == [
        (0, 100, 1000.0), (100, 150, 2000.0 + 50 / SECOND)]
    assert spool.end == 150
    assert values(spool.read(100, 1000)[1]) == [2] * 50
    spool.close()
    assert [(r.start, r.end) for r in new_spool(tmp_path).records] == [(0, 100), (100, 150)]


def test_a_write_refused_by_a_full_disk_is_reported(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    (tmp_path / "00000001.spool").symlink_to("/dev/full")  # every write: ENOSPC
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.health.condition == "full"
    assert spool.last_error == "spool write: No space left on device"


def test_a_segment_is_closed_when_it_reaches_its_size(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    exactly = (SEGMENT_BYTES - HEADER - RECORD) // 2
    spool.append(0, pcm(1, exactly), 0.0)
    assert spool.size == SEGMENT_BYTES
    spool.append(exactly, pcm(2, 100), 0.0)
    assert len(list(tmp_path.glob("*.spool"))) == 2


def test_records_written_in_this_run_keep_their_capture_time(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    write_seconds(spool, 0, 3, wall=5000.0)
    assert [r.wall for r in spool.records] == [5000.0, 5001.0, 5002.0]
    assert all(isinstance(r.end, int) for r in spool.records)


def test_audio_of_every_segment_of_this_run_is_read_back(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    write_seconds(spool, 0, 70)  # three segments, none recovered
    assert [value_at(spool, s * SECOND + 5) for s in (1, 33, 66)] == [2, 34, 67]


def test_segments_are_private_and_not_inherited(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    (path,) = tmp_path.glob("*.spool")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert spool._writer is not None
    assert fcntl.fcntl(spool._writer.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_a_torn_write_is_cut_off_and_what_came_before_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)

    def half_then_full(fd: int, data: Any) -> int:
        flaky.overrides["write"] = fails(errno.ENOSPC, "No space left on device")
        return os.write(fd, bytes(data)[: len(data) // 2])

    flaky = FlakyOs(write=half_then_full)
    monkeypatch.setattr(spool_module, "os", flaky)
    spool.append(100, pcm(2, 100), 0.0)
    assert spool.health.condition == "full"
    assert spool.end == 100
    monkeypatch.undo()
    (path,) = tmp_path.glob("*.spool")
    assert path.stat().st_size == HEADER + RECORD + 200, "the torn record is cut off"


def test_a_torn_write_that_cannot_be_cut_off_is_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    monkeypatch.setattr(spool_module, "os", FlakyOs(
        write=fails(errno.EIO, "Input/output error"),
        ftruncate=fails(errno.EIO, "Input/output error"),
        close=fails(errno.EIO, "Input/output error")))
    spool.append(100, pcm(2, 100), 0.0)
    assert spool.health.condition == "io_error"
    assert spool.last_error == "spool write: Input/output error"


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "os", FlakyOs(
        write=lambda fd, data: os.write(fd, bytes(data)[:100])))
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 1000), 0.0)
    monkeypatch.undo()
    spool.close()
    assert values(new_spool(tmp_path).read(0, 10_000)[1]) == [1] * 1000


def test_the_start_of_a_backlog_on_disk_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = new_spool(tmp_path)
    with caplog.at_level(logging.INFO, "edged.spool"):
        write_seconds(spool, 2, 3)
    lines = [line for line in caplog.text.splitlines() if "spool.writing" in line]
    assert len(lines) == 1
    assert "spool.writing from=2.000s reason=untranscribed_audio_while_offline" in lines[0]


# -- syncing ------------------------------------------------------------------------------


def test_records_are_synced_once_a_second_not_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(spool_module.time, "monotonic", lambda: clock[0])
    flaky = FlakyOs()
    monkeypatch.setattr(spool_module, "os", flaky)
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    after_open = flaky.fsyncs  # the new segment's header
    for n in range(1, 10):
        clock[0] = 100.0 + n / 10
        spool.append(n * 100, pcm(1, 100), 0.0)
    assert flaky.fsyncs == after_open, "within a second: no sync"
    clock[0] = 101.0  # a second after the segment was created and synced
    spool.append(1000, pcm(1, 100), 0.0)
    assert flaky.fsyncs == after_open + 1
    spool.sync()
    spool.sync()
    assert flaky.fsyncs == after_open + 1, "nothing new: nothing to sync"
    spool.append(1100, pcm(1, 100), 0.0)
    spool.sync()
    assert flaky.fsyncs == after_open + 2, "leaving an outage makes it durable"


def test_a_failing_sync_is_reported_and_the_next_write_starts_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    monkeypatch.setattr(spool_module, "os", FlakyOs(fsync=fails(errno.EIO,
                                                                "Input/output error")))
    spool.sync()
    assert spool.health.condition == "io_error"
    assert spool.last_error == "spool sync: Input/output error"
    monkeypatch.undo()
    assert spool.retry()
    spool.append(100, pcm(2, 100), 0.0)
    assert len(list(tmp_path.glob("*.spool"))) == 2


def test_writing_goes_on_after_a_close(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    spool.close()
    spool.close()
    spool.append(100, pcm(2, 100), 0.0)
    assert values(spool.read(100, 1000)[1]) == [2] * 100


# -- limits ----------------------------------------------------------------------------------


def test_a_record_that_just_fits_the_limit_is_written(tmp_path: Path) -> None:
    spool = new_spool(tmp_path, max_bytes=RECORD + 200)
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.end == 100


def test_a_full_spool_drops_its_oldest_segment_and_keeps_the_newest_audio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = new_spool(tmp_path, max_bytes=3 * MB // 2)  # room for one and a half segments
    with caplog.at_level(logging.WARNING, "edged.spool"):
        write_seconds(spool, 0, 100)
    assert spool.end == 100 * SECOND, "the newest audio is always written"
    assert spool.size <= 3 * MB // 2
    assert spool.dropped == spool.start
    assert spool.dropped > 32 * SECOND, "more than one segment went, each counted"
    assert "limit=spool_max_mb" in caplog.text
    assert "limit=keep_free" not in caplog.text


def test_a_full_spool_of_one_segment_keeps_it_and_refuses_more(tmp_path: Path) -> None:
    spool = new_spool(tmp_path, max_bytes=SECOND * 2 * 5)  # five seconds
    write_seconds(spool, 0, 10)
    assert (spool.start, spool.end) == (0, 4 * SECOND)
    assert spool.dropped == 0
    assert spool.health.condition == "full"


def test_an_old_segment_alone_over_the_limit_makes_room_for_new_audio(tmp_path: Path) -> None:
    write_seconds(new_spool(tmp_path), 0, 5)
    spool = new_spool(tmp_path, max_bytes=SECOND * 2 * 5)  # recovered: no segment open
    write_seconds(spool, 5, 2)
    assert (spool.start, spool.end) == (5 * SECOND, 7 * SECOND)
    assert spool.dropped == 5 * SECOND


def test_the_reserve_is_reported_while_it_lasts(tmp_path: Path) -> None:
    spool = new_spool(tmp_path, keep_free_bytes=1 << 62)
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.health.condition == "full"
    assert spool.last_error == "spool: free space at the reserve: audio kept in memory only"
    spool.keep_free_bytes = 0  # space comes back
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.health.condition == "ok"
    assert spool.end == 100
    spool.keep_free_bytes = 1 << 62  # and runs out again
    spool.append(100, pcm(1, 100), 0.0)
    assert spool.health.condition == "full"


def test_the_reserve_drops_old_segments_first_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_seconds(new_spool(tmp_path), 0, 5)
    spool = new_spool(tmp_path)
    spool.keep_free_bytes = 1 << 62
    with caplog.at_level(logging.WARNING, "edged.spool"):
        spool.append(5 * SECOND, pcm(1, 100), 0.0)
    assert "limit=keep_free" in caplog.text
    assert spool.dropped == 5 * SECOND


def test_the_reserve_as_a_share_of_the_filesystem(tmp_path: Path) -> None:
    spool = new_spool(tmp_path, keep_free_bytes=0, keep_free_ratio=1.0)
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.health.condition == "full"


def test_a_spool_directory_not_there_yet_is_made_on_the_first_write(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "later", 10 * MB)
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.end == 100
    assert list((tmp_path / "later").glob("*.spool"))


def free_space_is(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    real = os.statvfs

    class Stats:
        def __init__(self, path: Any) -> None:
            stats = real(path)
            self.f_frsize, self.f_blocks = 1, 10**12
            self.f_bavail = available
            self.f_flag = stats.f_flag

    monkeypatch.setattr(spool_module.os, "statvfs", Stats)


@pytest.mark.parametrize(("reserve", "written"), [(1000, True), (1001, False)])
def test_the_reserve_counts_the_write_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: int, written: bool
) -> None:
    spool = new_spool(tmp_path, keep_free_bytes=reserve)
    free_space_is(monkeypatch, 1000 + RECORD + 200)
    spool.append(0, pcm(1, 100), 0.0)
    assert (spool.end == 100) is written


@pytest.mark.parametrize(("reserve", "error"), [
    (0, "spool write: No space left on device"),  # no reserve: the disk's own "full"
    (1, "spool: free space at the reserve: audio kept in memory only"),
])
def test_a_write_that_does_not_fit_is_refused_by_the_reserve_if_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: int, error: str
) -> None:
    spool = new_spool(tmp_path, keep_free_bytes=reserve)
    free_space_is(monkeypatch, 100)
    (tmp_path / "00000001.spool").symlink_to("/dev/full")
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.last_error == error


# -- trying the disk again ----------------------------------------------------------------


def test_a_healthy_spool_can_be_written(tmp_path: Path) -> None:
    assert new_spool(tmp_path).retry()
    assert not list(tmp_path.iterdir()), "the probe is gone again"


def test_a_retry_that_fails_says_why_and_a_later_one_recovers(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = new_spool(spool_dir)
    (spool_dir / "00000001.spool").symlink_to("/dev/full")
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.health.condition == "full"
    shutil.rmtree(spool_dir)
    spool_dir.write_bytes(b"")  # now not even a directory
    assert not spool.retry()
    assert spool.health.condition == "unwritable"
    assert spool.last_error == "spool retry: Not a directory (.probe)"
    spool_dir.unlink()
    assert spool.retry()
    assert spool.health.condition == "ok"
    spool.append(0, pcm(1, 100), 0.0)
    assert spool.end == 100


def test_a_permission_error_on_a_read_only_card_is_reported_as_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    spool = new_spool(state / "spool")
    # As edged's own user (not root) sees it: EACCES before EROFS.
    monkeypatch.setattr(spool_module, "os", FlakyOs(
        open=fails(errno.EACCES, "Permission denied")))
    with read_only(state):
        spool.append(0, pcm(1, 100), 0.0)
        assert spool.health.condition == "read_only"
        assert not spool.retry()
        assert spool.health.condition == "read_only"


# -- reading --------------------------------------------------------------------------


def test_reads_stop_at_the_record_and_at_whole_samples(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    spool.append(100, pcm(2, 100), 0.0)
    assert spool.read(0, 50) == (0, pcm(1, 25))
    assert spool.read(0, 51) == (0, pcm(1, 25))
    assert spool.read(60, 10_000) == (60, pcm(1, 40)), "the rest of its record, no more"
    assert spool.read(100, 10_000) == (100, pcm(2, 100))
    assert spool.read(200, 10_000) == (200, b""), "nothing after the end"
    assert spool.read(10_000, 10_000) == (10_000, b"")


def test_a_read_in_a_gap_gives_the_next_record(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    spool.append(500, pcm(2, 100), 0.0)  # 100..500 never spooled
    spool.append(600, pcm(3, 100), 0.0)
    assert spool.read(100, 10_000) == (500, pcm(2, 100))
    assert spool.read(300, 10_000) == (500, pcm(2, 100))
    assert spool.read(600, 2) == (600, pcm(3, 1))


def test_a_segment_gone_from_under_the_spool_reads_as_nothing(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    spool.append(100, pcm(2, 100), 0.0)
    spool.close()
    (path,) = tmp_path.glob("*.spool")
    path.unlink()
    assert spool.read(0, 10_000) == (100, b"")


# -- releasing ------------------------------------------------------------------------


def test_a_single_record_once_transcribed_is_deleted(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    spool.append(0, pcm(1, 100), 0.0)
    spool.release(100)
    assert spool.records == []
    assert not list(tmp_path.glob("*.spool"))
    spool.append(100, pcm(2, 100), 0.0)  # and spooling goes on in a new file
    assert values(spool.read(100, 1000)[1]) == [2] * 100
    spool.close()
    assert new_spool(tmp_path).end == 200


def test_release_deletes_old_segments_while_the_current_one_is_written(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    write_seconds(spool, 0, 40)  # two segments, the second being written
    spool.release(35 * SECOND)
    assert len(list(tmp_path.glob("*.spool"))) == 1
    assert spool.start == 32 * SECOND or spool.start == 31 * SECOND


def test_release_keeps_a_segment_until_its_last_record_is_transcribed(tmp_path: Path) -> None:
    write_seconds(new_spool(tmp_path), 0, 70)  # three segments
    spool = new_spool(tmp_path)  # recovered: none is being written
    first_end = spool.records[0].end
    second_to_last = next(r for r in reversed(spool.records) if r.segment == 1 and
                          r.end < 31 * SECOND)
    spool.release(second_to_last.end)  # all of the first segment but its last record
    assert spool.start == 0
    assert len(list(tmp_path.glob("*.spool"))) == 3
    spool.release(first_end + 2)  # the second record of the first segment
    assert len(list(tmp_path.glob("*.spool"))) == 3
    spool.release(40 * SECOND)  # inside the second segment
    assert len(list(tmp_path.glob("*.spool"))) == 2
    assert value_at(spool, 40 * SECOND) == 41


def test_a_spool_directory_removed_from_under_it_is_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = new_spool(tmp_path / "spool")
    write_seconds(spool, 0, 2)
    shutil.rmtree(tmp_path / "spool")
    with caplog.at_level(logging.WARNING, "edged.spool"):
        spool.release(2 * SECOND)
    assert spool.records == []
    assert "spool.unlink_failed" not in caplog.text


def test_an_emptied_spool_says_so_once_all_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = new_spool(tmp_path)
    write_seconds(spool, 0, 30)  # two segments
    with caplog.at_level(logging.INFO, "edged.spool"):
        spool.release(25 * SECOND)  # the first segment goes, the second stays
        assert spool.records
        assert "spool.emptied" not in caplog.text
        spool.release(30 * SECOND)
    assert spool.records == []
    assert "spool.emptied up_to=30.000s" in caplog.text


def test_a_stop_says_how_much_audio_stays_on_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = new_spool(tmp_path)
    write_seconds(spool, 4, 3)
    spool.append(7 * SECOND, pcm(1, SECOND // 2), 0.0)
    with caplog.at_level(logging.INFO, "edged.spool"):
        spool.close()
    assert "spool.kept seconds=3.5 files=1 replayed_on_next_start=true" in caplog.text
