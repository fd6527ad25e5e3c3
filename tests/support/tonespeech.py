"""A tiny synthetic language of tones, and a recogniser for it.

Each word is a sine tone of its own frequency. A test speaks a script of
words at known stream times; the test STT server recognises them exactly, so
published timestamps can be checked against the truth to the millisecond,
across reconnects and replays, with no model and no guesswork.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

RATE = 16_000
VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
FREQUENCIES = {word: 500 + 150 * index for index, word in enumerate(VOCABULARY)}
AMPLITUDE = 8000
LOUD = 500  # |sample| above this is sound
WORD_GAP_S = 0.1  # silence between words of one utterance
UTTERANCE_END_S = 0.4  # silence that ends an utterance (the recogniser's endpoint)
_MAX_INNER_QUIET = 80  # samples: a sine's zero crossings are shorter than this


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


def tone(word: str, seconds: float = 0.3) -> bytes:
    frequency = FREQUENCIES[word]
    samples = array(
        "h",
        (round(AMPLITUDE * math.sin(2 * math.pi * frequency * n / RATE))
         for n in range(round(seconds * RATE))),
    )
    return samples.tobytes()


@dataclass(frozen=True)
class SpokenWord:
    text: str
    start: float  # seconds from the start of the script's audio
    end: float


def script(utterances: Sequence[Sequence[str]], *, lead_s: float = 0.5,
           word_s: float = 0.3, pause_s: float = 0.8) -> tuple[bytes, list[list[SpokenWord]]]:
    """Audio for utterances separated by pauses, and the truth of when each word is."""
    parts = [silence(lead_s)]
    now = lead_s
    truth: list[list[SpokenWord]] = []
    for utterance in utterances:
        spoken = []
        for index, word in enumerate(utterance):
            if index:
                parts.append(silence(WORD_GAP_S))
                now += WORD_GAP_S
            parts.append(tone(word, word_s))
            spoken.append(SpokenWord(word, round(now, 6), round(now + word_s, 6)))
            now += word_s
        parts.append(silence(pause_s))
        now += pause_s
        truth.append(spoken)
    return b"".join(parts), truth


@dataclass(frozen=True)
class HeardWord:
    text: str
    start: float  # seconds since the first sample fed
    end: float


@dataclass
class ToneRecognizer:
    """Incremental recogniser: feed PCM, get utterances when they end."""

    position: int = 0  # samples fed
    _run_start: int | None = None
    _last_loud: int = -1
    _crossings: int = 0
    _previous_sign: int = 0
    _words: list[HeardWord] = field(default_factory=list)

    def feed(self, pcm: bytes) -> list[list[HeardWord]]:
        samples = array("h")
        samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
        done: list[list[HeardWord]] = []
        for value in samples:
            n = self.position
            self.position += 1
            if abs(value) > LOUD:
                if self._run_start is None:
                    self._run_start, self._crossings, self._previous_sign = n, 0, 0
                sign = 1 if value > 0 else -1
                if self._previous_sign and sign != self._previous_sign:
                    self._crossings += 1
                self._previous_sign = sign
                self._last_loud = n
                continue
            if self._run_start is not None and n - self._last_loud > _MAX_INNER_QUIET:
                self._close_word()
            if self._words and n - self._last_loud > UTTERANCE_END_S * RATE:
                done.append(self._words)
                self._words = []
        return done

    def flush(self) -> list[list[HeardWord]]:
        if self._run_start is not None:
            self._close_word()
        done, self._words = ([self._words] if self._words else []), []
        return done

    @property
    def partial(self) -> list[HeardWord]:
        return list(self._words)

    def _close_word(self) -> None:
        assert self._run_start is not None
        start, end = self._run_start, self._last_loud + 1
        self._run_start = None
        duration = (end - start) / RATE
        if duration < 0.05:
            return  # a click, not a word
        frequency = self._crossings / 2 / duration
        word = min(FREQUENCIES, key=lambda w: abs(FREQUENCIES[w] - frequency))
        self._words.append(HeardWord(word, start / RATE, end / RATE))


def words_of(utterances: Iterable[Sequence[SpokenWord]]) -> list[SpokenWord]:
    return [word for utterance in utterances for word in utterance]
