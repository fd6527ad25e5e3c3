"""The audio buffer: captured audio indexed by stream time, bounded in memory.

Stream time is counted in samples since the daemon started capturing. The
buffer keeps audio from the last acknowledged point (the end of the last
final transcript) to the newest capture, so that a new STT session can re-send
what a lost one never got transcribed. It owns three marks:

- `head`: stream time just after the newest captured sample;
- `sent`: audio before it was handed to a live session (reset to the
  acknowledged point when a session is lost: audio given to a dying socket is
  lost with it);
- the oldest sample still held.

When more than `max_samples` are held, the oldest audio goes; what had not
been delivered is counted in `dropped`, and still counts in stream time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from edged.config import SAMPLE_WIDTH

_COMPACT_AT = 256  # released chunks to accumulate before compacting the list


@dataclass(frozen=True)
class AudioSlice:
    start: int  # stream sample of the first byte
    data: bytes

    @property
    def samples(self) -> int:
        return len(self.data) // SAMPLE_WIDTH

    @property
    def end(self) -> int:
        return self.start + self.samples


class AudioBuffer:
    """Single-threaded (event loop) store of captured audio."""

    def __init__(self, max_samples: int, on_append: Callable[[], None] | None = None):
        if max_samples <= 0:
            raise ValueError("max_samples must be positive")
        self.max_samples = max_samples
        self.on_append = on_append
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self._first = 0  # index of the oldest live chunk in the lists
        self._held = 0  # samples held
        self._acknowledged = 0  # nothing before this is ever read again
        self.head = 0
        self.sent = 0
        self.dropped = 0

    # -- capture side ------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Add newly captured audio (whole samples) at the head."""
        if len(data) % SAMPLE_WIDTH:
            data = data[: len(data) - len(data) % SAMPLE_WIDTH]
        if not data:
            return
        self._starts.append(self.head)
        self._chunks.append(data)
        samples = len(data) // SAMPLE_WIDTH
        self.head += samples
        self._held += samples
        while self._held > self.max_samples:
            self._evict_oldest()
        if self.on_append is not None:
            self.on_append()

    def _evict_oldest(self) -> None:
        start = self._starts[self._first]
        end = start + len(self._chunks[self._first]) // SAMPLE_WIDTH
        self.dropped += max(end - max(start, self.sent), 0)
        self.sent = max(self.sent, end)
        self._pop_first()

    def _pop_first(self) -> None:
        self._held -= len(self._chunks[self._first]) // SAMPLE_WIDTH
        self._chunks[self._first] = b""
        self._first += 1
        if self._first >= _COMPACT_AT and self._first * 2 >= len(self._chunks):
            del self._starts[: self._first]
            del self._chunks[: self._first]
            self._first = 0

    # -- STT side ----------------------------------------------------------

    @property
    def oldest(self) -> int:
        """Stream time of the oldest sample still to be read (== head when none)."""
        if self._first >= len(self._chunks):
            return self.head
        return max(self._starts[self._first], self._acknowledged)

    @property
    def unsent_samples(self) -> int:
        return self.head - self.sent

    def read(self, start: int, max_bytes: int) -> AudioSlice:
        """Contiguous audio from `start` (or the oldest held, if later), up to `max_bytes`."""
        start = max(start, self.oldest)
        max_bytes -= max_bytes % SAMPLE_WIDTH
        if start >= self.head or max_bytes <= 0:
            return AudioSlice(start, b"")
        index = bisect.bisect_right(self._starts, start, lo=self._first) - 1
        parts: list[bytes] = []
        size = 0
        offset = (start - self._starts[index]) * SAMPLE_WIDTH
        while index < len(self._chunks) and size < max_bytes:
            # A slice covering a whole bytes object is that object: no copy.
            piece = self._chunks[index][offset : offset + max_bytes - size]
            parts.append(piece)
            size += len(piece)
            offset = 0
            index += 1
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return AudioSlice(start, data)

    def mark_sent(self, end: int) -> None:
        """Audio before `end` has been handed to a live session."""
        self.sent = max(self.sent, min(end, self.head))

    def acknowledge(self, end: int) -> None:
        """Audio before `end` is transcribed: it need never be sent again."""
        end = min(end, self.head)
        self.sent = max(self.sent, end)
        self._acknowledged = max(self._acknowledged, end)
        while self._first < len(self._chunks):
            chunk_end = self._starts[self._first] + len(self._chunks[self._first]) // SAMPLE_WIDTH
            if chunk_end > end:
                break
            self._pop_first()

    def session_lost(self, acknowledged: int) -> None:
        """A session died: what it was sent after `acknowledged` must be sent again."""
        self.sent = max(min(self.sent, acknowledged), self.oldest)
