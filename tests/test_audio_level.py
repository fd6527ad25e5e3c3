"""The audio telemetry topic and the software gain, end to end: tones of known
level into the FIFO microphone, the retained `edged/testpi/audio` on a real
mosquitto, and the bytes the STT double received."""

from __future__ import annotations

import math
import signal
import time
from array import array
from collections.abc import Callable
from typing import Any

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.waiting import wait_until

AUDIO = "edged/testpi/audio"
RATE = 16_000
FAST = {"device": "testmic", "chunk_ms": 100, "level_interval_s": 1.0}


def sine(peak_dbfs: float, seconds: float, frequency: float = 1000.0) -> bytes:
    """A sine whose peak is `peak_dbfs` (1 kHz: 16 samples a period, so the
    peak itself is a sample); its RMS is 3 dB below."""
    peak = min(round(32768 * 10 ** (peak_dbfs / 20)), 32767)
    return array("h", (round(peak * math.sin(2 * math.pi * frequency * n / RATE))
                       for n in range(round(seconds * RATE)))).tobytes()


def square(seconds: float) -> bytes:
    """Full scale, 1 kHz: every sample at a rail."""
    return array("h", ([32767] * 8 + [-32768] * 8) * round(seconds * 1000)).tobytes()


def values(data: bytes | bytearray) -> list[int]:
    samples = array("h")
    samples.frombytes(bytes(data))
    return samples.tolist()


def dbfs(amplitude: int) -> float:
    return 20 * math.log10(amplitude / 32768)


