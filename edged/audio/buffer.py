"""The audio buffer: captured audio indexed by stream time.

Stream time is counted in samples of the outbox's stream, which goes on
across restarts: a run starts at the durable transcription point, or after
the audio recovered from the spool, whichever is later. The buffer keeps
audio from the acknowledged point (the end of the last final transcript) to
the newest capture, so that a new STT session can re-send what a lost one
never got transcribed. It has two tiers:

- a memory ring of at most `max_samples`, the fast path;
- the disk spool, written while no session is up and until a new one has
  caught up with the backlog (so a crash, a SIGKILL or a restart in an
  outage or its replay loses nothing), and otherwise only with audio that
  would leave memory unsent. An SD card is not written during normal
  streaming.

Its marks:

- `head`: stream time just after the newest captured sample;
- `sent`: audio before it was handed to a live session (reset to the
  acknowledged point when a session is lost: audio given to a dying socket is
  lost with it);
- `oldest`: the oldest sample still to be read.

Audio that leaves memory unsent and is not on disk is counted in `dropped`,
and still counts in stream time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from edged.audio.spool import Spool
from edged.config import SAMPLE_RATE, SAMPLE_WIDTH

_COMPACT_AT = 256  # released chunks to accumulate before compacting the lists
# A session that has this little left to send has caught up with a backlog:
# from then on the tail lives in memory only, as in normal streaming.
CAUGHT_UP_SAMPLES = SAMPLE_RATE // 2


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

    def __init__(
        self,
        max_samples: int,
        on_append: Callable[[], None] | None = None,
        spool: Spool | None = None,
        head: int = 0,
        acknowledged: int = 0,
        release_limit: Callable[[], int] | None = None,
    ):
        if max_samples <= 0:
            raise ValueError("max_samples must be positive")
        self.max_samples = max_samples
        self.on_append = on_append
        self.spool = spool
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self._walls: list[float] = []
        self._first = 0  # index of the oldest live chunk in the lists
        self._held = 0  # samples held in memory
        self._acknowledged = acknowledged  # nothing before this is ever read again
        # The spool deletes audio only behind the point the outbox has on disk.
        self.release_limit = release_limit
        # Spooling: from a lost session until a new one catches up. A run
        # that starts with recovered audio is replaying a backlog.
        self._offline = spool is not None and spool.start is not None
        self._session_up = False
        self._dropped = 0
        self.head = max(head, acknowledged)
        self.sent = acknowledged

    @property
    def dropped(self) -> int:
        return self._dropped + (self.spool.dropped if self.spool else 0)

    # -- capture side ------------------------------------------------------

    def append(self, data: bytes, wall: float = 0.0) -> None:
        """Add newly captured audio (whole samples), captured at `wall`, at the head."""
        if len(data) % SAMPLE_WIDTH:
            data = data[: len(data) - len(data) % SAMPLE_WIDTH]
        if not data:
            return
        start = self.head
        self._starts.append(start)
        self._chunks.append(data)
        self._walls.append(wall)
        samples = len(data) // SAMPLE_WIDTH
        self.head += samples
        self._held += samples
        if self.spool is not None and self._offline:
            self.spool.append(start, data, wall)
        while self._held > self.max_samples:
            self._evict_oldest()
        if self.on_append is not None:
            self.on_append()

    def _evict_oldest(self) -> None:
        start, chunk = self._starts[self._first], self._chunks[self._first]
        end = start + len(chunk) // SAMPLE_WIDTH
        unsent_from = max(start, self.sent, self._acknowledged)
        if end > unsent_from and self.spool is not None:
            # Unsent audio leaving memory goes to disk rather than away
            # (already there if we are offline: append skips what it has).
            self.spool.append(start, chunk, self._walls[self._first])
        lost = max(end - unsent_from, 0) - self._on_disk(unsent_from, end)
        self._dropped += max(lost, 0)
        if lost > 0:
            self.sent = max(self.sent, end)
        self._pop_first()

    def _on_disk(self, start: int, end: int) -> int:
        if self.spool is None or self.spool.start is None or end <= start:
            return 0
        return max(min(end, self.spool.end) - max(start, self.spool.start), 0)

    def _pop_first(self) -> None:
        self._held -= len(self._chunks[self._first]) // SAMPLE_WIDTH
        self._chunks[self._first] = b""
        self._first += 1
        if self._first >= _COMPACT_AT and self._first * 2 >= len(self._chunks):
            del self._starts[: self._first]
            del self._chunks[: self._first]
            del self._walls[: self._first]
            self._first = 0

    # -- STT side ----------------------------------------------------------

    @property
    def _memory_oldest(self) -> int:
        return self._starts[self._first] if self._first < len(self._chunks) else self.head

    @property
    def oldest(self) -> int:
        """Stream time of the oldest sample still to be read (== head when none)."""
        oldest = self._memory_oldest
        if self.spool is not None and self.spool.start is not None:
            oldest = min(oldest, self.spool.start)
        return min(max(oldest, self._acknowledged), self.head)

    @property
    def spooling(self) -> bool:
        """Whether new audio goes to disk too (an outage, or its replay)."""
        return self._offline

    @property
    def unsent_samples(self) -> int:
        return self.head - self.sent

    def read(self, start: int, max_bytes: int) -> AudioSlice:
        """Contiguous audio from `start` (or the oldest held, if later), up to `max_bytes`."""
        start = max(start, self.oldest)
        max_bytes -= max_bytes % SAMPLE_WIDTH
        if start >= self.head or max_bytes <= 0:
            return AudioSlice(start, b"")
        if start < self._memory_oldest and self.spool is not None:
            spooled_start, data = self.spool.read(start, max_bytes)
            if data:
                return AudioSlice(spooled_start, data)
            start = max(start, self._memory_oldest)
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
        if self._offline and self._session_up and self.head - self.sent <= CAUGHT_UP_SAMPLES:
            self._offline = False  # caught up: the tail is live audio again
            if self.spool is not None:
                self.spool.sync()

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
        if self.spool is not None:
            limit = self.release_limit() if self.release_limit else self._acknowledged
            self.spool.release(min(self._acknowledged, limit))

    def skip_silence(self, end: int) -> None:
        """Voice-activity gating settled that audio before `end` is silence, never
        to be sent: it is not a backlog, so it is not put on disk."""
        self.sent = max(self.sent, min(end, self.head))
        self._offline = False

    def session_opened(self) -> None:
        """The backlog on disk is read from it and deleted as it is transcribed;
        new audio goes on to disk until the session has caught up."""
        self._session_up = True
        if self.spool is not None:
            self.spool.sync()

    def session_lost(self, acknowledged: int) -> None:
        """A session died: what it was sent after `acknowledged` must be sent again."""
        self._session_up = False
        self.sent = max(min(self.sent, acknowledged), self.oldest)
        self.go_offline()

    def rest(self) -> None:
        """No session, and none wanted (a privacy mute). If everything
        captured is transcribed, nothing is pending: the audio that comes
        after is live audio again, kept in memory while a session connects,
        as at a fresh start, rather than a backlog written to disk."""
        pending_on_disk = self.spool is not None and self.spool.start is not None
        if not pending_on_disk and self._acknowledged >= self.head:
            self._offline = False

    def go_offline(self) -> None:
        """No session is up (lost, or failing to connect): until one is, audio
        also goes to disk, starting with the unacknowledged audio in memory."""
        if not self._offline:
            self._offline = True
            self.persist()

    def persist(self) -> None:
        """Put the unacknowledged audio held in memory on disk (a session was lost,
        or the daemon stops with a backlog), so a crash or restart loses none of it."""
        if self.spool is None:
            return
        for index in range(self._first, len(self._chunks)):
            start, chunk = self._starts[index], self._chunks[index]
            if start + len(chunk) // SAMPLE_WIDTH > self._acknowledged:
                self.spool.append(start, chunk, self._walls[index])
        self.spool.sync()
