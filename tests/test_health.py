"""What the daemon says about itself: state topic, logs, failures it survives."""

from __future__ import annotations

import json
import signal
import time

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.notify import NotifySocket
from tests.support.stt_double import SttDouble
from tests.support.waiting import assert_quiet

WRONG_KEY = "sk-wrong-SECRET-9876"


def latest_state(subscriber: Subscriber, predicate, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        message = subscriber.next("edged/testpi/state", timeout=remaining)
        state = json.loads(message.payload)
        if predicate(state):
            return state


def test_state_topic_is_retained_and_reports_streaming(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon()
    state = latest_state(subscriber, lambda s: s["status"] == "streaming")
    assert state["stt_connected"]
    assert state["mqtt_connected"]
    assert state["microphone_open"]
    assert state["device"] == "testpi"
    assert state["version"]
    assert state["dropped_s"] == 0
    assert state["reconnects"] == 0
    late = Subscriber(stack.broker.port, "edged/testpi/state")  # retained: a late joiner sees it
    try:
        assert json.loads(late.next("edged/testpi/state", timeout=5).payload)["device"] == "testpi"
    finally:
        late.close()


def test_rejected_key_is_reported_not_hot_looped_and_never_logged(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon(env={"EDGED_STT__API_KEY": WRONG_KEY, "EDGED_LOG_LEVEL": "debug"})
    state = latest_state(subscriber, lambda s: s["status"] == "auth_failed")
    assert "401" in state["last_error"]
    daemon.wait_for_log("stt.auth_failed retry_in=60s error=HTTP 401")  # once a minute
    assert_quiet(lambda: stt.refused == 1 and daemon.running, 3.0,
                 "no retry of a rejected key within seconds, and no exit")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    everything = daemon.log + "".join(m.payload.decode() for m in subscriber.seen)
    assert WRONG_KEY not in everything
    assert "stt.auth_failed" in daemon.log


def test_a_rejected_request_is_reported_and_retried_once_a_minute(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.refuse_status, stt.faults.refuse_count = 400, 1
    daemon = stack.daemon()
    state = latest_state(subscriber, lambda s: s["status"] == "rejected")
    assert "HTTP 400" in state["last_error"]
    assert not state["stt_connected"]
    daemon.wait_for_log("stt.rejected retry_in=60s error=HTTP 400: request rejected")
    assert_quiet(lambda: stt.refused == 1 and not stt.sessions and daemon.running, 3.0,
                 "no retry of a rejected request within seconds, and no exit")


def test_broker_down_at_start_then_up_delivers_transcripts(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    from tests.support.tonespeech import script
    from tests.test_end_to_end import assert_matches_truth

    subscriber.close()
    stack.broker.stop()
    daemon = stack.daemon()
    daemon.wait_for_log("mqtt.connect_failed")
    daemon.wait_for_log("stt.connected")
    audio, truth = script([["alpha", "echo"]])
    offset = mic.play(audio)
    daemon.wait_for_log("transcript seq=1", timeout=20)  # committed to the outbox
    stack.broker.start()
    late = Subscriber(stack.broker.port, "edged/#")
    try:
        final = late.next("edged/testpi/transcript", timeout=40).json()
    finally:
        late.close()
    assert_matches_truth([final], truth, offset, mic)
    assert final["seq"] == 1


def test_missing_microphone_is_retried_and_reported_then_used(
    stack: Stack, subscriber: Subscriber
) -> None:
    from tests.support.mic import write_asoundrc
    from tests.support.tonespeech import script

    write_asoundrc(stack.home, stack.home / "mic.fifo")  # the FIFO does not exist yet
    notify = NotifySocket(stack.home / "notify.sock")
    try:
        daemon = stack.daemon(env={"NOTIFY_SOCKET": str(notify.path)})
        daemon.wait_for_log("capture.unavailable")
        _, ready = notify.wait_for_fields("READY", "1")  # known absent, being retried
        assert ready["STATUS"].startswith("no_microphone;")
    finally:
        notify.close()
    state = latest_state(subscriber, lambda s: s["status"] == "no_microphone")
    assert not state["microphone_open"]
    assert "testmic" in (state["last_error"] or "")
    assert daemon.process is not None
    assert daemon.process.poll() is None, "a missing microphone is not a crash"

    mic = stack.microphone()  # plugged in
    latest_state(subscriber, lambda s: s["status"] == "streaming", timeout=30)
    audio, _ = script([["charlie", "delta"]])
    mic.play(audio)
    final = subscriber.next("edged/testpi/transcript", timeout=20).json()
    assert [w["text"] for w in final["words"]] == ["charlie", "delta"]


def test_capture_faster_than_the_loop_is_bounded_and_sigterm_still_works(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    mic.stop()  # the file plugin now returns stale periods as fast as it can
    # "Captured" faster than any service may be sent it: at the stop, most of
    # it is still unsent, and goes to the spool after stt.close_timeout_s.
    daemon.allow("stt.close_timeout")
    state = latest_state(subscriber, lambda s: s["overruns"] > 0, timeout=30)
    assert state["overruns"] > 0, "periods the loop cannot take are dropped and counted"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def test_a_stalled_microphone_is_reported_within_seconds_and_recovers(
    stack: Stack, mic: FifoMic, subscriber: Subscriber, tmp_path
) -> None:
    from tests.support.notify import NotifySocket

    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        daemon = stack.daemon(env={"NOTIFY_SOCKET": str(notify.path)})
        latest_state(subscriber, lambda s: s["status"] == "streaming")
        mic.paused.set()  # nothing arrives any more, the device stays open
        stalled_at = time.monotonic()
        state = latest_state(subscriber, lambda s: s["microphone"] == "stalled", timeout=10)
        assert time.monotonic() - stalled_at < 5, "within a few seconds"
        assert state["status"] == "microphone_stalled"
        assert state["microphone_open"], "open, and yet nothing comes"
        notify.wait_for("STATUS", "microphone_stalled; 0.0 s buffered; 0 reconnects", timeout=5)

        mic.paused.clear()
        state = latest_state(subscriber, lambda s: s["microphone"] == "ok", timeout=10)
        assert state["status"] == "streaming"
        notify.wait_for("STATUS", "streaming; 0.0 s buffered; 0 reconnects", timeout=5)
        assert "microphone.stalled" in daemon.log
        assert "microphone.recovered" in daemon.log
    finally:
        notify.close()


def test_exact_digital_silence_is_a_dead_microphone_not_a_quiet_room(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    import random
    from array import array

    from tests.support.tonespeech import silence

    stack.daemon(audio={"device": "testmic", "chunk_ms": 100, "silent_after_s": 2.0})
    # A quiet room: noise of a sample or two, never exactly zero, for longer.
    rng = random.Random(7)
    mic.play(array("h", (rng.choice((-2, -1, 1, 2)) for _ in range(16_000 * 4))).tobytes())
    state = latest_state(subscriber, lambda s: s["status"] == "streaming")
    mic.wait_idle()
    assert state["microphone"] == "ok"
    assert not [m for m in subscriber.seen if b'"microphone":"silent"' in m.payload]
    # Then exact zeros (what the FIFO microphone plays when it has nothing).
    mic.play(silence(0.1))
    state = latest_state(subscriber, lambda s: s["microphone"] == "silent", timeout=10)
    assert state["status"] == "streaming", "it still delivers: nothing else changes"
    mic.play(array("h", [3, -3] * 8000).tobytes())  # a sound again
    latest_state(subscriber, lambda s: s["microphone"] == "ok", timeout=10)


STEREO_ONLY = (  # an ALSA device that offers two channels and nothing else
    'pcm.stereoonly { type multi; slaves.a.pcm "null"; slaves.a.channels 2; '
    "bindings.0.slave a; bindings.0.channel 0; bindings.1.slave a; bindings.1.channel 1 }\n"
)


def test_a_device_that_cannot_do_16_khz_mono_is_refused_with_exit_78(stack: Stack) -> None:
    (stack.home / ".asoundrc").write_text(STEREO_ONLY)
    daemon = stack.daemon(audio={"device": "stereoonly", "chunk_ms": 100})
    daemon.expect(status=78).allow("edged.fatal")  # the refusal is a fatal configuration error
    assert daemon.wait(20) == 78
    assert "offers rate=16000 channels=2 format=S16_LE" in daemon.log
    assert "'plughw:...'" in daemon.log
