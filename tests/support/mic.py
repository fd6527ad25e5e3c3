"""A microphone made of a FIFO and alsa-lib's `file` plugin.

The daemon opens `testmic` with pyalsaaudio like any capture device; the
plugin reads the FIFO once per period, so the feeder writes exactly one
period at a time, paced like a real microphone (or faster, for speed).
Stream time is exact: sample n of what was written is stream sample n.
The feeder remembers the wall-clock time at which it wrote each period (what
a transcript's `time` must say), and can tell how far the reader has read.
"""

from __future__ import annotations

import array
import bisect
import fcntl
import os
import queue
import termios
import threading
import time
from pathlib import Path
from typing import BinaryIO

RATE = 16_000
PERIOD_MS = 100


def write_asoundrc(home: Path, fifo: Path, name: str = "testmic") -> None:
    """Define the ALSA device `name` reading `fifo` (other devices in the file are kept)."""
    rc = home / ".asoundrc"
    others = [line for line in (rc.read_text().splitlines() if rc.exists() else [])
              if not line.startswith(f"pcm.{name} ")]
    rc.write_text("".join(f"{line}\n" for line in others) + (
        f'pcm.{name} {{ type file; slave.pcm "null"; file "/dev/null"; '
        f'infile "{fifo}"; format "raw" }}\n'
    ))


class FifoMic:
    """Feeds queued audio (silence when none) into a FIFO at `speed` x real time."""

    def __init__(self, home: Path, speed: float = 1.0, period_ms: int = PERIOD_MS,
                 name: str = "testmic"):
        self.name = name  # the ALSA device
        self.fifo = home / ("mic.fifo" if name == "testmic" else f"{name}.fifo")
        os.mkfifo(self.fifo)
        write_asoundrc(home, self.fifo, name)
        self.speed = speed
        self.period_ms = period_ms
        self.period_bytes = RATE * 2 * period_ms // 1000  # what the reader reads at once
        self.written = 0  # bytes: stream position of the next byte
        self.fed = 0  # bytes in the pipe or read from it
        # Where each run of periods began (byte position) and the wall clock
        # (time.time()) at which its first period was written.
        self._wall_positions: list[int] = []
        self._walls: list[float] = []
        self._fd: int | None = None
        self.paused = threading.Event()
        self._queue: queue.Queue[bytes] = queue.Queue()
        self._pending = b""
        self._queued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fifo-mic")
        self._thread.start()

    def play(self, pcm: bytes) -> float:
        """Queue audio; returns the stream time (s) at which it will start."""
        pcm += bytes(-len(pcm) % self.period_bytes)  # whole periods, padded with silence
        with self._lock:
            start = (self.written + len(self._pending) + self._queued) / 2 / RATE
            self._queued += len(pcm)
            # One queue item per period: no copying of the rest at every write.
            for offset in range(0, len(pcm), self.period_bytes):
                self._queue.put(pcm[offset : offset + self.period_bytes])
        return start

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until everything queued has been written; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while self._pending or not self._queue.empty():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the microphone still had audio to play after {timeout}s "
                                   f"(at {self.stream_seconds:.1f} s; is anybody reading?)")
            time.sleep(0.01)

    @property
    def read_seconds(self) -> float:
        """Stream time up to which the reader (the daemon's ALSA device) has read."""
        fd = self._fd
        unread = array.array("i", [0])
        if fd is not None:
            try:
                fcntl.ioctl(fd, termios.FIONREAD, unread)
            except OSError:  # closed under our feet: the reader is gone
                unread[0] = 0
        return max(self.fed - unread[0], 0) / 2 / RATE

    def wait_read(self, stream_s: float, timeout: float = 20.0) -> None:
        """Block until the reader has read the audio up to `stream_s`; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.read_seconds < stream_s:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reader has read {self.read_seconds:.2f} s of "
                                   f"{stream_s:.2f} s after {timeout}s")
            time.sleep(0.005)

    def wall_time(self, stream_s: float) -> float:
        """The wall-clock time (time.time()) at which stream time `stream_s` was
        written: when its period went into the FIFO, plus its place in the period."""
        position = round(stream_s * RATE) * 2
        index = bisect.bisect_right(self._wall_positions, position) - 1
        if index < 0 or position >= self.written:
            raise ValueError(f"{stream_s} s has not been written yet")
        return self._walls[index] + (position - self._wall_positions[index]) / 2 / RATE / self.speed

    @property
    def idle(self) -> bool:
        """Everything queued has been written."""
        return not self._pending and self._queue.empty()

    @property
    def reader_attached(self) -> bool:
        """Whether somebody (the daemon's ALSA device) has the FIFO open for
        reading. Its leaving is noticed at the next write: within a period."""
        return self._fd is not None

    def drop_queued(self) -> None:
        """Forget what was queued and not written: sound in a room that no
        open microphone heard is gone (a FIFO would keep it for the next reader)."""
        with self._lock:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._pending = b""
            self._queued = 0

    @property
    def stream_seconds(self) -> float:
        return self.written / 2 / RATE

    def stop(self) -> None:
        self._stop.set()
        # Unblock an open() waiting for a reader, so the thread can end.
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        self._thread.join(5)

    def _run(self) -> None:
        # Reopens after the reader goes away, so a restarted daemon finds
        # its microphone again, like a real device.
        while not self._stop.is_set():
            with open(self.fifo, "wb", buffering=0) as fifo:  # waits for a reader
                self._opened.set()
                self._fd = fifo.fileno()
                try:
                    self._feed(fifo)
                finally:
                    self._fd = None
                    self.fed = self.written  # what the pipe held is gone with the reader

    def _feed(self, fifo: BinaryIO) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.paused.is_set():  # a stalled microphone: nothing arrives
                time.sleep(0.01)
                next_at = time.monotonic()
                continue
            position = self.written
            period = self._next_period()
            wall = time.time()
            try:
                fifo.write(period)  # a period is at most PIPE_BUF: all of it or nothing
            except BrokenPipeError:
                return
            self.fed = position + len(period)
            self._written_at(position, wall)
            next_at += self.period_ms / 1000 / self.speed
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _written_at(self, position: int, wall: float) -> None:
        """Remember when `position` was written: a new entry only when the pace
        was broken (a pause, a reader that came late), as one per period would grow."""
        if self._walls:
            elapsed = (position - self._wall_positions[-1]) / 2 / RATE / self.speed
            expected = self._walls[-1] + elapsed
            if abs(wall - expected) < 0.02:
                return
        self._walls.append(wall)  # first: a reader in another thread indexes by position
        self._wall_positions.append(position)

    def _next_period(self) -> bytes:
        # Counted as written when taken, under the lock, so `play` sees exact positions.
        with self._lock:
            if not self._pending:
                try:
                    self._pending = self._queue.get_nowait()
                    self._queued -= len(self._pending)
                except queue.Empty:
                    self.written += self.period_bytes
                    return bytes(self.period_bytes)
            size = self.period_bytes
            period, self._pending = self._pending[:size], self._pending[size:]
            self.written += len(period)
            return period
