"""Waiting for events, not for time.

A test waits for the thing itself (a message, a datagram, a log line, bytes
the double received) with a deadline, and a wait that runs out fails loudly,
saying what it waited for. The one legitimate fixed wait is a quiet period:
checking that something does *not* happen for a while (a late duplicate, a
retry too soon), and that is said by name with `assert_quiet`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 20.0,
               poll_s: float = 0.02) -> T:
    """Poll `condition` until it returns something true, and return that; after
    `timeout`, fail with `what` (a description of the awaited event)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll_s)


def assert_quiet(still_true: Callable[[], bool], for_s: float, what: str,
                 poll_s: float = 0.05) -> None:
    """A quiet period: `still_true` must hold for all of `for_s` seconds
    (nothing late arrives, nothing is retried too soon). Fails at once when not."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        assert still_true(), f"{what}: broken {for_s - (deadline - time.monotonic()):.2f}s in"
        time.sleep(poll_s)
    assert still_true(), f"{what}: broken at the end of {for_s}s"
