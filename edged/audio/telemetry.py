"""Audio health telemetry: the level of what the microphone hears, and when to
say it, without I/O. The supervisor feeds every hand-off and publishes what
`report` returns on `<base>/<device>/audio`, retained:

    {"rms_dbfs": -41.3, "peak_dbfs": -18.2, "clipping": 0.0012,
     "microphone": "ok", "gain_db": 0.0, "interval_s": 10.0}

- `rms_dbfs`, `peak_dbfs`: over the audio captured since the last report
  (`interval_s` seconds of wall time), after the gain; -120 is exact digital
  silence; null when no audio arrived at all (the microphone absent or stalled).
- `clipping`: the share of those samples at or within 1 LSB of full scale
  (null without audio).
- `microphone`: ok | stalled | silent | absent (edged.audio.health).

When: every `interval_s`; sooner when the RMS level of the last second of
audio is `change_db` or more away from the last reported level (someone
starts talking, a loud room goes quiet), at most once per second; and at
once when the microphone's condition, the gain or the MQTT connection
changed (a new connection: the broker may have lost the retained copy).

A change is judged on one-second blocks, not on the whole window: after nine
loud seconds, the window's RMS would take half a minute of silence to fall
by 6 dB. The report then still gives the window's level; if that is not yet
the new one, the next block (a second later) reports again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from dataclasses import dataclass

from edged.config import SAMPLE_RATE
from edged.monitor.level import LevelMeter, dbfs

BLOCK_S = 1.0  # level changes are judged on blocks of this much audio
MIN_GAP_S = 1.0  # and reported at most this often (a burst of audio after a stall)
_BLOCK_SAMPLES = round(BLOCK_S * SAMPLE_RATE)


@dataclass(frozen=True)
class Context:
    """What a report says besides the levels; a change makes a report due at once."""

    microphone: str
    gain_db: float
    connection: Hashable  # a new MQTT connection wants the retained copy again


class AudioTelemetry:
    def __init__(self, interval_s: float, change_db: float, now: float):
        self.interval_s = interval_s
        self.change_db = change_db  # 0: only on the interval
        self.meter = LevelMeter()
        self._window_start = now  # monotonic seconds
        self._reported_at: float | None = None
        self._reported_rms: float | None = None
        self._reported: Context | None = None
        self._moved = False  # a block's level moved by change_db since the last report
        self._block_samples = 0  # where the current block began in the meter's window
        self._block_squares = 0.0

    def feed(self, data: bytes) -> bool:
        """A hand-off of audio (after the gain); whether the level moved enough
        to make a report due."""
        meter = self.meter
        meter.feed(data)
        samples = meter.samples - self._block_samples
        if samples >= _BLOCK_SAMPLES:
            rms = dbfs(math.sqrt((meter.squares - self._block_squares) / samples))
            self._block_samples, self._block_squares = meter.samples, meter.squares
            if self.change_db and self._reported_at is not None and (
                    self._reported_rms is None
                    or abs(rms - self._reported_rms) >= self.change_db):
                self._moved = True
        return self._moved

    def due(self, context: Context, now: float) -> bool:
        """Whether a report is due at `now`."""
        if self._reported_at is None or context != self._reported:
            return True
        since = now - self._reported_at
        return since >= self.interval_s or (self._moved and since >= MIN_GAP_S)

    def due_in(self, now: float) -> float:
        """Seconds until the interval makes a report due (the caller is told
        of level changes by `feed`, and knows of context changes)."""
        if self._reported_at is None:
            return 0.0
        wait = MIN_GAP_S if self._moved else self.interval_s
        return max(self._reported_at + wait - now, 0.0)

    def report(self, context: Context, now: float) -> bytes:
        """The payload for the window that ends at `now`; a new window begins."""
        has_audio = self.meter.samples > 0
        level = self.meter.snapshot()
        body = {
            "rms_dbfs": round(level.rms_dbfs, 1) if has_audio else None,
            "peak_dbfs": round(level.peak_dbfs, 1) if has_audio else None,
            "clipping": round(level.clipped_share, 6) if has_audio else None,
            "microphone": context.microphone,
            "gain_db": context.gain_db,
            "interval_s": round(now - self._window_start, 1),
        }
        self._window_start = self._reported_at = now
        self._reported_rms = level.rms_dbfs if has_audio else None
        self._reported = context
        self._moved = False
        self._block_samples, self._block_squares = 0, 0.0
        return json.dumps(body, separators=(",", ":")).encode()
