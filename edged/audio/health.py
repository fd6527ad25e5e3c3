"""Is the microphone really delivering? Judged from what it hands over, without I/O.

- `stalled`: open, but nothing has arrived for `stall_after_s` (a wedged
  driver, a USB hub that browned out). A restart may cure it: the watchdog
  is not fed.
- `silent`: it delivers, but every sample has been the same value (exact
  digital silence, or a value stuck) for `silent_after_s`. A real room,
  however quiet, has noise in the lowest bits; a dead USB microphone or a
  muted capture switch gives exact zeros.
- `absent`: not open (missing, unplugged, being retried).
- `ok` otherwise.
"""

from __future__ import annotations

OK = "ok"
STALLED = "stalled"
SILENT = "silent"
ABSENT = "absent"


class MicrophoneHealth:
    def __init__(self, stall_after_s: float, silent_after_s: float):
        self.stall_after_s = stall_after_s
        self.silent_after_s = silent_after_s  # 0: never judged silent
        self.last_audio: float | None = None  # monotonic time of the last hand-over
        self._flat_since: float | None = None

    def delivered(self, data: bytes, now: float) -> None:
        """A hand-over of PCM arrived at `now` (monotonic seconds)."""
        self.last_audio = now
        # One value repeated: a compare of two buffers, done in C.
        flat = len(data) >= 2 and data == data[:2] * (len(data) // 2)
        if not flat:
            self._flat_since = None
        elif self._flat_since is None:
            self._flat_since = now

    def reset(self, now: float) -> None:
        """The device was (re)opened: judge afresh from now."""
        self.last_audio = now
        self._flat_since = None

    def condition(self, is_open: bool, now: float) -> str:
        if not is_open:
            return ABSENT
        if self.last_audio is None or now - self.last_audio >= self.stall_after_s:
            return STALLED
        if (self.silent_after_s and self._flat_since is not None
                and now - self._flat_since >= self.silent_after_s):
            return SILENT
        return OK

    def next_change(self, now: float) -> float:
        """When the condition may change without new audio (seconds from now)."""
        deadlines = []
        if self.last_audio is not None:
            deadlines.append(self.last_audio + self.stall_after_s)
        if self.silent_after_s and self._flat_since is not None:
            deadlines.append(self._flat_since + self.silent_after_s)
        future = [deadline - now for deadline in deadlines if deadline > now]
        return min(future) if future else 1.0
