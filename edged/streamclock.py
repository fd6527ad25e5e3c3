"""Wall-clock time of a stream-time sample, for the `time` field of payloads.

Stream time advances with captured samples, not with the wall clock: it
stops while a microphone is unplugged. The clock keeps anchors (a sample and
the wall time it was captured) and adds one whenever capture drifts from the
last anchor by more than a second, so a gap does not skew later times.
"""

from __future__ import annotations

import bisect
from datetime import UTC, datetime

from edged.config import SAMPLE_RATE

_MAX_ANCHORS = 1024
_DRIFT_S = 1.0


class StreamClock:
    def __init__(self) -> None:
        self._samples: list[int] = []
        self._walls: list[float] = []

    def captured(self, end_sample: int, wall: float) -> None:
        """`end_sample` (exclusive) was captured at `wall` (seconds since the epoch)."""
        if self._samples:
            predicted = self._walls[-1] + (end_sample - self._samples[-1]) / SAMPLE_RATE
            if abs(predicted - wall) <= _DRIFT_S:
                return
        self._samples.append(end_sample)
        self._walls.append(wall)
        if len(self._samples) > _MAX_ANCHORS:
            del self._samples[0], self._walls[0]

    def wall_time(self, sample: int) -> float | None:
        if not self._samples:
            return None
        index = max(bisect.bisect_right(self._samples, sample) - 1, 0)
        return self._walls[index] + (sample - self._samples[index]) / SAMPLE_RATE

    def iso(self, sample: int) -> str | None:
        wall = self.wall_time(sample)
        if wall is None:
            return None
        return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z"
        )
