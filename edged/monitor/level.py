"""Input level of 16 kHz s16le mono audio: RMS and peak in dBFS, clipping.

Pure Python and cheap enough for a Pi Zero: each chunk is boxed into a list
once (`tolist`), then `max`, `min` and `math.hypot` run their loops in C.
That is about twice as fast as `max`/`min` over the array and
`sum(map(operator.mul, a, a))`, which box every sample again per pass.
The daemon feeds a meter only while a monitor client is connected.
"""

from __future__ import annotations

import math
import sys
from array import array
from dataclasses import dataclass

from edged.config import SAMPLE_RATE

FLOOR_DBFS = -120.0  # digital silence has no logarithm; this is far below any microphone
FULL_SCALE = 32768  # 0 dBFS: a full-scale square wave has this RMS
# At or within 1 LSB of either rail: an ADC or a gain stage that ran out of range.
CLIP_HIGH = 32767 - 1
CLIP_LOW = -32768 + 1


def dbfs(value: float) -> float:
    """`value` (an amplitude in sample units) in dB relative to full scale."""
    if value <= 0:
        return FLOOR_DBFS
    return max(20.0 * math.log10(value / FULL_SCALE), FLOOR_DBFS)


@dataclass(frozen=True)
class Level:
    rms_dbfs: float
    peak_dbfs: float
    clipping: bool  # a sample at or within 1 LSB of full scale in the window
    since_s: float  # seconds of audio the window holds (0: none arrived)

    def as_dict(self) -> dict[str, float | bool]:
        return {"rms_dbfs": round(self.rms_dbfs, 1), "peak_dbfs": round(self.peak_dbfs, 1),
                "clipping": self.clipping, "since_s": round(self.since_s, 3)}


SILENT = Level(FLOOR_DBFS, FLOOR_DBFS, clipping=False, since_s=0.0)


class LevelMeter:
    """Accumulates chunks; `snapshot` reports the window since the last one."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._squares = 0.0  # sum of squared samples in the window
        self._samples = 0
        self._peak = 0  # largest |sample|
        self._clipping = False

    def feed(self, pcm: bytes) -> None:
        samples = array("h")
        samples.frombytes(pcm[: len(pcm) & ~1])  # whole samples; ALSA hands over whole frames
        if not samples:
            return
        if sys.byteorder == "big":
            samples.byteswap()  # the stream is little-endian whatever the host is
        values = samples.tolist()
        high, low = max(values), min(values)
        # hypot is the root of the sum of squares, computed in C without overflow.
        self._squares += math.hypot(*values) ** 2
        self._samples += len(values)
        self._peak = max(self._peak, high, -low)
        self._clipping = self._clipping or high >= CLIP_HIGH or low <= CLIP_LOW

    def snapshot(self) -> Level:
        if not self._samples:
            return SILENT
        level = Level(
            rms_dbfs=dbfs(math.sqrt(self._squares / self._samples)),
            peak_dbfs=dbfs(self._peak),
            clipping=self._clipping,
            since_s=self._samples / SAMPLE_RATE,
        )
        self.reset()
        return level
