"""The stream-time indexed audio buffer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edged.audio.buffer import AudioBuffer


def chunk(value: int, samples: int) -> bytes:
    return bytes([value, 0]) * samples


def test_read_returns_contiguous_audio_by_stream_time() -> None:
    buffer = AudioBuffer(max_samples=1000)
    for value in range(5):
        buffer.append(chunk(value, 100))
    piece = buffer.read(150, max_bytes=400)
    assert piece.start == 150
    assert piece.samples == 200
    assert piece.end == 350
    assert piece.data == chunk(1, 50) + chunk(2, 100) + chunk(3, 50)


def test_overflow_drops_oldest_and_counts_only_undelivered_audio() -> None:
    buffer = AudioBuffer(max_samples=300)
    for value in range(3):
        buffer.append(chunk(value, 100))
    buffer.mark_sent(100)  # the first chunk went to a live session
    buffer.append(chunk(3, 100))  # evicts chunk 0: delivered, not dropped
    assert buffer.oldest == 100
    assert buffer.dropped == 0
    buffer.append(chunk(4, 100))  # evicts chunk 1: never sent
    assert buffer.oldest == 200
    assert buffer.dropped == 100
    assert buffer.head == 500  # dropped audio still counts in stream time
    assert buffer.read(0, 10_000).start == 200


def test_lost_session_makes_unacknowledged_audio_unsent_again() -> None:
    buffer = AudioBuffer(max_samples=1000)
    buffer.append(chunk(1, 500))
    buffer.mark_sent(500)
    buffer.acknowledge(200)
    buffer.session_lost(acknowledged=200)
    assert buffer.sent == 200
    assert buffer.unsent_samples == 300
    assert buffer.read(0, 10_000).start == 200  # acknowledged audio is released


@given(st.lists(st.one_of(
    st.tuples(st.just("capture"), st.integers(1, 400)),
    st.tuples(st.just("send"), st.integers(1, 400)),
    st.tuples(st.just("ack"), st.integers(0, 400)),
    st.tuples(st.just("lose"), st.just(0)),
), max_size=60))
def test_unacknowledged_audio_is_kept_or_counted_as_dropped(ops: list[tuple[str, int]]) -> None:
    """Whatever happens, every sample after the acknowledged point is either
    still readable, or was delivered to a live session, or is counted dropped."""
    buffer = AudioBuffer(max_samples=800)
    acked = cursor = 0
    value = 0
    for op, amount in ops:
        if op == "capture":
            value = (value + 1) % 200
            buffer.append(chunk(value, amount))
        elif op == "send":
            piece = buffer.read(max(cursor, buffer.oldest), amount * 2)
            cursor = piece.end
            buffer.mark_sent(cursor)
        elif op == "ack":
            acked = min(max(acked, cursor - amount), cursor)
            buffer.acknowledge(acked)
        else:
            buffer.session_lost(acked)
            cursor = max(acked, buffer.oldest)
        held = buffer.head - buffer.oldest
        assert held <= buffer.max_samples
        assert buffer.oldest <= max(acked, buffer.oldest)
        readable = buffer.read(acked, 10**9)
        assert readable.end == buffer.head
        lost_unsent = readable.start - acked
        assert lost_unsent <= buffer.dropped + (buffer.sent - acked)
