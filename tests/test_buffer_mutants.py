"""The audio buffer, edge cases found by mutation testing (docs/testing.md):
odd byte counts, what reaches the disk and when, what is counted as dropped,
reads across the disk and memory tiers, and long streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.audio.buffer import CAUGHT_UP_SAMPLES, AudioBuffer
from edged.audio.spool import Spool

MB = 1024 * 1024
SECOND = 16_000


def chunk(value: int, samples: int) -> bytes:
    return value.to_bytes(2, "little", signed=True) * samples


def values(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "little", signed=True)
            for i in range(0, len(data), 2)]


def spool_in(path: Path, max_bytes: int = 10 * MB) -> Spool:
    spool = Spool(path, max_bytes, keep_free_bytes=0, keep_free_ratio=0)
    spool.recover("0123456789abcdef0123456789abcdef", 0)
    return spool


def disk_fails(spool: Spool) -> None:
    """From now on the spool's disk refuses writes (the state a refused write
    leaves it in; tests/test_spool.py shows a real full disk doing that)."""
    spool._failing = True


# -- construction and capture --------------------------------------------------


def test_memory_must_hold_at_least_one_sample() -> None:
    with pytest.raises(ValueError, match=r"^max_samples must be positive$"):
        AudioBuffer(max_samples=0)
    one = AudioBuffer(max_samples=1)
    one.append(chunk(7, 1))
    assert one.read(0, 10).data == chunk(7, 1)


def test_every_capture_is_announced() -> None:
    calls: list[int] = []
    buffer = AudioBuffer(max_samples=1000, on_append=lambda: calls.append(1))
    buffer.append(chunk(1, 10))
    buffer.append(b"")
    buffer.append(chunk(2, 10))
    assert len(calls) == 2


def test_a_torn_sample_at_the_end_of_a_capture_is_cut_off() -> None:
    buffer = AudioBuffer(max_samples=1000)
    buffer.append(chunk(3, 10) + b"\x01")
    buffer.append(chunk(4, 10))
    assert buffer.head == 20
    piece = buffer.read(0, 1000)
    assert values(piece.data) == [3] * 10 + [4] * 10


def test_audio_captured_without_a_time_is_spooled_with_time_zero(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=1000, spool=spool)
    buffer.go_offline()
    buffer.append(chunk(1, 100))
    assert [record.wall for record in spool.records] == [0.0]


def test_a_read_asks_for_whole_samples_only() -> None:
    buffer = AudioBuffer(max_samples=1000)
    buffer.append(chunk(1, 100))
    assert buffer.read(0, 5).samples == 2
    empty = buffer.read(40, 1)
    assert (empty.start, empty.data) == (40, b"")


def test_a_read_of_less_than_a_sample_from_disk_is_empty_at_the_asked_position(
    tmp_path: Path,
) -> None:
    buffer = AudioBuffer(max_samples=100, spool=spool_in(tmp_path))
    buffer.session_lost(0)
    for value in range(3):
        buffer.append(chunk(value, 100))  # the first two chunks only on disk
    empty = buffer.read(40, 1)
    assert (empty.start, empty.data) == (40, b"")


# -- when audio reaches the disk ------------------------------------------------


def test_a_fresh_start_with_an_empty_spool_streams_from_memory(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    assert not buffer.spooling
    buffer.append(chunk(1, SECOND))
    assert spool.records == []


def test_a_recovered_backlog_keeps_spooling_until_a_session_has_caught_up(
    tmp_path: Path,
) -> None:
    first = spool_in(tmp_path)
    first.append(0, chunk(1, SECOND), 0.0)
    first.close()
    spool = Spool(tmp_path, 10 * MB, keep_free_bytes=0, keep_free_ratio=0)
    head = spool.recover("0123456789abcdef0123456789abcdef", 0)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool, head=head)
    assert buffer.spooling
    buffer.append(chunk(2, SECOND))
    assert spool.end == buffer.head, "new audio goes to disk behind the backlog"
    buffer.mark_sent(buffer.head)  # no session is up: nothing has caught up
    assert buffer.spooling
    buffer.session_opened()
    buffer.mark_sent(buffer.head)
    assert not buffer.spooling


def test_a_lost_session_cannot_end_the_spooling_it_started(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_opened()
    buffer.append(chunk(1, SECOND))
    buffer.session_lost(0)
    buffer.mark_sent(buffer.head)  # a send of the dying session, completing late
    assert buffer.spooling
    buffer.append(chunk(2, SECOND))
    assert spool.end == buffer.head


def test_a_replay_keeps_spooling_until_the_tail_is_half_a_second(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_lost(0)
    for _ in range(30):
        buffer.append(chunk(1, SECOND // 10))  # 3 s offline
    buffer.session_opened()
    buffer.mark_sent(SECOND)  # 2 s still to send
    assert buffer.spooling
    buffer.mark_sent(buffer.head - CAUGHT_UP_SAMPLES - 1)
    assert buffer.spooling
    buffer.mark_sent(buffer.head - CAUGHT_UP_SAMPLES)  # exactly caught up
    assert not buffer.spooling
    buffer.append(chunk(2, 100))
    assert spool.end == buffer.head - 100, "live audio stays in memory"


def test_sent_audio_leaving_memory_is_not_written_to_disk(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=300, spool=spool)
    buffer.session_opened()
    for value in range(3):
        buffer.append(chunk(value, 100))
    buffer.mark_sent(100)  # sent, not yet acknowledged
    buffer.append(chunk(3, 100))  # the sent chunk leaves memory
    assert spool.records == []
    assert buffer.dropped == 0


def test_unsent_audio_leaving_memory_goes_to_disk_and_is_still_sent(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=300, spool=spool)
    buffer.session_opened()
    for value in range(3):
        buffer.append(chunk(value + 1, 100), wall=1000.0 + value)
    buffer.append(chunk(4, 100), wall=1003.0)  # the first chunk leaves memory unsent
    assert [(r.start, r.end, r.wall) for r in spool.records] == [(0, 100, 1000.0)]
    assert buffer.dropped == 0
    assert buffer.sent == 0, "what went to disk is still to be sent"
    piece = buffer.read(buffer.sent, 10_000)
    assert (piece.start, values(piece.data)) == (0, [1] * 100)


# -- what is counted as dropped -------------------------------------------------


def test_a_single_lost_sample_is_counted_and_skipped() -> None:
    buffer = AudioBuffer(max_samples=2)
    for value in range(3):
        buffer.append(chunk(value, 1))
    assert buffer.dropped == 1
    assert buffer.sent == 1
    piece = buffer.read(buffer.sent, 100)
    assert (piece.start, values(piece.data)) == (1, [1, 2])


def test_without_a_spool_a_lost_session_is_replayed_from_memory_alone() -> None:
    buffer = AudioBuffer(max_samples=SECOND)
    buffer.session_opened()
    buffer.append(chunk(1, 4_000))
    buffer.mark_sent(4_000)
    buffer.session_lost(acknowledged=1_000)  # nowhere to put it: it stays in memory
    assert (buffer.spooling, buffer.sent) == (True, 1_000)
    buffer.append(chunk(2, 4_000))
    buffer.session_opened()
    piece = buffer.read(buffer.sent, 100 * SECOND)
    assert (piece.start, values(piece.data)) == (1_000, [1] * 3_000 + [2] * 4_000)
    buffer.mark_sent(piece.end)  # caught up
    assert not buffer.spooling
    assert buffer.dropped == 0


def test_reading_from_the_send_mark_after_a_loss_gives_the_audio_right_after_it() -> None:
    buffer = AudioBuffer(max_samples=300)
    for value in range(5):
        buffer.append(chunk(value, 100))
    assert buffer.dropped == 200
    assert buffer.sent == 200
    piece = buffer.read(buffer.sent, 50)
    assert (piece.start, values(piece.data)) == (200, [2] * 25)


def test_audio_lost_after_the_disk_failed_is_counted_once(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=2 * SECOND, spool=spool)
    buffer.session_lost(0)
    for _ in range(10):
        buffer.append(chunk(1, SECOND // 10))  # 1 s on disk
    disk_fails(spool)
    for _ in range(40):
        buffer.append(chunk(2, SECOND // 10))  # 4 s more: memory holds 2
    assert spool.end == SECOND
    assert buffer.dropped == 2 * SECOND, "exactly what neither disk nor memory holds"


def test_an_outage_longer_than_the_spool_counts_only_what_the_spool_dropped(
    tmp_path: Path,
) -> None:
    spool = spool_in(tmp_path, max_bytes=2 * MB)
    buffer = AudioBuffer(max_samples=5 * SECOND, spool=spool)
    buffer.session_lost(0)
    for _ in range(100):
        buffer.append(chunk(1, SECOND))  # 100 s: more than 2 MB of spool
    assert spool.dropped > 0
    assert buffer.dropped == spool.dropped
    assert spool.start == spool.dropped, "the oldest audio went, the rest is there"


# -- reading across disk and memory ---------------------------------------------


def test_an_outage_longer_than_memory_is_read_back_from_disk_in_order(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=SECOND, spool=spool)
    buffer.session_lost(0)
    for value in range(30):
        buffer.append(chunk(value + 1, SECOND // 10))  # 3 s: 1 s in memory
    position, seen = buffer.oldest, []
    while position < buffer.head:
        piece = buffer.read(position, 640)
        assert piece.start == position
        seen.extend(values(piece.data))
        position = piece.end
    assert seen == [v + 1 for v in range(30) for _ in range(SECOND // 10)]


def test_audio_still_in_memory_is_read_from_memory_in_one_piece(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_lost(0)
    for value in range(3):
        buffer.append(chunk(value + 1, 100))  # on disk and in memory
    piece = buffer.read(0, 10_000)
    assert (piece.start, piece.samples) == (0, 300)


def test_a_gap_between_disk_and_memory_is_skipped(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=300, spool=spool)
    buffer.session_lost(0)
    buffer.append(chunk(1, 100))  # on disk
    disk_fails(spool)
    for value in range(2, 7):
        buffer.append(chunk(value, 100))  # 100..300 lost, 300..600 in memory
    assert buffer.dropped == 200
    piece = buffer.read(150, 100)
    assert (piece.start, values(piece.data)) == (300, [4] * 50)


def test_acknowledging_part_of_a_backlog_deletes_the_disk_behind_it(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=5 * SECOND, spool=spool)
    buffer.session_lost(0)
    for _ in range(400):
        buffer.append(chunk(1, SECOND // 10))  # 40 s: two segments
    assert len(list(tmp_path.glob("*.spool"))) == 2
    buffer.session_opened()
    buffer.acknowledge(36 * SECOND + 50)  # inside a chunk still in memory
    assert len(list(tmp_path.glob("*.spool"))) == 1
    assert buffer.oldest == 36 * SECOND + 50


def test_persisting_writes_every_chunk_holding_unacknowledged_audio(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_opened()
    for value in range(3):
        buffer.append(chunk(value + 1, 100), wall=float(value))
    buffer.acknowledge(150)
    buffer.persist()
    assert [(r.start, r.end) for r in spool.records] == [(100, 200), (200, 300)]


# -- voice-activity gating --------------------------------------------------------


def test_skipped_silence_counts_as_sent_and_ends_spooling(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_lost(0)
    buffer.append(chunk(0, 1000))
    assert buffer.spooling
    buffer.skip_silence(600)
    assert buffer.sent == 600
    assert buffer.unsent_samples == 400
    assert not buffer.spooling
    buffer.skip_silence(5000)  # never past what was captured
    assert buffer.sent == 1000
    buffer.skip_silence(200)  # never backwards
    assert buffer.sent == 1000
    buffer.append(chunk(1, 100))
    assert spool.end == 1000, "silence is not a backlog: no disk writes"


# -- a rest (privacy mute): no session, and none wanted ------------------------


def test_a_rest_with_everything_transcribed_keeps_new_audio_off_the_disk(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_opened()
    buffer.append(chunk(1, SECOND))
    buffer.mark_sent(buffer.head)
    buffer.acknowledge(buffer.head)
    buffer.session_lost(buffer.head)  # the mute closes the session
    assert buffer.spooling
    buffer.rest()
    assert not buffer.spooling
    buffer.append(chunk(2, SECOND))
    assert spool.records == [], "live audio again, as at a fresh start"


def test_a_rest_with_a_backlog_on_disk_goes_on_spooling(tmp_path: Path) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_opened()
    buffer.append(chunk(1, SECOND))
    buffer.session_lost(0)  # nothing transcribed: the second goes to disk
    assert spool.end == buffer.head
    buffer.rest()
    assert buffer.spooling
    buffer.append(chunk(2, SECOND))
    assert spool.end == buffer.head, "new audio goes to disk behind the backlog"


def test_a_rest_while_transcribed_audio_waits_on_disk_for_its_point_goes_on_spooling(
    tmp_path: Path,
) -> None:
    spool = spool_in(tmp_path)
    durable = 0  # the outbox has not yet synced the point that releases the disk
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool, release_limit=lambda: durable)
    buffer.session_opened()
    buffer.append(chunk(1, SECOND))
    buffer.session_lost(0)
    buffer.acknowledge(buffer.head)  # the closing session's last final
    assert spool.end == buffer.head, "kept on disk until the point is durable"
    buffer.rest()
    assert buffer.spooling
    buffer.append(chunk(2, SECOND))
    assert spool.end == buffer.head, "the disk goes on without a gap"


def test_a_rest_with_a_backlog_the_disk_refused_puts_it_on_disk_when_the_disk_is_back(
    tmp_path: Path,
) -> None:
    spool = spool_in(tmp_path)
    buffer = AudioBuffer(max_samples=10 * SECOND, spool=spool)
    buffer.session_opened()
    buffer.append(chunk(1, SECOND))
    disk_fails(spool)
    buffer.session_lost(0)
    assert spool.records == [], "the backlog is in memory only"
    buffer.rest()
    assert buffer.spooling, "still a backlog: the supervisor persists it when the disk is back"
    assert spool.retry()
    buffer.persist()
    buffer.append(chunk(2, SECOND))
    assert (spool.start, spool.end) == (0, buffer.head)


# -- long streams ------------------------------------------------------------------


def test_a_long_stream_keeps_memory_bounded_and_the_oldest_audio_readable() -> None:
    buffer = AudioBuffer(max_samples=100 * SECOND)
    for n in range(600):
        buffer.append(chunk(n % 100, 10))
    buffer.acknowledge(3000)  # 300 chunks released: the lists are compacted
    piece = buffer.read(0, 40)
    assert (piece.start, values(piece.data)) == (3000, [0] * 10 + [1] * 10)
    assert buffer.oldest == 3000
    for n in range(600, 20_000):
        buffer.append(chunk(n % 100, 10))
        buffer.mark_sent(buffer.head)
        buffer.acknowledge(buffer.head - 10)
    assert len(buffer._chunks) < 600, "released chunks do not pile up"
    assert values(buffer.read(0, 100).data) == [99] * 10
