"""The disk spool: audio on disk only while offline, recovered after restarts,
corrupt or torn segments skipped with a log line."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest

from edged.audio.buffer import AudioBuffer
from edged.audio.spool import RECORD_BYTES, Spool
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_end_to_end import assert_matches_truth, collect_finals

MB = 1024 * 1024


def pcm(seconds: float, value: int = 1) -> bytes:
    return value.to_bytes(2, "little", signed=True) * round(seconds * 16_000)


def test_write_read_and_recover_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10 * MB)
    spool.append(0, pcm(1.5, 7), wall=1000.0)
    spool.append(24_000, pcm(1.0, 9), wall=1001.5)
    spool.close()
    again = Spool(tmp_path, 10 * MB)
    walls = []
    assert again.recover(lambda record: walls.append(record.wall)) == 40_000
    start, data = again.read(20_000, 10 * MB)
    assert start == 20_000
    assert data[:2] == (7).to_bytes(2, "little")
    assert walls[0] == 1000.0


def test_torn_and_corrupt_segments_are_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, 10 * MB)
    for second in range(70):  # three segments of ~32 s
        spool.append(second * 16_000, pcm(1.0, second + 1), wall=float(second))
    spool.close()
    files = sorted(tmp_path.glob("*.spool"))
    assert len(files) == 3
    first = bytearray(files[0].read_bytes())
    first[len(first) // 2] ^= 0xFF  # a flipped bit in the middle of the first segment
    files[0].write_bytes(bytes(first))
    files[1].write_bytes(files[1].read_bytes()[:-1000])  # torn last record
    (tmp_path / "00000099.spool").write_bytes(b"garbage")

    with caplog.at_level(logging.WARNING, "edged.spool"):
        recovered = Spool(tmp_path, 10 * MB)
        samples = recovered.recover()

    assert "reason=bad_checksum" in caplog.text
    assert "reason=truncated_audio" in caplog.text
    assert "reason=bad_header" in caplog.text
    # Segments hold 32 s. Lost: 17 s after the flipped bit, the last second
    # of the torn one. The holes keep their place in stream time, counted.
    assert samples == 70 * 16_000
    assert recovered.dropped == 18 * 16_000
    # The audio after the damage is still there, in order.
    _, data = recovered.read(samples - 16_000, RECORD_BYTES)
    assert data[:2] == (70).to_bytes(2, "little")


def test_full_spool_drops_the_oldest_segment_and_counts_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 2 * MB)  # room for about two segments
    for second in range(130):
        spool.append(second * 16_000, pcm(1.0), wall=0.0)
    spool.flush()
    assert spool.size <= 2 * MB + RECORD_BYTES
    assert spool.dropped > 0
    assert spool.start is not None
    assert spool.start >= spool.dropped


def test_audio_reaches_disk_only_while_offline(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10 * MB)
    buffer = AudioBuffer(max_samples=5 * 16_000, spool=spool)
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
    assert buffer.read(buffer.oldest, 10).start == 10 * 16_000  # the outage's first sample
    buffer.session_opened()
    buffer.acknowledge(buffer.head)
    assert not list(tmp_path.glob("*.spool")), "the spool is deleted once acknowledged"


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
    time.sleep(1)
    spooled = list((stack.home / "state" / "spool").glob("*.spool"))
    assert spooled, "an outage longer than memory must spill to disk"
    stt.faults.refuse_count = 0

    finals = collect_finals(subscriber, 6, timeout=60)

    assert_matches_truth(finals, truth, offset)
    assert '"dropped_s":0.0' in _last_state(subscriber)


def _last_state(subscriber: Subscriber) -> str:
    deadline = time.monotonic() + 5
    payload = ""
    while time.monotonic() < deadline:
        try:
            payload = subscriber.next("edged/testpi/state", timeout=1).payload.decode()
        except TimeoutError:
            break
    return payload


def test_backlog_on_disk_is_replayed_after_a_restart(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    first = stack.daemon()
    first.wait_for_log("stt.connected")
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
    stt.abort_connections()
    audio, _ = script([["hotel", "golf"], ["echo"]])
    mic.play(audio)
    mic.wait_idle()
    time.sleep(0.5)
    first.signal(signal.SIGTERM)  # stops with the speech untranscribed
    assert first.wait(20) == 0
    assert list((stack.home / "state" / "spool").glob("*.spool"))

    stt.faults.refuse_count = 0
    second = stack.daemon()
    second.wait_for_log("spool.recovered")
    finals = collect_finals(subscriber, 2, timeout=30)
    assert [f["text"] for f in finals] == ["Hotel golf.", "Echo."]
    assert finals[0]["time"] < time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))


def test_full_disk_degrades_to_memory_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "00000001.spool").symlink_to("/dev/full")  # every write: ENOSPC
    spool = Spool(tmp_path, 10 * MB)
    buffer = AudioBuffer(max_samples=2 * 16_000, spool=spool)
    buffer.session_lost(0)
    for _ in range(30):  # 3 s offline: more than memory holds
        buffer.append(pcm(0.1))
    assert not spool.enabled
    assert spool.last_error is not None
    assert "No space left" in spool.last_error
    assert buffer.dropped == 16_000, "what memory could not hold is counted, nothing crashes"
    assert buffer.read(0, 10**6).samples == 2 * 16_000
