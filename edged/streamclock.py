"""Wall-clock time of a stream-time sample, for the `time` field of payloads.

Stream time advances with captured samples, not with the wall clock: it
stops while a microphone is unplugged or muted. The clock keeps anchors (a
sample and the wall time it was captured) and adds one at the first sample
of a hand-over that came later than the last anchor predicts (a gap), or
much earlier, so a gap does not skew the times after it, nor the hand-over
right after it.
"""

from __future__ import annotations

import bisect
from datetime import UTC, datetime

from edged.config import SAMPLE_RATE

_MAX_ANCHORS = 1024
# A hand-over is handled on the event loop, a little after its last sample:
# lateness under this is that delay, not a gap in capture. Above it, a new
# anchor, so no time is off by more than this.
_GAP_S = 0.25
# Earlier than predicted happens only after an anchor made late by a busy
# loop (or a clock step): re-anchored past this.
_EARLY_S = 1.0


class StreamClock:
    def __init__(self) -> None:
        self._samples: list[int] = []
        self._walls: list[float] = []

    def captured(self, end_sample: int, wall: float, samples: int) -> None:
        """The `samples` before `end_sample` (exclusive) were handed over, the
        last of them captured at `wall` (seconds since the epoch)."""
        start_sample = end_sample - samples
        start_wall = wall - samples / SAMPLE_RATE
        if self._samples:
            late = start_wall - (self._walls[-1] + (start_sample - self._samples[-1]) / SAMPLE_RATE)
            if -_EARLY_S <= late <= _GAP_S:
                return
        self._samples.append(start_sample)
        self._walls.append(start_wall)
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
