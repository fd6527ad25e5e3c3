"""The terminal side of `edged monitor`: follow the daemon, or the microphone.

With a daemon running, its socket streams frames (see `edged.monitor.server`)
and each one is drawn. Without one (no socket, or nobody listening on it) the
microphone is opened here and only its level is shown. Once a daemon has
been seen, its absence is waited out instead: grabbing the microphone then
would keep a restarting daemon from opening it. For the same reason, a
daemon that appears while the microphone is shown here gets it back.

Drawing is plain ANSI (alternate screen, home, clear to end of line), a few
times a second, so it works over SSH on any terminal without curses.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edged.config import AudioSettings
from edged.errors import EX_CONFIG, CaptureError, CaptureFormatError
from edged.monitor.level import Level, LevelMeter
from edged.monitor.terminal import BAR_LOW_DBFS, AnsiScreen, write
from edged.monitor.terminal import bar_cells as _cells
from edged.monitor.terminal import fit as _fit
from edged.monitor.terminal import number as _number
from edged.monitor.terminal import optional_number as _optional_number
from edged.monitor.terminal import printable as _printable

NOTICE_DIRECT = "no daemon running: showing the microphone directly"
NOTICE_GONE = "daemon gone, reconnecting…"
REDRAW_S = 0.2
RETRY_S = 1.0
STALE_S = 3.0  # no frame for this long: the daemon's loop is stuck, say so
MAX_FRAME_BYTES = 1 << 20
HINT = "aim for speech peaks between -20 and -6 dBFS; CLIP! means turn the gain down"


# -- rendering (pure) ------------------------------------------------------------


def render(frame: dict[str, Any], width: int) -> list[str]:
    """The screen for one frame, as lines no longer than `width`.

    `frame` is what the daemon sends (`state`, `level`, `transcripts`), plus
    what the client adds: `notice` (a line of its own), `microphone` (direct
    mode: `device`, `open`, `error`). Missing or odd values are shown as `?`, never
    raised: a screen is no place for a traceback.
    """
    width = max(width, 40)
    state = frame.get("state")
    title = "edged monitor"
    if isinstance(state, dict):
        title += f"  device {state.get('device', '?')}  edged {state.get('version', '?')}"
    lines = [title]
    if frame.get("notice"):
        lines.append(f">> {frame['notice']}")
    microphone = frame.get("microphone")
    if isinstance(microphone, dict):
        status = ("open" if microphone.get("open")
                  else f"error: {microphone['error']}" if microphone.get("error") else "opening…")
        lines.append(f"microphone {microphone.get('device', '?')}: {status}")
    level = frame.get("level")
    if isinstance(level, dict):
        lines += ["", _level_line(level, width), HINT]
    if isinstance(state, dict):
        lines += ["", *_state_lines(state)]
    transcripts = frame.get("transcripts")
    if isinstance(state, dict) or transcripts:
        lines += ["", "last transcripts (newest first):"]
        shown = [t for t in reversed(transcripts or []) if isinstance(t, dict)]
        lines += [_transcript_line(t) for t in shown] or ["  (none yet)"]
    return [_fit(_printable(line), width) for line in lines]


def _level_line(level: dict[str, Any], width: int) -> str:
    if not _number(level.get("since_s"), 1.0):
        return "level  no audio"
    rms = _number(level.get("rms_dbfs"), BAR_LOW_DBFS)
    peak = _number(level.get("peak_dbfs"), BAR_LOW_DBFS)
    prefix = f"level {rms:6.1f} dBFS ["
    suffix = f"] peak {peak:6.1f}"
    clip = "  CLIP!"
    # Room for CLIP! is kept when it is off, so the bar does not jump.
    cells = max(width - len(prefix) - len(suffix) - len(clip), 10)
    filled = _cells(rms, cells)
    bar = ["#"] * filled + ["."] * (cells - filled)
    peak_at = _cells(peak, cells)
    if peak_at > filled:
        bar[peak_at - 1] = "|"  # where the loudest sample reached
    return prefix + "".join(bar) + suffix + (clip if level.get("clipping") else "")


def _state_lines(state: dict[str, Any]) -> list[str]:
    def seconds(key: str) -> str:
        value = state.get(key)
        return f"{value:.1f} s" if isinstance(value, int | float) else "?"

    def updown(key: str, up: str, down: str) -> str:
        value = state.get(key)
        return "?" if value is None else up if value else down

    rows = [
        ("status", str(state.get("status", "?")), "", ""),
        ("STT", str(state.get("stt_state", "?")),
         "reconnects", str(state.get("reconnects", "?"))),
        ("MQTT", updown("mqtt_connected", "connected", "DOWN"),
         "queued", str(state.get("outbox_depth", "?"))),
        ("microphone", updown("microphone_open", "open", "NOT OPEN"),
         "overruns", str(state.get("overruns", "?"))),
        ("buffered", seconds("buffered_s"), "dropped", seconds("dropped_s")),
    ]
    lines = [f"{a:<11}{b:<16}{c:<11}{d}".rstrip() for a, b, c, d in rows]
    if state.get("last_error"):
        lines.append(f"{'last error':<11}{state['last_error']}")
    return lines


def _transcript_line(transcript: dict[str, Any]) -> str:
    start = _optional_number(transcript.get("start"))
    end = _optional_number(transcript.get("end"))
    span = (f"[{start:7.2f}s - {end:7.2f}s]" if start is not None and end is not None
            else "[?]")
    return f"  {span} #{transcript.get('seq', '?')}: {transcript.get('text', '')}"


# -- the terminal ------------------------------------------------------------------


class _Screen(AnsiScreen):
    def draw(self, frame: dict[str, Any]) -> None:
        self.show(render(frame, self.width), "Ctrl-C quits")


class _PlainLines(_Screen):
    """Output that is not a terminal (a pipe, a log, `watch`): no escape
    sequences, one line per second at most, and only when something changed."""

    PERIOD_S = 1.0

    def __init__(self) -> None:
        self._last = ""
        self._printed_at = 0.0

    def __enter__(self) -> _PlainLines:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def draw(self, frame: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._printed_at < self.PERIOD_S:
            return
        line = " | ".join(part for part in render(frame, 500) if part and part != HINT)
        if line != self._last:
            self._last, self._printed_at = line, now
            write(time.strftime("%H:%M:%S ") + line + "\n")


# -- the daemon's socket --------------------------------------------------------------


class MonitorError(Exception):
    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def _connect(path: Path) -> socket.socket | None:
    """A connection to the daemon, or None when none is running."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(RETRY_S)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        sock.close()
        return None  # no socket, a stale one, or a daemon too busy to accept: none running
    except PermissionError:
        sock.close()
        raise MonitorError(
            f"edged monitor: no permission to connect to {path}: run it as the daemon's "
            f"user or group (e.g. sudo -u edged edged monitor)") from None
    except OSError as error:
        sock.close()
        raise MonitorError(f"edged monitor: cannot connect to {path}: {error}") from None
    return sock


