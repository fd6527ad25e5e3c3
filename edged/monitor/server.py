"""The daemon's end of `edged monitor`: a local Unix socket streaming JSON lines.

Server to client only, about five lines a second while a client is connected:

    {"state": {...Daemon.state()...},
     "level": {"rms_dbfs": -23.4, "peak_dbfs": -12.0, "clipping": false, "since_s": 0.2},
     "transcripts": [{"seq": 1, "text": "...", "start": 1.0, "end": 2.0, "time": "..."}]}

The monitor is a convenience; the daemon's work is transcripts. So nothing
here may block or crash the loop: each frame is encoded once and written to
every client without awaiting, a client that does not keep up is dropped,
and a socket that cannot be created is logged and the daemon goes on
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edged.monitor.level import Level, LevelMeter
from edged.untrusted import loggable

log = logging.getLogger("edged.monitor")

INTERVAL_S = 0.2
MAX_CLIENTS = 8  # a handful of terminals; more is a bug or abuse, not a use
# A client this far behind (past the kernel's buffer, a minute or more of
# frames) is not reading: drop it rather than grow its backlog in our memory.
MAX_BACKLOG_BYTES = 256 * 1024
LEVEL_HOLD_S = 1.0  # periods longer than a frame interval still give a steady meter
TRANSCRIPTS_KEPT = 10
# What a viewer shows of a transcript; the word list would make each frame
# several times larger for nothing.
TRANSCRIPT_KEYS = ("seq", "text", "start", "end", "time")
SOCKET_MODE = 0o660  # the daemon's user and group: transcripts are private speech


class MonitorServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]],
                 interval_s: float = INTERVAL_S):
        self.path = path
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._meter = LevelMeter()
        self._level: Level = self._meter.snapshot()
        self._level_at = 0.0  # monotonic time `_level` was measured
        self._transcripts: deque[dict[str, Any]] = deque(maxlen=TRANSCRIPTS_KEPT)
        self._clients: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a transcript or a new client: send a frame now
        self._snapshot_failed = False

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def wants_audio(self) -> bool:
        """Someone is watching: only then is the level worth computing."""
        return bool(self._clients)

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        """Listen on `path`. Failure is logged, not raised: the daemon runs on without it."""
        try:
            self._remove_stale_socket()
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            # chmod after bind only widens the daemon's umask (0077 under systemd).
            os.chmod(self.path, SOCKET_MODE)
        except OSError as error:
            log.warning("monitor.unavailable path=%s error=%s", loggable(self.path),
                        loggable(error))
            await self._close_server()
            return
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="monitor")
        log.info("monitor.listening path=%s", loggable(self.path))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for writer in list(self._clients):
            writer.transport.abort()
        # Aborted connections end their handlers; cancelling one instead would
        # make asyncio log it as an error (Python 3.11).
        if self._handlers:
            _, stuck = await asyncio.wait(self._handlers, timeout=1.0)
            for handler in stuck:
                handler.cancel()
        was_listening = self._server is not None
        await self._close_server()
        if was_listening:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # Python 3.11 leaves it behind

    def feed_audio(self, pcm: bytes) -> None:
        if self._clients:
            self._meter.feed(pcm)

    def transcript(self, payload: dict[str, Any]) -> None:
        self._transcripts.append({key: payload[key] for key in TRANSCRIPT_KEYS if key in payload})
        if self._clients:  # nobody watching: kept for the next one, nothing to send
            self._wake.set()

    # -- internals ------------------------------------------------------------

    def _remove_stale_socket(self) -> None:
        # Left by a daemon that was killed. Only a socket is removed: a file
        # of another kind at that path is a mistake we must not paper over.
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        self.path.unlink()

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        if not self._clients:
            self._meter.reset()  # what was fed before nobody watched is stale
        self._clients.add(writer)
        self._wake.set()
        log.info("monitor.client_connected clients=%d", len(self._clients))
        try:
            # Clients send nothing; reading is how a closed connection is noticed.
            while await reader.read(4096):
                pass
        except OSError:
            pass
        finally:
            self._drop(writer)
            self._handlers.discard(task)
            log.info("monitor.client_gone clients=%d", len(self._clients))

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self._clients.discard(writer)
        # abort, not close: a close would wait to flush to a client that is not reading.
        writer.transport.abort()

    async def _tick(self) -> None:
        while True:
            if not self._clients:  # asleep until someone connects: no polling
                self._wake.clear()
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._clients:
                self._broadcast(self._frame())

    def _frame(self) -> bytes:
        try:
            state: dict[str, Any] | None = self._snapshot()
        except Exception:
            # A bug in the state must not take the daemon down through its monitor.
            if not self._snapshot_failed:
                log.exception("monitor.snapshot_failed")
                self._snapshot_failed = True
            state = None
        frame = {"state": state, "level": self._current_level().as_dict(),
                 "transcripts": list(self._transcripts)}
        return json.dumps(frame, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode() + b"\n"

    def _current_level(self) -> Level:
        now = time.monotonic()
        level = self._meter.snapshot()
        # With periods longer than a frame, some frames see no audio: show the
        # last measurement instead of a flickering "silent", but not for long,
        # or a stalled microphone would look alive.
        if level.since_s or now - self._level_at >= LEVEL_HOLD_S:
            self._level, self._level_at = level, now
        return self._level

    def _broadcast(self, line: bytes) -> None:
        for writer in list(self._clients):
            transport = writer.transport
            if transport.is_closing():
                self._drop(writer)
            elif transport.get_write_buffer_size() > MAX_BACKLOG_BYTES:
                log.warning("monitor.client_dropped reason=not_reading")
                self._drop(writer)
            else:
                transport.write(line)
