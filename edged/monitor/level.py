"""Input level of 16 kHz s16le mono audio: RMS and peak in dBFS, clipping.

Cheap enough to run on every hand-off on a Pi Zero: the sums are taken in C
by `edged.audio.pcm` (about 6 us per 250 ms of audio on a desktop core,
against 160 us for the best pure-Python loop). The daemon feeds one meter
for the audio telemetry all the time, and one more while a monitor client
is connected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edged.audio import pcm
from edged.audio.pcm import CLIP_HIGH, CLIP_LOW
from edged.config import SAMPLE_RATE

__all__ = ["CLIP_HIGH", "CLIP_LOW", "FLOOR_DBFS", "FULL_SCALE", "SILENT", "Level", "LevelMeter",
           "dbfs"]

FLOOR_DBFS = -120.0  # digital silence has no logarithm; this is far below any microphone
FULL_SCALE = 32768  # 0 dBFS: a full-scale square wave has this RMS


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
    clipped_share: float = 0.0  # of the window's samples, those at or within 1 LSB of full scale

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
        self._clipped = 0  # samples at or within 1 LSB of a rail

    def feed(self, data: bytes) -> None:
        samples = pcm.native(pcm.whole(data))
        if not samples:
            return
        low, high = pcm.minmax(samples)
        self._squares += pcm.sum_of_squares(samples)
        self._samples += len(samples) // pcm.WIDTH
        self._peak = max(self._peak, high, -low)
        if high >= CLIP_HIGH or low <= CLIP_LOW:  # counted only where there is any
            self._clipped += pcm.clipped(samples)

    @property
    def samples(self) -> int:
        """Samples in the window so far."""
        return self._samples

    @property
    def squares(self) -> float:
        """The sum of the squared samples in the window so far."""
        return self._squares

    def snapshot(self) -> Level:
        if not self._samples:
            return SILENT
        level = Level(
            rms_dbfs=dbfs(math.sqrt(self._squares / self._samples)),
            peak_dbfs=dbfs(self._peak),
            clipping=self._clipped > 0,
            since_s=self._samples / SAMPLE_RATE,
            clipped_share=self._clipped / self._samples,
        )
        self.reset()
        return level