class _Frames:
    """Newline-delimited JSON from the daemon; only the newest frame matters,
    since each one carries the whole picture."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._pending = b""

    def latest(self, timeout: float) -> dict[str, Any] | None:
        """The newest complete frame within `timeout`, or None; ConnectionError when gone."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        except OSError as error:
            raise ConnectionError(str(error)) from error
        if not data:
            raise ConnectionError("closed by the daemon")
        self._pending += data
        *complete, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_FRAME_BYTES:
            raise ConnectionError("frame too long")
        for line in reversed(complete):
            with contextlib.suppress(ValueError):
                frame = json.loads(line)
                if isinstance(frame, dict):
                    return frame
        return None


# -- the microphone, when no daemon runs ------------------------------------------------


class _Microphone:
    """Opens and reads the microphone in a thread (reads block a period), feeding a meter."""

    def __init__(self, settings: AudioSettings, error: str | None = None):
        self.settings = settings
        self.error = error  # the last attempt's, until this one says otherwise
        self.open = False
        self.fatal: CaptureFormatError | None = None
        self._meter = LevelMeter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-mic", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def level(self) -> Level:
        with self._lock:
            return self._meter.snapshot()

    def stop(self) -> None:
        """Close the device, so the daemon can open it. A read returns within
        one period; a stalled device cannot be interrupted, and the thread is
        a daemon, so we do not wait past a second."""
        self._stop.set()
        self._thread.join(RETRY_S)

    def _run(self) -> None:
        from edged.audio.capture import open_pcm  # ALSA only when it is needed

        try:
            pcm = open_pcm(self.settings)
        except CaptureFormatError as error:
            self.fatal = error
            return
        except CaptureError as error:
            self.error = str(error)
            if "busy" in self.error.lower():
                self.error += " (is edged running without its monitor socket?)"
            return
        self.error, self.open = None, True
        try:
            self._read(pcm)
        finally:
            self.open = False
            pcm.close()

    def _read(self, pcm: Any) -> None:
        import alsaaudio

        while not self._stop.is_set():
            try:
                length, data = pcm.read()
            except alsaaudio.ALSAAudioError as error:
                self.error = f"device lost: {error}"
                return
            if length > 0 and data:
                with self._lock:
                    self._meter.feed(data)


