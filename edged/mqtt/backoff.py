"""When the MQTT client tries the broker again, without I/O.

The same shape as the STT side's (`edged.stt.policy`): full jitter over an
exponential ceiling, never below a floor. A broker that restarts drops every
device of a fleet at the same instant; waits without jitter would bring them
all back in the same millisecond. The count of failures starts afresh only
after a connection that stayed up `STABLE_CONNECTION_S`, as an STT session
must: a broker that accepts and then drops at once (an ACL that kicks the
client, a session taken over, a flapping link) sees the waits grow instead of
a retry a second.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# The first ceiling; it doubles with each failure. Not 1 s: a broker that
# restarts in a second (an upgrade, Home Assistant restarting its add-on)
# drops the whole fleet at once, and a first wait drawn from 0.5..1 s brings
# every device back inside the same half second. Drawn from 0.5..5 s, a third
# of a fleet at most lands in any one second; one device's blip costs its
# transcripts 2.75 s on average in the outbox.
BACKOFF_INITIAL_S = 5.0
BACKOFF_MAX_S = 60.0
BACKOFF_FLOOR_S = 0.5  # even a connection that dies at once is not retried in a hot loop
STABLE_CONNECTION_S = 30.0  # a connection that lived this long resets the backoff


def reconnect_delay(consecutive_failures: int,
                    uniform: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `consecutive_failures`-th failure in a row
    (1 for the first): uniform between the floor and the ceiling."""
    exponent = min(max(consecutive_failures - 1, 0), 16)
    ceiling = min(BACKOFF_INITIAL_S * 2.0**exponent, BACKOFF_MAX_S)
    return BACKOFF_FLOOR_S + uniform() * (ceiling - BACKOFF_FLOOR_S)


class ReconnectSchedule:
    """The waits between connection attempts, fed with what happened and when
    (`now` in monotonic seconds). The first attempt is not the schedule's: it
    is made at once."""

    def __init__(self, uniform: Callable[[], float] = random.random):
        self.failures = 0  # in a row, since the last stable connection
        self._up_since: float | None = None
        self._uniform = uniform

    @property
    def up(self) -> bool:
        """A connection was accepted and has not been lost since."""
        return self._up_since is not None

    def connected(self, now: float) -> None:
        self._up_since = now

    def next_delay(self, now: float) -> float:
        """A connection was lost, or an attempt failed, at `now`: the seconds
        to wait before the next attempt."""
        if self._up_since is not None and now - self._up_since >= STABLE_CONNECTION_S:
            self.failures = 0
        self._up_since = None
        self.failures += 1
        return reconnect_delay(self.failures, self._uniform)
