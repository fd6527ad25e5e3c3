"""The state directory fails as an SD card does, for real: a tmpfs filled to
the brim, a read-only mount, a directory nobody may write, damaged files.
edged keeps capturing, streaming and publishing, says what is wrong, and
goes back to durable operation when the disk does."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.daemon import Daemon
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.storage import NOBODY, chown_tree, fill, read_only, tmpfs
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script, silence
from tests.test_end_to_end import assert_matches_truth, collect_finals

STATE = "edged/testpi/state"


def wait_for_state(subscriber: Subscriber, want: Callable[[dict[str, Any]], bool],
                   timeout: float = 20.0) -> dict[str, Any]:
    """The first retained state that satisfies `want`; fails loudly after `timeout`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = subscriber.next(STATE, timeout=deadline - time.monotonic()).json()
        except TimeoutError:
            break
        if want(last):
            return last
    raise AssertionError(f"no such state within {timeout}s; the last was {last}")


def assert_clean_stop(daemon: Daemon) -> None:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, daemon.log
    assert "Traceback" not in daemon.log
    assert "edged.fatal" not in daemon.log


def start(stack: Stack, **overrides: Any) -> Daemon:
    # A failing disk is tried again every second, not every 30.
    daemon = stack.daemon(env={"EDGED_STATE_RETRY_S": "1"}, **overrides)
    daemon.wait_for_log("stt.connected")
    return daemon


