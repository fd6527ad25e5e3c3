"""The MQTT reconnect schedule, without I/O: full jitter over an exponential
ceiling (5 s doubling to 60 s, never under 0.5 s), reset only by a connection
that stayed up 30 s; and a fleet through a broker outage, simulated."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from edged.mqtt.backoff import (
    BACKOFF_FLOOR_S,
    BACKOFF_MAX_S,
    STABLE_CONNECTION_S,
    ReconnectSchedule,
    reconnect_delay,
)


def test_the_ceiling_doubles_from_five_seconds_to_sixty() -> None:
    highs = [reconnect_delay(n, uniform=lambda: 1.0) for n in range(1, 8)]
    assert highs == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_every_wait_is_at_least_the_floor() -> None:
    lows = [reconnect_delay(n, uniform=lambda: 0.0) for n in range(1, 10)]
    assert lows == [BACKOFF_FLOOR_S] * 9 == [0.5] * 9


def test_the_wait_is_uniform_between_the_floor_and_the_ceiling() -> None:
    assert reconnect_delay(3, uniform=lambda: 0.5) == 0.5 + 0.5 * (20.0 - 0.5)
    assert reconnect_delay(1, uniform=lambda: 0.25) == 0.5 + 0.25 * (5.0 - 0.5)


@pytest.mark.parametrize("failures", [0, -3])
def test_a_count_below_one_waits_like_the_first_failure(failures: int) -> None:
    assert reconnect_delay(failures, uniform=lambda: 1.0) == 5.0


def test_a_day_of_failures_still_waits_at_most_the_cap() -> None:
    assert reconnect_delay(10**6, uniform=lambda: 1.0) == BACKOFF_MAX_S


def test_failures_count_up_while_connections_do_not_last() -> None:
    schedule = ReconnectSchedule(uniform=lambda: 1.0)
    assert not schedule.up
    assert schedule.next_delay(0.0) == 5.0  # the broker was not there
    assert schedule.next_delay(5.0) == 10.0
    schedule.connected(15.0)
    assert schedule.up
    # Accepted, then dropped before it was stable: the waits go on growing.
    assert schedule.next_delay(15.0 + STABLE_CONNECTION_S - 0.001) == 20.0
    assert not schedule.up
    assert schedule.failures == 3


def test_a_connection_that_lasted_starts_the_backoff_afresh() -> None:
    schedule = ReconnectSchedule(uniform=lambda: 1.0)
    for now in range(6):
        schedule.next_delay(float(now))
    assert schedule.failures == 6
    schedule.connected(100.0)
    assert schedule.next_delay(100.0 + STABLE_CONNECTION_S) == 5.0  # exactly 30 s is stable
    assert schedule.failures == 1


def test_a_stable_connection_long_ago_does_not_reset_a_later_failure() -> None:
    schedule = ReconnectSchedule(uniform=lambda: 1.0)
    schedule.connected(0.0)
    assert schedule.next_delay(100.0) == 5.0
    assert schedule.next_delay(200.0) == 10.0, "no connection since: not reset again"


def reconnect_times(daemons: int, outage_s: float,
                    draws: Callable[[int], Callable[[], float]]) -> list[float]:
    """When each of `daemons`, all connected for long and all dropped at 0 by a
    broker back at `outage_s`, connects again (attempts fail at once meanwhile);
    daemon n draws its jitter from `draws(n)`."""
    times = []
    for number in range(daemons):
        schedule = ReconnectSchedule(uniform=draws(number))
        schedule.connected(-3600.0)
        now = 0.0
        while True:
            now += schedule.next_delay(now)
            if now >= outage_s:
                times.append(now)
                break
    return times


def largest_share_in_a_second(times: list[float]) -> float:
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times) / len(times)


@pytest.mark.parametrize("seed", range(5))
def test_a_fleet_through_a_twenty_second_outage_comes_back_spread_out(seed: int) -> None:
    times = reconnect_times(50, 20.0, lambda n: random.Random(seed * 1000 + n).random)
    assert largest_share_in_a_second(times) <= 0.25
    assert max(times) - min(times) >= 10.0
    assert max(times) < 20.0 + BACKOFF_MAX_S, "nobody waits more than the cap after the return"


@pytest.mark.parametrize("seed", range(5))
def test_a_fleet_through_a_broker_restart_does_not_come_back_at_once(seed: int) -> None:
    """A broker back within half a second (a restart): the first waits alone
    spread the fleet, no second holds half of it."""
    times = reconnect_times(50, 0.5, lambda n: random.Random(seed * 1000 + n).random)
    assert largest_share_in_a_second(times) < 0.5
    assert max(times) <= 0.5 + 5.0


def test_the_spread_is_the_jitters_doing() -> None:
    """The same fleet with every draw alike (no jitter) comes back in one instant."""
    times = reconnect_times(50, 20.0, lambda n: lambda: 0.5)
    assert largest_share_in_a_second(times) == 1.0
