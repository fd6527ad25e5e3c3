"""Streaming speech recognition with PocketSphinx: endpointing plus decoding.

PocketSphinx 5 has no voice activity detection inside the decoder any more
(``Decoder.get_in_speech`` is always true), so speech is cut into utterances by
a separate :class:`pocketsphinx.Endpointer` and each utterance is decoded on
its own. This module does no I/O and no threading; the server runs it in a
worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pocketsphinx

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2

# Alternate pronunciations come out of the segmentation as "word(2)".
_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")
# Audio is handed to the decoder in pieces this big (30 ms): the binding holds
# the GIL for the whole of each call, and short calls let other threads (the
# event loop) run in between.
_DECODE_CHUNK_BYTES = 960
# Speech used to calibrate a fresh decoder, see StreamingRecognizer._calibrate.
_CALIBRATION_BYTES = SAMPLE_RATE * BYTES_PER_SAMPLE  # 1 s
_MIN_CALIBRATION_BYTES = _CALIBRATION_BYTES * 3 // 10  # 0.3 s


@dataclass(frozen=True)
class Word:
    """One recognised word; times in seconds since the first byte fed."""

    text: str
    start_time: float
    end_time: float


@dataclass(frozen=True)
class Utterance:
    """One finished utterance; times in seconds since the first byte fed."""

    text: str
    start_time: float
    end_time: float
    words: list[Word]


def load_decoder() -> Any:
    """Load a decoder with the US English model bundled in the wheel.

    Takes about 0.3 s, holding the GIL all along, so the server loads
    decoders ahead of time and reuses them.
    """
    # The defaults are the bundled model; only the log chatter is turned down
    # (by default every utterance prints dozens of INFO lines to stderr).
    return pocketsphinx.Decoder(loglevel="ERROR")


def _clean_word(raw: str) -> str | None:
    """Map a segmentation entry to a word, or None for silence and fillers."""
    # <s>, </s>, <sil> and noise fillers such as [NOISE] or ++NOISE++ are not words.
    if raw.startswith(("<", "[", "+")):
        return None
    return _ALT_PRONUNCIATION.sub("", raw) or None


class StreamingRecognizer:
    """Turn a stream of 16 kHz s16le mono PCM into finished utterances.

    One instance serves one stream at a time; :meth:`reset` starts a new one
    while keeping the loaded decoder and what it has learnt about the channel.
    """

    def __init__(self, decoder: Any | None = None) -> None:
        self._decoder: Any = decoder if decoder is not None else load_decoder()
        # Decoder frames per second: word times come out as frame numbers.
        self._frame_rate = float(self._decoder.config["frate"])
        # See _calibrate(): false until the decoder has heard some speech.
        self._calibrated = False
        self._decoding = False
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the clock restarts at 0, unfinished speech is dropped."""
        if self._decoding:
            self._decoder.end_utt()
            self._decoding = False
        self._pending = b""
        self._samples_fed = 0
        self._in_utterance = False
        self._utterance_start = 0.0
        self._utterance_audio: list[bytes] = []
        self._new_endpointer()

    @property
    def audio_seconds(self) -> float:
        """Stream time: seconds of audio fed since the start or the last reset."""
        return self._samples_fed / SAMPLE_RATE

    @property
    def utterance_start(self) -> float | None:
        """Stream time at which the utterance in progress started, if any."""
        return self._utterance_start if self._in_utterance else None

    def feed(self, pcm: bytes) -> list[Utterance]:
        """Accept any amount of audio and return the utterances it finished."""
        self._pending += pcm
        frame_bytes: int = self._endpointer.frame_bytes
        finished: list[Utterance] = []
        offset = 0
        while len(self._pending) - offset >= frame_bytes:
            utterance = self._process_frame(self._pending[offset : offset + frame_bytes])
            offset += frame_bytes
            if utterance is not None:
                finished.append(utterance)
        self._pending = self._pending[offset:]
        return finished

    def flush(self) -> list[Utterance]:
        """End the utterance in progress, if any; more audio may follow."""
        # Only whole samples are audio; an odd trailing byte is dropped.
        tail = self._pending[: len(self._pending) - len(self._pending) % BYTES_PER_SAMPLE]
        self._pending = b""
        finished: list[Utterance] = []
        if self._in_utterance:
            speech: bytes | None = self._endpointer.end_stream(tail)
            if speech:
                self._add_speech(speech)
            utterance = self._end_utterance()
            if utterance is not None:
                finished.append(utterance)
        self._samples_fed += len(tail) // BYTES_PER_SAMPLE
        # end_stream() leaves the endpointer at end of stream; a fresh one,
        # offset to carry on the stream time, handles any audio that follows.
        self._new_endpointer()
        return finished

    def partial(self) -> str | None:
        """Current hypothesis for the utterance in progress, or None if there is none."""
        if not self._decoding:
            return None
        hyp = self._decoder.hyp()
        if hyp is None:
            return None
        words = (_clean_word(raw) for raw in str(hyp.hypstr).split())
        return " ".join(word for word in words if word) or None

    def _new_endpointer(self) -> None:
        self._endpointer: Any = pocketsphinx.Endpointer(sample_rate=SAMPLE_RATE)
        # The endpointer's clock starts at 0; this maps it onto stream time.
        self._endpointer_offset = self._samples_fed / SAMPLE_RATE

    def _process_frame(self, frame: bytes) -> Utterance | None:
        was_in_speech: bool = self._endpointer.in_speech
        speech: bytes | None = self._endpointer.process(frame)
        self._samples_fed += len(frame) // BYTES_PER_SAMPLE
        if speech is None:
            return None
        if not was_in_speech:
            self._begin_utterance()
        self._add_speech(speech)
        if self._endpointer.in_speech:
            return None
        return self._end_utterance()

    def _begin_utterance(self) -> None:
        self._in_utterance = True
        # The endpointer delays its output by its decision window, so the
        # speech handed back now started at speech_start, not at this frame.
        self._utterance_start = self._endpointer_offset + float(self._endpointer.speech_start)
        if self._calibrated:
            self._decoder.start_utt()
            self._decoding = True

    def _add_speech(self, speech: bytes) -> None:
        if self._decoding:
            self._decoder.process_raw(speech)
            return
        self._utterance_audio.append(speech)
        if sum(map(len, self._utterance_audio)) >= _CALIBRATION_BYTES:
            self._calibrate_and_catch_up()

    def _end_utterance(self) -> Utterance | None:
        self._in_utterance = False
        if not self._decoding:
            # A first utterance shorter than the calibration length.
            self._calibrate_and_catch_up()
        self._decoder.end_utt()
        self._decoding = False
        words = self._words()
        if not words:
            return None
        return Utterance(
            text=" ".join(word.text for word in words),
            start_time=words[0].start_time,
            end_time=words[-1].end_time,
            words=words,
        )

    def _calibrate_and_catch_up(self) -> None:
        """Calibrate on the speech held back so far, then decode it and carry on streaming."""
        audio = b"".join(self._utterance_audio)
        self._utterance_audio = []
        # A mean measured on a blip would be worse than the default; the next
        # utterance gets another chance.
        if len(audio) >= _MIN_CALIBRATION_BYTES:
            self._calibrate(audio[:_CALIBRATION_BYTES])
        self._decoder.start_utt()
        self._decoding = True
        for start in range(0, len(audio), _DECODE_CHUNK_BYTES):
            self._decoder.process_raw(audio[start : start + _DECODE_CHUNK_BYTES])

    def _calibrate(self, audio: bytes) -> None:
        """Measure the cepstral mean of ``audio`` and make it the running mean.

        Streaming decoding normalises features with a running cepstral mean
        that starts at the model's default and gives it the weight of 5 s of
        audio. When the channel is far from the training data (synthetic
        speech, an unusual microphone) the first utterances come out garbled
        until the mean catches up. So the start of the first utterance is held
        back and put through a batch (whole-utterance) pass, whose mean then
        replaces the default. That pass costs a full decode of up to 1 s of
        audio, once per decoder.
        """
        self._decoder.start_utt()
        # no_search only defers the search to end_utt(); there is no way to
        # compute features alone, hence the short calibration length.
        self._decoder.process_raw(audio, no_search=True, full_utt=True)
        self._decoder.end_utt()
        # get_cmn(False) reads the mean just measured; set_cmn makes it the
        # running mean (again with a 5 s weight).
        self._decoder.set_cmn(self._decoder.get_cmn(False))
        self._calibrated = True

    def _words(self) -> list[Word]:
        words: list[Word] = []
        for segment in self._decoder.seg():
            text = _clean_word(str(segment.word))
            if text is None:
                continue
            # Frame numbers count from the utterance start; end_frame is inclusive.
            start = self._utterance_start + int(segment.start_frame) / self._frame_rate
            end = self._utterance_start + (int(segment.end_frame) + 1) / self._frame_rate
            words.append(Word(text=text, start_time=round(start, 3), end_time=round(end, 3)))
        return words
