"""Property: any interleaving of captures, sends, drops and finals loses no
acknowledged audio and publishes no word twice, with true stream times.

A model of the daemon's STT path built from the real parts (AudioBuffer,
SessionTimeline, FinalFilter) and a recogniser that reads word identities
from the audio content itself, so the time mapping is checked, not assumed.
"""

from __future__ import annotations

import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from edged.audio.buffer import AudioBuffer
from edged.audio.spool import Spool
from edged.stt.protocol import Final, FinalFilter, SessionTimeline, Word

WORD_EVERY = 100  # samples: word k is the audio [100k, 100k + 50)
WORD_LENGTH = 50


def captured_audio(start: int, samples: int) -> bytes:
    """Sample value = 1 + word index inside a word, 0 between words."""
    values = array("h", (
        1 + n // WORD_EVERY if n % WORD_EVERY < WORD_LENGTH else 0
        for n in range(start, start + samples)
    ))
    return values.tobytes()


@dataclass
class ServerSession:
    """What the service heard: session-time samples, and how far it has transcribed."""

    heard: array = field(default_factory=lambda: array("h"))
    transcribed_to: int = 0

    def final(self) -> list[tuple[int, int, int]]:
        """(word, session start, session end) of complete words since the last final."""
        words, n = [], self.transcribed_to
        end_of_complete = len(self.heard)
        while n < end_of_complete:
            value = self.heard[n]
            if value == 0:
                n += 1
                continue
            run_end = n
            while run_end < end_of_complete and self.heard[run_end] == value:
                run_end += 1
            if run_end == end_of_complete:
                break  # the word may go on in audio not yet heard
            words.append((value - 1, n, run_end))
            n = run_end
        self.transcribed_to = n
        return words


operations = st.lists(st.one_of(
    st.tuples(st.just("capture"), st.integers(1, 700)),
    st.tuples(st.just("send"), st.integers(1, 700)),
    st.tuples(st.just("final"), st.just(0)),
    st.tuples(st.just("drop"), st.just(0)),
    st.tuples(st.just("connect"), st.just(0)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_replay_and_dedup_lose_nothing_acknowledged_and_repeat_nothing(ops) -> None:
    run_model(ops, AudioBuffer(max_samples=2_000))


@settings(max_examples=200, deadline=None)
@given(operations)
def test_with_a_spool_nothing_is_dropped_at_all(ops) -> None:
    """Memory holds 2,000 samples; the disk spool holds the rest of any outage."""
    with tempfile.TemporaryDirectory() as directory:
        buffer = AudioBuffer(max_samples=2_000, spool=Spool(Path(directory), 64 * 1024 * 1024))
        run_model(ops, buffer)
        assert buffer.dropped == 0


def run_model(ops: list[tuple[str, int]], buffer: AudioBuffer) -> None:
    finals = FinalFilter()
    published: list[Word] = []
    timeline, server, cursor = SessionTimeline(), ServerSession(), 0

    connected = True
    for op, amount in ops:
        if op in ("send", "final") and not connected:
            continue
        if op == "capture":
            buffer.append(captured_audio(buffer.head, amount))
        elif op == "send":
            piece = buffer.read(cursor, amount * 2)
            if piece.samples:
                timeline.record_send(piece.start, piece.samples)
                server.heard.frombytes(piece.data)
                cursor = piece.end
                buffer.mark_sent(cursor)
        elif op == "final":
            words = server.final()
            if not words or timeline.stream_start is None:
                continue
            placed = tuple(
                Word(str(k), timeline.to_stream(s / 16_000), timeline.to_stream(e / 16_000), None)
                for k, s, e in words
            )
            final = Final(" ".join(w.text for w in placed), placed[0].start, placed[-1].end,
                          placed, "model")
            kept = finals.accept(final)
            buffer.acknowledge(finals.acknowledged)
            if kept is not None:
                published.extend(kept.words)
        elif op == "drop" and connected:  # audio in flight is lost with the connection
            buffer.session_lost(finals.acknowledged)
            connected = False
        elif op == "connect" and not connected:
            buffer.session_opened()
            connected = True
            timeline, server = SessionTimeline(), ServerSession()
            cursor = max(finals.acknowledged, buffer.oldest)

    # Published words carry their true stream times (exactly, unless audio
    # was dropped from a full buffer and cut a word), in order, never twice.
    for word in published:
        k = int(word.text)
        if buffer.dropped == 0:
            assert word.start == k * WORD_EVERY
            assert word.end == k * WORD_EVERY + WORD_LENGTH
    indexes = [int(word.text) for word in published]
    assert indexes == sorted(set(indexes))
    # Every word before the acknowledged point was published, unless its
    # audio was dropped from a full buffer (and then it was counted).
    missing = set(range(finals.acknowledged // WORD_EVERY)) - set(indexes)
    if missing:
        assert buffer.dropped > 0
    # Nothing after the acknowledged point is lost unless counted as dropped.
    assert buffer.read(finals.acknowledged, 10**9).start - finals.acknowledged <= (
        buffer.dropped + buffer.sent - finals.acknowledged
    )
