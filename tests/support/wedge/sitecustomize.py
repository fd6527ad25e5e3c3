"""Loaded at start-up by a daemon under test that has this directory on its
PYTHONPATH: SIGUSR2 wedges its event loop.

The handler runs in the main thread, which runs the event loop, and sleeps
there for $TEST_WEDGE_S seconds: the loop turns no more, while the capture
thread goes on reading the microphone, as with a callback stuck in a
blocking call. It says when it starts and ends (CLOCK_MONOTONIC, the same
for every process), on stderr: the daemon's log.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType


def _wedge(signum: int, frame: FrameType | None) -> None:
    seconds = float(os.environ.get("TEST_WEDGE_S", "3"))
    print(f"test.wedged at={time.monotonic():.6f} seconds={seconds}", file=sys.stderr,
          flush=True)
    time.sleep(seconds)
    print(f"test.unwedged at={time.monotonic():.6f}", file=sys.stderr, flush=True)


signal.signal(signal.SIGUSR2, _wedge)