# -- the loop ---------------------------------------------------------------------------


def run_monitor(socket_path: Path, audio_device: str, chunk_ms: int) -> int:
    """Show the daemon's state (or the microphone's level) until Ctrl-C; exit 0 then."""
    settings = AudioSettings(device=audio_device, chunk_ms=chunk_ms)
    if threading.current_thread() is threading.main_thread():
        # `kill` ends it as Ctrl-C does, leaving the terminal as it was.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with (_Screen() if sys.stdout.isatty() else _PlainLines()) as screen:
            _Monitor(socket_path, settings, screen).run()
    except KeyboardInterrupt:
        return 0
    except MonitorError as error:
        print(error, file=sys.stderr)
        return error.exit_status
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Monitor:
    def __init__(self, socket_path: Path, settings: AudioSettings, screen: _Screen):
        self.socket_path = socket_path
        self.settings = settings
        self.screen = screen
        self.transcripts: list[Any] = []  # kept on screen while the daemon is away

    def run(self) -> None:
        sock = _connect(self.socket_path)
        if sock is None:
            sock = self._show_microphone()
        while True:
            self._follow(sock)
            sock = None
            while sock is None:
                self.screen.draw({"notice": NOTICE_GONE, "transcripts": self.transcripts})
                time.sleep(RETRY_S)
                sock = _connect(self.socket_path)

    def _follow(self, sock: socket.socket) -> None:
        """Draw the daemon's frames until it goes away."""
        frames = _Frames(sock)
        frame: dict[str, Any] = {}
        received = time.monotonic()
        try:
            while True:
                try:
                    latest = frames.latest(REDRAW_S * 2)
                except ConnectionError:
                    return
                now = time.monotonic()
                if latest is not None:
                    frame, received = latest, now
                    self.transcripts = frame.get("transcripts") or []
                    self.screen.draw(frame)
                elif now - received > STALE_S:
                    silent = now - received
                    self.screen.draw({**frame, "level": None,
                                      "notice": f"daemon not answering for {silent:.0f} s"})
        finally:
            sock.close()

    def _show_microphone(self) -> socket.socket:
        """Show the microphone's level until a daemon appears; its connection then."""
        microphone = _Microphone(self.settings)
        try:
            next_check = time.monotonic() + RETRY_S
            while True:
                if microphone.fatal is not None:
                    raise MonitorError(f"edged monitor: {microphone.fatal}", EX_CONFIG)
                self.screen.draw({
                    "notice": NOTICE_DIRECT,
                    "microphone": {"device": self.settings.device, "open": microphone.open,
                                   "error": microphone.error},
                    "level": microphone.level().as_dict(),
                })
                time.sleep(REDRAW_S)
                if time.monotonic() < next_check:
                    continue
                next_check = time.monotonic() + RETRY_S
                sock = _connect(self.socket_path)
                if sock is not None:
                    return sock
                if not microphone.alive and microphone.fatal is None:
                    # It failed to open, or was unplugged: try again.
                    microphone = _Microphone(self.settings, microphone.error)
        finally:
            microphone.stop()
