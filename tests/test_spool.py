"""The disk spool: audio on disk only while offline, recovered after restarts,
corrupt or torn segments skipped with a log line."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from edged.audio.buffer import AudioBuffer
from edged.audio.spool import Spool
from edged.storage import StorageHealth
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.stt_double import SessionRecord, SttDouble
from tests.support.tonespeech import script
from tests.support.waiting import wait_until
from tests.test_end_to_end import assert_captured_at, assert_matches_truth, collect_finals

MB = 1024 * 1024


def pcm(seconds: float, value: int = 1) -> bytes:
    return value.to_bytes(2, "little", signed=True) * round(seconds * 16_000)


STREAM = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
SECOND = 16_000


def spooled(directory: Path, seconds: int, stream: str = STREAM, first: int = 0) -> None:
    """`seconds` of audio in quarter-second records, each sample = its second + 1."""
    spool = Spool(directory, 10 * MB)
    spool.recover(stream, first)
    for quarter in range(seconds * 4):
        second = quarter // 4
        spool.append(first + quarter * SECOND // 4, pcm(0.25, second + 1), wall=1000.0 + second)
    spool.close()


def value_at(spool: Spool, position: int) -> int:
    start, data = spool.read(position, 2)
    assert start == position, f"no audio at {position}"
    return int.from_bytes(data[:2], "little", signed=True)


def test_write_read_and_recover_round_trip(tmp_path: Path) -> None:
    spooled(tmp_path, 3)
    again = Spool(tmp_path, 10 * MB)
    assert again.recover(STREAM, 0) == 3 * SECOND
    assert value_at(again, 0) == 1
    assert value_at(again, 2 * SECOND + 5) == 3
    assert [r.wall for r in again.records][::4] == [1000.0, 1001.0, 1002.0]


def test_recovery_resumes_exactly_at_the_transcription_point(tmp_path: Path) -> None:
    spooled(tmp_path, 70)  # three segments of about 32 s
    point = 40 * SECOND + 1234  # inside a record of the second segment
    again = Spool(tmp_path, 10 * MB)
    assert again.recover(STREAM, point) == 70 * SECOND
    assert again.read(0, 2)[0] == 40 * SECOND, "nothing before the record holding the point"
    assert value_at(again, point) == 41
    assert len(list(tmp_path.glob("*.spool"))) == 2, "the segment wholly behind it is deleted"
    again.release(again.end)
    assert not list(tmp_path.glob("*.spool"))


def test_damaged_records_are_skipped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spooled(tmp_path, 70)
    files = sorted(tmp_path.glob("*.spool"))
    assert len(files) == 3
    first = bytearray(files[0].read_bytes())
    first[len(first) // 2] ^= 0xFF  # one flipped byte in the middle of the first segment
    files[0].write_bytes(bytes(first))
    files[1].write_bytes(files[1].read_bytes()[:-1000])  # torn last record

    with caplog.at_level(logging.WARNING, "edged.spool"):
        recovered = Spool(tmp_path, 10 * MB)
        assert recovered.recover(STREAM, 0) == 70 * SECOND

    assert "reason=bad_checksum" in caplog.text
    assert "reason=truncated_audio" in caplog.text
    held = sum(r.end - r.start for r in recovered.records)
    # Lost: the quarter second holding the flipped byte and the torn record.
    assert held == 70 * SECOND - 2 * SECOND // 4
    assert recovered.dropped >= SECOND // 4, "what the damage took is counted"
    assert value_at(recovered, 17 * SECOND) == 18, "the audio after the damage is still there"
    assert value_at(recovered, 69 * SECOND) == 70
    # Once done with, damaged files are put aside, not deleted.
    recovered.release(70 * SECOND)
    assert len(list(tmp_path.glob("*.spool.damaged-*"))) == 2
    assert not list(tmp_path.glob("*.spool"))


def test_a_file_with_a_garbled_header_is_salvaged_and_quarantined(tmp_path: Path) -> None:
    spooled(tmp_path, 5)
    (path,) = tmp_path.glob("*.spool")
    data = bytearray(path.read_bytes())
    data[:8] = b"GARBAGE!"
    path.write_bytes(bytes(data))
    recovered = Spool(tmp_path, 10 * MB)
    assert recovered.recover(STREAM, 0) == 5 * SECOND
    assert value_at(recovered, 4 * SECOND) == 5, "records copied into this stream"
    assert list(tmp_path.glob("*.spool.damaged-*")), "the original is kept aside"
    again = Spool(tmp_path, 10 * MB)  # and the copy is what the next start finds
    assert again.recover(STREAM, 0) == 5 * SECOND


def test_audio_of_a_lost_outbox_is_kept_after_its_own_point(tmp_path: Path) -> None:
    spooled(tmp_path, 6, stream=OTHER)
    recovered = Spool(tmp_path, 10 * MB)
    # The new stream is at 100 s; the lost one had transcribed its first 2 s.
    end = recovered.recover(STREAM, 100 * SECOND, previous=(OTHER, 2 * SECOND))
    assert end == 104 * SECOND
    assert value_at(recovered, 100 * SECOND) == 3
    assert Spool(tmp_path, 10 * MB).recover(STREAM, 100 * SECOND) == 104 * SECOND


def test_full_spool_drops_the_oldest_segment_and_counts_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * MB, keep_free_bytes=0, keep_free_ratio=0)
    for second in range(130):
        spool.append(second * SECOND, pcm(1.0), wall=0.0)
    assert spool.size <= 2 * MB
    assert spool.dropped > 0
    assert spool.start is not None
    assert spool.start >= spool.dropped


def test_the_free_space_reserve_stops_the_spool(tmp_path: Path) -> None:
    health = StorageHealth()
    spool = Spool(tmp_path, 10 * MB, health, keep_free_bytes=1 << 62)
    spool.append(0, pcm(1.0), wall=0.0)
    assert not list(tmp_path.glob("*.spool"))
    assert health.condition == "full"
    assert "reserve" in (health.reason or "")


def test_audio_reaches_disk_only_while_offline(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10 * MB)
    buffer = AudioBuffer(max_samples=5 * SECOND, spool=spool)
    buffer.session_opened()
    for _ in range(100):
        buffer.append(pcm(0.1))
        buffer.mark_sent(buffer.head)
        buffer.acknowledge(buffer.head)
    assert not list(tmp_path.glob("*.spool")), "no disk writes while streaming"
    buffer.session_lost(buffer.head)
    for _ in range(100):  # ten seconds offline: twice the memory
        buffer.append(pcm(0.1))
    assert list(tmp_path.glob("*.spool"))
    assert buffer.dropped == 0
    assert buffer.read(buffer.oldest, 10).start == 10 * SECOND  # the outage's first sample
    buffer.session_opened()
    buffer.append(pcm(0.1))  # replaying: new audio goes to disk too
    assert spool.end == buffer.head
    buffer.mark_sent(buffer.head)  # caught up: the tail is memory only again
    buffer.append(pcm(0.1))
    assert spool.end == buffer.head - SECOND // 10
    buffer.acknowledge(buffer.head)
    assert not list(tmp_path.glob("*.spool")), "the spool is deleted once acknowledged"


def test_the_spool_releases_only_behind_the_durable_point(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10 * MB)
    durable = 0
    buffer = AudioBuffer(max_samples=5 * SECOND, spool=spool, release_limit=lambda: durable)
    buffer.session_lost(0)
    for _ in range(400):  # 40 s: two segments
        buffer.append(pcm(0.1))
    buffer.acknowledge(buffer.head)
    assert len(list(tmp_path.glob("*.spool"))) == 2, "not durable yet: nothing deleted"
    durable = buffer.head
    buffer.acknowledge(buffer.head)
    assert not list(tmp_path.glob("*.spool"))


def test_outage_longer_than_memory_loses_nothing(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon(buffer={"max_seconds": 5}, stt={"replay_speed": 3.0})
    daemon.wait_for_log("stt.connected")
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
    stt.abort_connections()  # the network dies; reconnects are refused
    audio, truth = script([["alpha", "bravo"], ["charlie"], ["delta", "echo"],
                           ["foxtrot"], ["golf", "hotel"], ["alpha"]], pause_s=1.0)
    offset = mic.play(audio)  # about 10 s of speech while the service is down
    mic.wait_idle()
    wait_until(lambda: list((stack.home / "state" / "spool").glob("*.spool")),
               "an outage longer than memory spilling to disk")
    stt.faults.refuse_count = 0

    finals = collect_finals(subscriber, 6, timeout=60)

    assert_matches_truth(finals, truth, offset, mic)  # stamped when said, not when replayed
    assert [final["seq"] for final in finals] == [1, 2, 3, 4, 5, 6]
    assert len(stt.sessions) == 2
    assert_paced(stt.sessions[1], speed=3.0)
    state = _retained_state(stack)
    assert state["dropped_s"] == 0.0
    stop_keeping_the_rest(daemon, stack.home / "state")


def assert_paced(session: SessionRecord, speed: float) -> None:
    """The backlog went out at `speed` x real time: never faster (beyond the
    pacer's half second to start with), and not much slower."""
    start, sent = session.frame_times[0], 0.0
    for at, size in zip(session.frame_times, session.frame_sizes, strict=True):
        sent += size / 32_000
        assert sent <= speed * (at - start) + 0.5 + 0.1, (
            f"{sent:.2f} s of audio within {at - start:.2f} s at replay_speed {speed}")
    first_two = sum(size for at, size in zip(session.frame_times, session.frame_sizes,
                                             strict=True) if at - start <= 2.0) / 32_000
    assert first_two >= 0.8 * (2.0 * speed + 0.5), f"only {first_two:.2f} s in the first 2 s"


def _retained_state(stack: Stack) -> dict:
    """The state as the broker holds it now."""
    watcher = Subscriber(stack.broker.port, "edged/testpi/#")
    try:
        watcher.sync()
        states = [m.json() for m in watcher.pending() if m.topic == "edged/testpi/state"]
    finally:
        watcher.close()
    assert states, "no retained state"
    return states[-1]


def test_backlog_on_disk_is_replayed_after_a_restart(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    first = stack.daemon()
    first.wait_for_log("stt.connected")
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
    stt.abort_connections()
    audio, truth = script([["hotel", "golf"], ["echo"]])
    offset = mic.play(audio)
    mic.wait_read(offset + truth[-1][-1].end + 0.5)  # the daemon has all of it
    first.signal(signal.SIGTERM)  # stops with the speech untranscribed
    assert first.wait(20) == 0
    assert list((stack.home / "state" / "spool").glob("*.spool"))

    stt.faults.refuse_count = 0
    second = stack.daemon()
    second.wait_for_log("spool.recovered")
    finals = collect_finals(subscriber, 2, timeout=30)
    assert [f["text"] for f in finals] == ["Hotel golf.", "Echo."]
    # Replayed by another process, seconds later: stamped when it was said.
    assert_captured_at(finals, truth, offset, mic)


def test_full_disk_degrades_to_memory_says_so_and_comes_back(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").symlink_to("/dev/full")  # every write: ENOSPC
    health = StorageHealth()
    spool = Spool(tmp_path, 10 * MB, health, keep_free_bytes=0, keep_free_ratio=0)
    buffer = AudioBuffer(max_samples=2 * SECOND, spool=spool)
    buffer.session_lost(0)
    for _ in range(30):  # 3 s offline: more than memory holds
        buffer.append(pcm(0.1))
    assert health.condition == "full"
    assert "No space left" in (spool.last_error or "")
    assert buffer.dropped == SECOND, "what memory could not hold is counted, nothing crashes"
    assert buffer.read(0, 10**6).samples == 2 * SECOND
    assert spool.retry(), "the directory itself is writable"
    assert health.condition == "ok"
    buffer.persist()  # what memory holds goes to disk
    buffer.append(pcm(0.1))
    assert spool.start == SECOND
    assert spool.end == buffer.head


def test_a_file_with_nothing_readable_is_put_aside_once_not_counted_at_every_start(
    tmp_path: Path,
) -> None:
    (tmp_path / "00000001.spool").write_bytes(bytes(range(256)) * 4)
    first = Spool(tmp_path, 10 * MB)
    first.recover(STREAM, 0)
    assert not list(tmp_path.glob("*.spool"))
    assert len(list(tmp_path.glob("*.spool.damaged-*"))) == 1
    again = Spool(tmp_path, 10 * MB)
    again.recover(STREAM, 0)
    assert again.dropped == 0, "counted once, by the start that found it"