def audio_report(subscriber: Subscriber, predicate: Callable[[dict[str, Any]], bool],
                 what: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = [m.payload for m in subscriber.seen if m.topic == AUDIO][-5:]
            raise AssertionError(f"no audio report with {what} within {timeout}s; last: {seen}")
        report = subscriber.next(AUDIO, timeout=remaining).json()
        if predicate(report):
            return report


def retained_report(stack: Stack) -> dict[str, Any]:
    late = Subscriber(stack.broker.port, AUDIO)  # a late joiner: the retained copy
    try:
        message = late.next(AUDIO, timeout=5)
    finally:
        late.close()
    assert message.retain
    return dict(message.json())


def near(value: float | None, target: float, tolerance: float) -> bool:
    return value is not None and abs(value - target) <= tolerance


def test_levels_of_known_tones_and_clipping_are_published_retained(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon(audio=FAST)
    mic.play(sine(-20, 6.0))
    report = audio_report(subscriber, lambda r: near(r["rms_dbfs"], -23.0, 0.2),
                          "the RMS of a -20 dBFS sine")
    assert report["peak_dbfs"] == -20.0
    assert report["clipping"] == 0.0
    assert (report["microphone"], report["gain_db"]) == ("ok", 0.0)
    assert 0.9 <= report["interval_s"] <= 1.6
    retained = retained_report(stack)  # the tone still plays: the same level
    assert near(retained["rms_dbfs"], -23.0, 0.2)
    assert retained["peak_dbfs"] == -20.0

    mic.play(square(3.0))
    report = audio_report(subscriber, lambda r: (r["clipping"] or 0) > 0.99,
                          "a full-scale square clipping")
    assert report["peak_dbfs"] == 0.0
    assert near(report["rms_dbfs"], 0.0, 0.1)


def test_a_level_change_is_reported_before_the_interval(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon(audio={**FAST, "level_interval_s": 60.0})
    # At the connection, before any audio: no level; a second of audio later, its level.
    audio_report(subscriber, lambda r: r["rms_dbfs"] == -120.0, "the FIFO's digital silence")
    start = mic.play(sine(-20, 3.0))
    report = audio_report(subscriber, lambda r: near(r["rms_dbfs"], -23.0, 3.0),
                          "the tone, long before the 60 s interval")
    mic.wait_read(start + 3.0)
    assert report["interval_s"] < 10


def test_digital_silence_says_silent_at_the_floor(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon(audio={**FAST, "silent_after_s": 1.0})  # the FIFO plays exact zeros
    report = audio_report(subscriber, lambda r: r["microphone"] == "silent",
                          "the microphone silent")
    assert (report["rms_dbfs"], report["peak_dbfs"], report["clipping"]) == (-120.0, -120.0, 0.0)
    assert retained_report(stack)["microphone"] == "silent"


def test_an_absent_microphone_gives_no_level(stack: Stack, subscriber: Subscriber) -> None:
    from tests.support.mic import write_asoundrc

    write_asoundrc(stack.home, stack.home / "mic.fifo")  # the FIFO does not exist
    daemon = stack.daemon(audio=FAST)
    daemon.wait_for_log("capture.unavailable")
    report = audio_report(subscriber, lambda r: r["microphone"] == "absent",
                          "the microphone absent")
    assert (report["rms_dbfs"], report["peak_dbfs"], report["clipping"]) == (None, None, None)


def test_gain_makes_what_the_stt_service_receives_louder(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.keep_audio = True
    stack.daemon(audio={**FAST, "gain_db": 12.0})
    tone = sine(-30, 2.0)
    start = mic.play(tone)
    begin, end = round(start * RATE) * 2, round(start * RATE) * 2 + len(tone)
    received = wait_until(lambda: stt.sessions and len(stt.sessions[0].audio) >= end
                          and stt.sessions[0].audio, "the tone at the STT double")
    heard = values(received[begin:end])
    played = values(tone)
    assert dbfs(max(heard)) - dbfs(max(played)) == _approx_db(12.0)
    assert dbfs(-min(heard)) - dbfs(-min(played)) == _approx_db(12.0)
    report = audio_report(subscriber, lambda r: near(r["peak_dbfs"], -18.0, 0.1),
                          "the level after the gain")
    assert report["gain_db"] == 12.0


def _approx_db(target: float) -> Any:
    import pytest

    return pytest.approx(target, abs=0.01)


def test_gain_saturates_at_the_rails_without_wrapping_around(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.keep_audio = True
    stack.daemon(audio={**FAST, "gain_db": 20.0})
    tone = sine(-6, 1.0)  # ten times that is five times full scale
    start = mic.play(tone)
    begin, end = round(start * RATE) * 2, round(start * RATE) * 2 + len(tone)
    received = wait_until(lambda: stt.sessions and len(stt.sessions[0].audio) >= end
                          and stt.sessions[0].audio, "the tone at the STT double")
    heard, played = values(received[begin:end]), values(tone)
    assert max(heard) == 32767
    assert min(heard) == -32768
    assert all(h * p >= 0 for h, p in zip(heard, played, strict=True)), "a sign flipped"
    assert all(abs(h - max(-32768, min(32767, p * 10))) <= 1
               for h, p in zip(heard, played, strict=True))
    report = audio_report(subscriber, lambda r: (r["clipping"] or 0) > 0.5,
                          "the clipping the gain caused")
    assert report["peak_dbfs"] == 0.0


def test_a_new_gain_on_reload_applies_without_reopening_the_microphone(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """SIGHUP in the middle of a tone: every sample arrives at its place in the
    stream, those before the switch as they were, those after 12 dB louder."""
    stt.keep_audio = True
    daemon = stack.daemon(audio=FAST)
    daemon.wait_for_log("stt.connected")
    tone = sine(-30, 4.0)
    start = mic.play(tone)
    mic.wait_read(start + 1.0)
    stack.config(audio={**FAST, "gain_db": 12.0})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded changed=audio")
    report = audio_report(subscriber, lambda r: r["gain_db"] == 12.0, "the new gain")
    assert report["microphone"] == "ok"
    begin, end = round(start * RATE) * 2, round(start * RATE) * 2 + len(tone)
    received = wait_until(lambda: len(stt.sessions[-1].audio) >= end and stt.sessions[-1].audio,
                          "the tone at the STT double")
    assert len(stt.sessions) == 1, "the same session: nothing re-sent"
    factor = 10 ** (12 / 20)
    labels = []
    for heard, played in zip(values(received[begin:end]), values(tone), strict=True):
        if played == 0:
            assert heard == 0
        elif heard == played:
            labels.append("as played")
        else:
            assert abs(heard - played * factor) <= 1, (heard, played)
            labels.append("louder")
    switch = labels.index("louder")
    # The gain applies from the first hand-off the loop takes after the reload;
    # what ALSA and the hand-off queue held when it came is a fraction of a second.
    assert switch > RATE // 2, "the tone's start was captured before the reload"
    assert set(labels[switch:]) == {"louder"}, "one switch, every sample in its place"
    assert daemon.log.count("capture.open") == 1, "the device stays open"


def test_a_new_broker_connection_gets_the_audio_report_at_once(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    """A broker that restarted has lost the retained copy: the new connection
    brings a fresh one, without waiting for the interval or a level change."""
    daemon = stack.daemon(audio={**FAST, "level_interval_s": 600.0, "level_change_db": 0.0})
    audio_report(subscriber, lambda r: True, "the first report")
    subscriber.close()
    stack.broker.stop()
    daemon.wait_for_log("mqtt.disconnected")
    stack.broker.start()  # persistence off: nothing retained any more
    late = Subscriber(stack.broker.port, AUDIO)
    try:
        report = late.next(AUDIO, timeout=20).json()
    finally:
        late.close()
    assert report["microphone"] == "ok"
    assert report["rms_dbfs"] == -120.0, "the FIFO's silence since the first report"
