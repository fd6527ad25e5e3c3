"""A microphone made of a FIFO and alsa-lib's `file` plugin.

The daemon opens `testmic` with pyalsaaudio like any capture device; the
plugin reads the FIFO once per period, so the feeder writes exactly one
period at a time, paced like a real microphone (or faster, for speed).
Stream time is exact: sample n of what was written is stream sample n.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import BinaryIO

RATE = 16_000
PERIOD_MS = 100


def write_asoundrc(home: Path, fifo: Path, name: str = "testmic") -> None:
    (home / ".asoundrc").write_text(
        f'pcm.{name} {{ type file; slave.pcm "null"; file "/dev/null"; '
        f'infile "{fifo}"; format "raw" }}\n'
    )


class FifoMic:
    """Feeds queued audio (silence when none) into a FIFO at `speed` x real time."""

    def __init__(self, home: Path, speed: float = 1.0, period_ms: int = PERIOD_MS):
        self.fifo = home / "mic.fifo"
        os.mkfifo(self.fifo)
        write_asoundrc(home, self.fifo)
        self.speed = speed
        self.period_ms = period_ms
        self.period_bytes = RATE * 2 * period_ms // 1000  # what the reader reads at once
        self.written = 0  # bytes: stream position of the next byte
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
        """Block until everything queued has been written."""
        deadline = time.monotonic() + timeout
        while (self._pending or not self._queue.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def idle(self) -> bool:
        """Everything queued has been written."""
        return not self._pending and self._queue.empty()

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
                self._feed(fifo)

    def _feed(self, fifo: BinaryIO) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.paused.is_set():  # a stalled microphone: nothing arrives
                time.sleep(0.01)
                next_at = time.monotonic()
                continue
            period = self._next_period()
            try:
                fifo.write(period)
            except BrokenPipeError:
                return
            next_at += self.period_ms / 1000 / self.speed
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

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
