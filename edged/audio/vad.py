"""Voice-activity gating: which stretches of the stream are worth sending.

Opt-in (`vad.enabled`). The detector is webrtcvad (webrtcvad-wheels): small,
C, no model to download, a fraction of a percent of a Pi Zero's core. It
judges 30 ms frames; around what it hears as speech the gate adds a pre-roll
(so the first syllable is never clipped: that audio is still in the buffer)
and a hang-over (so a pause inside a sentence does not cut it).

The gate only marks ranges of stream time; audio it skips still counts in
stream time, and the session's timeline maps session time back to stream
time piecewise, so every timestamp stays true.
"""

from __future__ import annotations

from dataclasses import dataclass

from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, VadSettings

FRAME_SAMPLES = SAMPLE_RATE * 30 // 1000  # webrtcvad takes 10, 20 or 30 ms frames
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH


class _Detector:
    """The webrtcvad call, behind a seam so the gate's logic can be tested alone."""

    def __init__(self, aggressiveness: int):
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        return bool(self._vad.is_speech(frame, SAMPLE_RATE))


@dataclass
class _Range:
    start: int
    end: int  # exclusive; grows while speech (or its hang-over) goes on


class SpeechGate:
    def __init__(self, settings: VadSettings, detector: _Detector | None = None):
        self.preroll = SAMPLE_RATE * settings.preroll_ms // 1000
        self.hangover = SAMPLE_RATE * settings.hangover_ms // 1000
        self._detector = detector or _Detector(settings.aggressiveness)
        self._ranges: list[_Range] = []
        self._carry = b""
        self._carry_start = 0
        self.judged = 0  # stream time up to which frames have been judged
        self._last_speech_end = -(10**12)

    def feed(self, start: int, pcm: bytes) -> None:
        """Judge newly captured audio starting at stream sample `start`."""
        if self._carry and self._carry_start + len(self._carry) // SAMPLE_WIDTH != start:
            self._carry = b""  # a gap in capture: the partial frame is gone
        if not self._carry:
            self._carry_start = start
        data = self._carry + pcm
        offset = 0
        while len(data) - offset >= FRAME_BYTES:
            frame_start = self._carry_start + offset // SAMPLE_WIDTH
            self._judge(frame_start, data[offset : offset + FRAME_BYTES])
            offset += FRAME_BYTES
        self._carry = data[offset:]
        self._carry_start += offset // SAMPLE_WIDTH
        self.judged = self._carry_start

    def _judge(self, start: int, frame: bytes) -> None:
        end = start + FRAME_SAMPLES
        if self._detector.is_speech(frame):
            self._last_speech_end = end
            if self._ranges and self._ranges[-1].end >= start - self.preroll:
                self._ranges[-1].end = end  # speech goes on (or resumes within the pre-roll)
            else:
                self._ranges.append(_Range(max(start - self.preroll, 0), end))
        elif self._ranges and end - self._last_speech_end <= self.hangover:
            self._ranges[-1].end = end  # the hang-over after speech

    @property
    def last_speech_end(self) -> int:
        """Where the last frame judged as speech ends (a large negative
        number before any): it grows only when someone speaks."""
        return self._last_speech_end

    @property
    def in_speech(self) -> bool:
        return bool(self._ranges) and self._ranges[-1].end >= self.judged

    def next_sendable(self, cursor: int) -> tuple[int, int] | None:
        """The first stretch at or after `cursor` to send, as (start, end)."""
        for speech in self._ranges:
            if speech.end > cursor:
                return max(speech.start, cursor), speech.end
        return None

    def silence_until(self) -> int:
        """Audio before this is settled silence: it will never be sent (a range
        may still start up to one pre-roll before what was judged)."""
        floor = max(self.judged - self.preroll, 0)
        if self._ranges and self._ranges[-1].end > floor:
            return self._ranges[-1].start
        return floor

    def forget_before(self, sample: int) -> None:
        self._ranges = [speech for speech in self._ranges if speech.end > sample]
