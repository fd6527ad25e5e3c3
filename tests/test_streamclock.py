"""The `time` field's clock: stream time to the wall clock at capture.

The supervisor tells the clock, at each hand-over from the capture thread,
that the batch's last sample was captured now (`captured(head, now, samples)`).
"""

from __future__ import annotations

import pytest

from edged.streamclock import StreamClock

SECOND = 16_000


def test_time_is_the_capture_time_across_steady_capture_and_a_long_gap() -> None:
    clock = StreamClock()
    for n in range(1, 11):  # ten seconds, one hand-over a second
        clock.captured(n * SECOND, 1000.0 + n, SECOND)
    clock.captured(11 * SECOND, 1011.0 + 5.0, SECOND)  # the microphone was away 5 s
    clock.captured(12 * SECOND, 1017.0, SECOND)
    assert clock.wall_time(5 * SECOND) == pytest.approx(1005.0)
    assert clock.wall_time(11 * SECOND + SECOND // 2) == pytest.approx(1016.5)


def test_time_is_the_capture_time_after_a_gap_shorter_than_a_second() -> None:
    clock = StreamClock()
    clock.captured(SECOND, 1001.0, SECOND)  # the first second, captured up to 1001.0
    clock.captured(2 * SECOND, 1002.8, SECOND)  # a 0.8 s gap, then the next second
    clock.captured(3 * SECOND, 1003.8, SECOND)
    assert clock.wall_time(2 * SECOND) == pytest.approx(1002.8, abs=0.1)


def test_time_is_the_capture_time_in_the_first_hand_over_after_a_gap() -> None:
    clock = StreamClock()
    clock.captured(SECOND, 1001.0, SECOND)
    clock.captured(SECOND + 4_800, 1010.0, 4_800)  # 0.3 s handed over after a 8.7 s gap
    assert clock.wall_time(SECOND + 1_600) == pytest.approx(1009.8, abs=0.1)


def test_a_hand_over_handled_late_by_a_busy_loop_adds_no_anchor_and_errs_little() -> None:
    """Each hand-over is stamped when the loop gets to it: 0.2 s late is that
    delay, not a gap, and the times around it stay within it."""
    clock = StreamClock()
    quarter = SECOND // 4
    for n in range(1, 9):
        late = 0.2 if n == 4 else 0.0
        clock.captured(n * quarter, 1000.0 + n * 0.25 + late, quarter)
    assert len(clock._samples) == 1
    for n in range(8):
        assert clock.wall_time(n * quarter) == pytest.approx(1000.0 + n * 0.25, abs=0.2)


def test_after_a_mute_the_words_of_the_first_hand_over_get_their_own_time() -> None:
    """Muted for a minute: no samples, so the first hand-over after the unmute
    continues stream time where it stopped, 60 s later on the wall clock."""
    clock = StreamClock()
    quarter = SECOND // 4
    for n in range(1, 5):
        clock.captured(n * quarter, 1000.0 + n * 0.25, quarter)
    for n in range(5, 9):  # unmuted at 1061.0
        clock.captured(n * quarter, 1061.0 + (n - 4) * 0.25, quarter)
    assert clock.wall_time(2 * quarter) == pytest.approx(1000.5)
    assert clock.wall_time(4 * quarter + 100) == pytest.approx(1061.0 + 100 / SECOND)
    assert clock.wall_time(7 * quarter) == pytest.approx(1061.75)