def test_a_state_disk_full_to_the_brim_loses_no_word_and_recovers(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    with tmpfs(stack.home / "state", size_kb=4096) as state:
        daemon = start(stack, buffer={"spool_keep_free_mb": 0, "spool_keep_free_percent": 0})
        stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
        stt.abort_connections()  # an outage: the spool writes until the disk is full
        filler = fill(state, leave_bytes=96 * 1024)  # about three seconds of audio
        audio, truth = script([["alpha", "bravo"], ["charlie"], ["delta"], ["echo", "golf"],
                               ["hotel"]], pause_s=1.0)
        offset = mic.play(audio)
        full = wait_for_state(subscriber, lambda s: s["storage"] == "full")
        assert "No space left" in full["storage_error"]
        mic.wait_idle()
        stt.faults.refuse_count = 0  # the service is back; the outbox cannot commit

        finals = collect_finals(subscriber, len(truth), timeout=60)

        assert_matches_truth(finals, truth, offset)
        assert len({f["seq"] for f in finals}) == len(finals)
        assert daemon.process is not None
        assert daemon.process.poll() is None, "no crash"
        filler.unlink()
        recovered = wait_for_state(subscriber, lambda s: s["storage"] == "ok")
        assert recovered["outbox_depth"] == 0
        assert "storage.recovered" in daemon.log
        stop_keeping_the_rest(daemon, state)  # the outage's replay is not over yet


def test_the_spool_stops_at_the_free_space_reserve(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    with tmpfs(stack.home / "state", size_kb=8192) as state:
        daemon = start(stack, buffer={"spool_keep_free_mb": 4, "spool_keep_free_percent": 0})
        fill(state, leave_bytes=4 * 1024 * 1024 + 64 * 1024)  # two seconds above the reserve
        stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
        stt.abort_connections()
        audio, truth = script([["foxtrot"], ["golf", "hotel"], ["alpha"]], pause_s=1.0)
        offset = mic.play(audio)
        full = wait_for_state(subscriber, lambda s: s["storage"] == "full")
        assert "reserve" in full["storage_error"]
        stats = os.statvfs(state)
        assert stats.f_bavail * stats.f_frsize >= 4 * 1024 * 1024, "the reserve is kept free"
        mic.wait_idle()
        stt.faults.refuse_count = 0

        assert_matches_truth(collect_finals(subscriber, len(truth), timeout=60), truth, offset)
        # Stopped while the outage is still being replayed, with the disk at its
        # reserve: what is left waits in memory only, and a stop cannot keep it.
        daemon.allow("stt.close_timeout")
        assert_clean_stop(daemon)


def test_a_read_only_state_directory_is_reported_and_transcripts_still_flow(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    first = start(stack)  # an outbox and a stream from an earlier run
    audio, _ = script([["alpha"]])
    mic.play(audio)
    stream = collect_finals(subscriber, 1)[0]["stream_id"]
    assert_clean_stop(first)

    with read_only(stack.home / "state"):
        daemon = start(stack)
        # Read-only storage does not stop the audio: streaming, and saying why not durable.
        wait_for_state(subscriber,
                       lambda s: s["storage"] == "read_only" and s["status"] == "streaming")
        audio, _ = script([["bravo", "charlie"], ["delta"]])
        mic.play(audio)
        finals = collect_finals(subscriber, 2)
        # Stream time goes on from the last run's transcription point, not
        # from the microphone's start: words and identity are compared here.
        assert [f["text"] for f in finals] == ["Bravo charlie.", "Delta."]
        assert {f["stream_id"] for f in finals} == {stream}, "the stream goes on"
        assert [f["seq"] for f in finals] == [2, 3]
    # The mount is gone: the disk is writable again, and is used again.
    wait_for_state(subscriber, lambda s: s["storage"] == "ok")
    daemon.wait_for_log("outbox.durable_again")
    assert_clean_stop(daemon)
    again = start(stack)
    audio, _ = script([["echo"]])
    mic.play(audio)
    final = collect_finals(subscriber, 1)[0]
    assert (final["stream_id"], final["seq"]) == (stream, 4), "no seq was used twice"
    assert_clean_stop(again)


# Root, as CI runs, ignores file modes: the daemon runs as root without the
# capabilities that override them, as a service with a dropped bounding set.
NO_DAC = ["setpriv", "--inh-caps=-all",
          "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown", "--"]


@pytest.mark.parametrize("how", ["mode_0555", "owned_by_another_user"])
def test_an_unwritable_state_directory_is_reported_not_a_crash_loop(
    stack: Stack, mic: FifoMic, subscriber: Subscriber, how: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory root cannot write")
    state = stack.home / "state"
    first = start(stack)
    audio, _ = script([["alpha"]])
    mic.play(audio)
    collect_finals(subscriber, 1)
    assert_clean_stop(first)
    if how == "mode_0555":
        state.chmod(0o555)
        (state / "outbox.sqlite3").chmod(0o444)
    else:
        chown_tree(state, NOBODY, NOBODY)
        state.chmod(0o700)
    try:
        daemon = start(stack, wrap=NO_DAC)
        wait_for_state(subscriber, lambda s: s["storage"] in ("unwritable", "read_only"))
        audio, _ = script([["bravo"], ["charlie", "delta"]])
        mic.play(audio)
        assert [f["text"] for f in collect_finals(subscriber, 2)] == ["Bravo.", "Charlie delta."]
        assert_clean_stop(daemon)
    finally:
        chown_tree(state, 0, 0)
        state.chmod(0o755)


def test_damaged_outbox_and_spool_are_quarantined_and_the_audio_replayed(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    state = stack.home / "state"
    first = start(stack)
    audio, _ = script([["alpha"]])
    mic.play(audio)
    old_stream = collect_finals(subscriber, 1)[0]["stream_id"]
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
    stt.abort_connections()
    first.wait_for_log("stt.disconnected")
    audio, truth = script([["bravo", "charlie"], ["delta"], ["echo"]], pause_s=1.0)
    mic.play(silence(1.0) + audio)  # silence first: the damaged record below holds no word
    mic.wait_idle()
    assert_clean_stop(first)  # the speech stays on disk, untranscribed

    outbox = state / "outbox.sqlite3"
    data = bytearray(outbox.read_bytes())
    data[:16] = b"garbled header!!"
    outbox.write_bytes(bytes(data))
    (segment,) = sorted((state / "spool").glob("*.spool"))
    data = bytearray(segment.read_bytes())
    data[24 + 24 + 100] ^= 0xFF  # inside the first record's audio
    segment.write_bytes(bytes(data))

    stt.faults.refuse_count = 0
    second = start(stack)
    finals = collect_finals(subscriber, len(truth), timeout=60)

    assert [f["text"] for f in finals] == ["Bravo charlie.", "Delta.", "Echo."]
    assert {f["stream_id"] for f in finals} != {old_stream}, "a new outbox, a new stream"
    assert [f["seq"] for f in finals] == [1, 2, 3]
    assert "reason=bad_checksum" in second.log
    assert list(state.glob("outbox.sqlite3.damaged-*")), "the outbox is kept aside"
    assert_clean_stop(second)
    assert list((state / "spool").glob("*.spool.damaged-*")), "so is the damaged segment"
