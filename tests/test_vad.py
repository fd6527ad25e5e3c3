"""Voice-activity gating: only speech is sent, every word still arrives once
with true times, the connection survives silence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.audio.vad import FRAME_BYTES, FRAME_SAMPLES, SpeechGate
from edged.config import VadSettings
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script, silence
from tests.test_end_to_end import assert_matches_truth, collect_finals


class LoudIsSpeech:
    """A stand-in detector for the gate's own logic: a frame is speech if loud."""

    def is_speech(self, frame: bytes) -> bool:
        return any(frame)


def frames(pattern: str) -> bytes:
    """'s' = a speech frame (30 ms), '.' = a silent one."""
    return b"".join(b"\x01\x01" * FRAME_SAMPLES if c == "s" else bytes(FRAME_BYTES)
                    for c in pattern)


def gate(preroll_ms: int = 90, hangover_ms: int = 60) -> SpeechGate:
    settings = VadSettings(enabled=True, preroll_ms=preroll_ms, hangover_ms=hangover_ms)
    return SpeechGate(settings, detector=LoudIsSpeech())  # type: ignore[arg-type]


def test_speech_is_sent_with_preroll_and_hangover() -> None:
    g = gate()
    g.feed(0, frames("..........ss.........."))
    start, end = g.next_sendable(0) or (0, 0)
    assert start == (10 - 3) * FRAME_SAMPLES  # three frames (90 ms) of pre-roll
    assert end == (12 + 2) * FRAME_SAMPLES  # two frames (60 ms) of hang-over
    assert g.next_sendable(end) is None
    assert g.silence_until() == len(frames("..........ss..........")) // 2 - 3 * FRAME_SAMPLES


def test_a_pause_within_the_hangover_does_not_split_an_utterance() -> None:
    g = gate(hangover_ms=90)
    g.feed(0, frames("....ss..ss......"))
    first = g.next_sendable(0)
    assert first is not None
    assert g.next_sendable(first[1]) is None, "one stretch, not two"


def test_partial_frames_carry_over_between_chunks() -> None:
    g = gate()
    audio = frames("......ssss......")
    for offset in range(0, len(audio), 1000):  # chunks that are not whole frames
        g.feed(offset // 2, audio[offset:offset + 1000])
    assert g.next_sendable(0) == (3 * FRAME_SAMPLES, 12 * FRAME_SAMPLES)


@given(st.text(alphabet="s.", max_size=200))
def test_every_speech_frame_is_inside_a_sendable_stretch(pattern: str) -> None:
    g = gate()
    g.feed(0, frames(pattern))
    cursor, covered = 0, set()
    while (span := g.next_sendable(cursor)) is not None:
        covered.update(range(span[0] // FRAME_SAMPLES, (span[1] - 1) // FRAME_SAMPLES + 1))
        cursor = span[1]
    assert {i for i, c in enumerate(pattern) if c == "s"} <= covered


# Deepgram closes a session after ~10 s without data (1011); the double does
# after IDLE_S, half that, so that the silences, and the test, are shorter.
IDLE_S = 5.0


@pytest.mark.parametrize("keepalive_s", [2.0, 30.0], ids=["kept-alive", "closed-when-idle"])
def test_only_speech_is_sent_and_every_word_arrives_across_idle_timeouts(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, keepalive_s: float
) -> None:
    stt.faults.idle_timeout_s = IDLE_S
    daemon = stack.daemon(vad={"enabled": True, "keepalive_s": keepalive_s})
    daemon.wait_for_log("capture.open")
    parts, truth = [], []
    for words in (["charlie", "delta"], ["echo"], ["foxtrot", "golf", "hotel"]):
        audio, spoken = script([words], lead_s=0.5, pause_s=1.5)
        parts.append(audio + silence(IDLE_S + 2.0))  # long silences between short utterances
        truth.append(spoken[0])
    offset = mic.play(b"".join(parts))
    starts = [offset]
    for part in parts[:-1]:
        starts.append(starts[-1] + len(part) / 32000)

    finals = collect_finals(subscriber, 3, timeout=90)

    for final, utterance, start in zip(finals, truth, starts, strict=True):
        assert_matches_truth([final], [utterance], start, mic)
    # Sent: each utterance with its pre-roll (0.5 s) and hang-over (1 s), and
    # after each idle close, what was unacknowledged again: the hang-over.
    speech = sum(0.5 + utterance[-1].end - utterance[0].start + 1.0 for utterance in truth)
    resent = 1.0 * (len(stt.sessions) - 1)
    sent = sum(session.bytes_received for session in stt.sessions) / 32000
    assert sent == pytest.approx(speech + resent, abs=0.15 * len(stt.sessions))
    assert sent < mic.stream_seconds / 2, "most of the silence is not sent"
    if keepalive_s < IDLE_S:
        assert sum(session.keepalives for session in stt.sessions) >= 1
        assert len(stt.sessions) == 1, "one session, kept alive through the silences"
    else:  # the service closed idle sessions: edged came back when speech did
        assert [session.closed_idle for session in stt.sessions] == [True, True, False]


def test_with_gating_a_session_closed_for_idleness_comes_back_only_when_speech_does(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.idle_timeout_s = 2.0
    daemon = stack.daemon(vad={"enabled": True, "keepalive_s": 30.0})
    daemon.wait_for_log("capture.open")
    audio, truth = script([["charlie", "delta"]], lead_s=0.5, pause_s=1.5)
    offset = mic.play(audio + silence(6.0))
    assert_matches_truth(collect_finals(subscriber, 1), truth, offset, mic)
    mic.wait_idle()  # six seconds of silence: three idle timeouts
    assert stt.sessions[0].closed_idle
    assert len(stt.sessions) == 1, "no new session before someone speaks"
