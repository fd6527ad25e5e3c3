"""`edged monitor`: the level meter, the screen, the daemon's socket, a real terminal."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edged.monitor.level import FLOOR_DBFS, LevelMeter
from edged.monitor.server import MonitorServer
from edged.monitor.view import NOTICE_DIRECT, render
from tests.support.mic import FifoMic

RATE = 16_000
CHUNK = RATE // 10  # 100 ms, the daemon's default period
TIMEOUT_S = 30.0
T = TypeVar("T")

STATE = {
    "status": "streaming", "version": "0.1.0", "device": "testpi", "stt_connected": True,
    "stt_state": "connected", "mqtt_connected": True, "microphone_open": True,
    "buffered_s": 0.0, "dropped_s": 0.0, "reconnects": 2, "overruns": 0,
    "malformed_frames": 0, "outbox_depth": 0, "last_error": None,
}
TRANSCRIPT = {"seq": 1, "text": "turn on the light", "start": 1.0, "end": 2.0}


def sine(peak_dbfs: float, seconds: float = 0.1, frequency: float = 1000.0) -> bytes:
    amplitude = 32768 * 10 ** (peak_dbfs / 20)
    count = round(seconds * RATE)
    return array("h", (round(amplitude * math.sin(2 * math.pi * frequency * n / RATE))
                       for n in range(count))).tobytes()


def square(high: int = 32767, low: int = -32768, seconds: float = 0.1) -> bytes:
    half = 8  # 1 kHz
    count = round(seconds * RATE)
    return array("h", (high if (n // half) % 2 == 0 else low for n in range(count))).tobytes()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path is limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="edged-mon-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the level meter ------------------------------------------------------------


def test_digital_silence_is_the_floor() -> None:
    meter = LevelMeter()
    meter.feed(bytes(2 * CHUNK))
    level = meter.snapshot()
    assert (level.rms_dbfs, level.peak_dbfs, level.clipping) == (FLOOR_DBFS, FLOOR_DBFS, False)
    assert level.since_s == pytest.approx(0.1)


def test_a_window_with_no_audio_says_so() -> None:
    meter = LevelMeter()
    meter.feed(sine(-20))
    meter.snapshot()
    assert meter.snapshot().since_s == 0  # a new window: nothing since the last snapshot


def test_full_scale_square_is_0_dbfs_and_clips() -> None:
    meter = LevelMeter()
    meter.feed(square())
    level = meter.snapshot()
    assert level.rms_dbfs == pytest.approx(0.0, abs=0.01)
    assert level.peak_dbfs == pytest.approx(0.0, abs=0.01)
    assert level.clipping
    meter.feed(sine(-20))
    assert not meter.snapshot().clipping, "clipping is reported per window"


def test_sine_rms_is_3_db_below_its_peak() -> None:
    meter = LevelMeter()
    meter.feed(sine(-20))
    meter.feed(sine(-20))  # windows span chunks
    level = meter.snapshot()
    assert level.peak_dbfs == pytest.approx(-20.0, abs=0.05)
    assert level.rms_dbfs == pytest.approx(-23.01, abs=0.1)
    assert not level.clipping
    assert level.since_s == pytest.approx(0.2)


@pytest.mark.parametrize(("high", "low", "clips"), [
    (32766, 0, True), (0, -32767, True), (32765, -32766, False),
])
def test_clipping_is_within_one_lsb_of_full_scale(high: int, low: int, clips: bool) -> None:
    meter = LevelMeter()
    meter.feed(square(high, low) + b"\x00")  # a stray odd byte is ignored
    assert meter.snapshot().clipping is clips


def test_feed_cost_per_100_ms_chunk() -> None:
    """Prints the cost (`pytest -s`); not asserted: timing depends on the machine's load."""
    meter, chunk = LevelMeter(), sine(-6)
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        meter.feed(chunk)
    cost = (time.perf_counter() - started) / rounds
    print(f"LevelMeter.feed: {cost * 1e6:.0f} us per 100 ms chunk")
    level = meter.snapshot()
    assert level.since_s == pytest.approx(rounds * 0.1)
    assert level.peak_dbfs == pytest.approx(-6.0, abs=0.05)


# -- the screen -------------------------------------------------------------------


def level_frame(rms: float, peak: float, clipping: bool = False) -> dict[str, Any]:
    return {"level": {"rms_dbfs": rms, "peak_dbfs": peak, "clipping": clipping, "since_s": 0.2}}


def bar_of(lines: list[str]) -> str:
    line = next(line for line in lines if line.startswith("level"))
    return line[line.index("[") + 1: line.index("]")]


@pytest.mark.parametrize("width", [60, 100, 160])
def test_bar_is_proportional_to_the_level(width: int) -> None:
    for rms, fraction in [(-60.0, 0.0), (-45.0, 0.25), (-30.0, 0.5), (0.0, 1.0), (-90.0, 0.0)]:
        lines = render(level_frame(rms, rms), width)
        bar = bar_of(lines)
        assert bar.count("#") == round(fraction * len(bar))
        assert all(len(line) <= width for line in lines)
    assert len(bar_of(render(level_frame(-20, -20), width))) > width // 3


def test_clipping_is_shown_and_the_bar_does_not_move() -> None:
    quiet = render(level_frame(-23.4, -12.0), 100)
    loud = render(level_frame(-23.4, -12.0, clipping=True), 100)
    line = next(line for line in loud if line.startswith("level"))
    assert line.startswith("level  -23.4 dBFS [#")
    assert line.endswith("] peak  -12.0  CLIP!")
    assert "CLIP!" not in next(line for line in quiet if line.startswith("level"))
    assert bar_of(quiet) == bar_of(loud)
    assert "|" in bar_of(loud), "the peak is marked beyond the RMS"


def test_states_and_transcripts_are_shown_newest_first() -> None:
    frame = {"state": {**STATE, "mqtt_connected": False, "last_error": "refused \x1b[2J"},
             "level": {"rms_dbfs": -120.0, "peak_dbfs": -120.0, "clipping": False, "since_s": 0},
             "transcripts": [TRANSCRIPT, {"seq": 2, "text": "and the heating", "start": 3.5,
                                          "end": 4.25}]}
    screen = "\n".join(render(frame, 100))
    assert "streaming" in screen
    assert "reconnects 2" in screen
    assert "MQTT       DOWN" in screen
    assert "level  no audio" in screen
    assert screen.index("and the heating") < screen.index("turn on the light")
    assert "[   1.00s -    2.00s] #1: turn on the light" in screen
    assert "\x1b" not in screen, "text from outside never reaches the terminal raw"


def test_a_partial_frame_renders() -> None:
    lines = render({"notice": NOTICE_DIRECT, "state": {"status": None},
                    "level": {"rms_dbfs": "loud"}, "transcripts": [{"text": "hi"}, 3]}, 10)
    assert lines[1] == ">> " + NOTICE_DIRECT[:36] + "…"


# -- the daemon's socket -------------------------------------------------------------


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, TIMEOUT_S)
    return asyncio.run(bounded())


async def next_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await reader.readline())
    return frame


async def frame_where(reader: asyncio.StreamReader,
                      predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    while not predicate(frame := await next_frame(reader)):
        pass
    return frame


async def until(predicate: Callable[[], bool]) -> None:
    while True:  # polled: the server has no event for every condition a test waits on
        if predicate():
            return
        await asyncio.sleep(0.01)


def test_server_streams_state_level_and_transcripts(short_dir: Path) -> None:
    path = short_dir / "monitor.sock"

    async def scenario() -> None:
        server = MonitorServer(path, lambda: dict(STATE), interval_s=0.05)
        await server.start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert not server.wants_audio
        reader, writer = await asyncio.open_unix_connection(path)
        frame = await next_frame(reader)
        assert frame["state"] == STATE
        assert frame["level"]["rms_dbfs"] == FLOOR_DBFS
        assert frame["transcripts"] == []
        assert server.wants_audio

        async def tone() -> None:  # the daemon feeds each period as it is captured
            while True:
                server.feed_audio(sine(-10))
                await asyncio.sleep(0.02)

        feeding = asyncio.create_task(tone())
        frame = await frame_where(reader, lambda f: f["level"]["since_s"] > 0)
        assert frame["level"]["peak_dbfs"] == pytest.approx(-10, abs=0.1)
        assert frame["level"]["rms_dbfs"] == pytest.approx(-13, abs=0.1)
        assert frame["level"]["clipping"] is False

        server.transcript({**TRANSCRIPT, "device": "testpi", "words": [{"text": "turn"}]})
        frame = await frame_where(reader, lambda f: bool(f["transcripts"]))
        assert frame["transcripts"] == [TRANSCRIPT], "the words stay out of the frames"
        for seq in range(2, 15):
            server.transcript({**TRANSCRIPT, "seq": seq})
        frame = await frame_where(reader, lambda f: f["transcripts"][-1]["seq"] == 14)
        assert [t["seq"] for t in frame["transcripts"]] == list(range(5, 15))

        feeding.cancel()
        writer.close()
        await until(lambda: not server.wants_audio)
        await server.stop()
        assert not path.exists()

    run(scenario())


def test_a_killed_client_or_one_that_does_not_read_is_dropped(short_dir: Path) -> None:
    path = short_dir / "monitor.sock"
    big_state = {**STATE, "last_error": "x" * 20_000}  # fills a stuck client's buffers fast

    async def scenario() -> None:
        server = MonitorServer(path, lambda: big_state, interval_s=0.005)
        await server.start()
        killed = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.recv(10); print('connected', flush=True); time.sleep(120)\n",
            str(path), stdout=asyncio.subprocess.PIPE)
        assert killed.stdout is not None
        assert await killed.stdout.readline() == b"connected\n"
        killed.kill()  # no goodbye: the kernel closes its end
        await killed.wait()
        await until(lambda: server.clients == 0)

        stuck = socket.socket(socket.AF_UNIX)  # connects, never reads
        stuck.setblocking(False)
        await asyncio.get_running_loop().sock_connect(stuck, str(path))
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        await until(lambda: server.clients == 2)
        while server.clients == 2:  # the reader keeps getting frames meanwhile
            assert (await next_frame(reader))["state"]["status"] == "streaming"
        assert (await next_frame(reader))["state"]["status"] == "streaming"
        stuck.close()
        writer.close()
        await server.stop()

    run(scenario())


def test_stale_socket_is_replaced_and_a_foreign_file_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "monitor.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # what a killed daemon leaves behind
    stale.close()

    async def scenario() -> None:
        server = MonitorServer(path, dict)
        await server.start()
        assert server.listening
        reader, writer = await asyncio.open_unix_connection(path)
        assert (await next_frame(reader))["state"] == {}
        writer.close()
        await server.stop()

        path.write_text("not a socket")
        refused = MonitorServer(path, dict)
        await refused.start()  # logged, not raised: the daemon runs on without a monitor
        assert not refused.listening
        assert path.read_text() == "not a socket"
        await refused.stop()

    run(scenario())


# -- a real terminal ----------------------------------------------------------------------


class ServerThread:
    """A MonitorServer on an event loop of its own, standing in for the daemon."""

    def __init__(self, path: Path):
        self.loop = asyncio.new_event_loop()
        self.server = MonitorServer(path, lambda: dict(STATE))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self.server.start())
        assert self.server.listening
        self._feeding = asyncio.run_coroutine_threadsafe(self._feed(), self.loop)

    async def _feed(self) -> None:
        while True:  # a loud tone, one period every 100 ms, as the daemon would
            if self.server.wants_audio:
                self.server.feed_audio(sine(-6))
            await asyncio.sleep(0.1)

    def transcript(self, payload: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.server.transcript, payload)

    def stop(self) -> None:
        self._feeding.cancel()
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def _call(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(TIMEOUT_S)


# The scripts below import edged from this tree, not from wherever the
# virtual environment's editable install points.
ROOT = Path(__file__).resolve().parents[1]
MONITOR = """\
import sys
from pathlib import Path
from edged.monitor.view import run_monitor
sys.exit(run_monitor(Path(sys.argv[1]), sys.argv[2], 100))
"""
LEVEL_BAR = re.compile(r"^level +-?\d+\.\d dBFS \[#+", re.MULTILINE)


class Tmux:
    """A private tmux server with one 100x30 window running the monitor."""

    def __init__(self, directory: Path):
        self.socket = directory / "tmux.sock"
        self.script = directory / "monitor.py"
        self.script.write_text(MONITOR)

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=20, check=True)
        return done.stdout

    def start(self, socket_path: Path, device: str, home: Path) -> None:
        command = shlex.join(["env", f"HOME={home}", f"PYTHONPATH={ROOT}", sys.executable,
                              str(self.script), str(socket_path), device])
        # The exit status stays on screen after the monitor leaves its alternate screen.
        self.tmux("new-session", "-d", "-s", "monitor", "-x", "100", "-y", "30",
                  "-c", str(Path(__file__).parents[1]),
                  f'{command}; echo "monitor exited $?"; sleep 600')

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "monitor")

    def wait_for(self, what: str, predicate: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate(screen := self.screen()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} on the screen after {TIMEOUT_S}s:\n{screen}")
            time.sleep(0.2)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"],
                       capture_output=True, timeout=20, check=False)


@pytest.fixture
def tmux(short_dir: Path) -> Iterator[Tmux]:
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (scripts/test installs it)")
    terminal = Tmux(short_dir)
    yield terminal
    print(f"--- last screen ---\n{terminal.screen()}")  # shown on failure
    terminal.close()


def test_terminal_shows_the_daemon_and_survives_its_restart(tmux: Tmux, short_dir: Path) -> None:
    path = short_dir / "monitor.sock"
    daemon = ServerThread(path)
    try:
        daemon.transcript(TRANSCRIPT)
        tmux.start(path, "no-such-device", short_dir)
        screen = tmux.wait_for("level bar and transcript", lambda s: bool(LEVEL_BAR.search(s))
                               and "turn on the light" in s)
        assert "streaming" in screen
        assert not re.search(r"^level.*CLIP!", screen, re.MULTILINE), "-6 dBFS does not clip"

        daemon.stop()  # the daemon goes away mid-run ...
        tmux.wait_for("reconnecting notice", lambda s: "daemon gone, reconnecting" in s)
        assert "showing the microphone directly" not in tmux.screen()
        daemon = ServerThread(path)  # ... and comes back
        daemon.transcript({**TRANSCRIPT, "seq": 2, "text": "it is back"})
        tmux.wait_for("the daemon again", lambda s: "it is back" in s and "streaming" in s
                      and bool(LEVEL_BAR.search(s)))

        tmux.tmux("send-keys", "-t", "monitor", "C-c")
        tmux.wait_for("exit status", lambda s: "monitor exited 0" in s)
    finally:
        daemon.stop()


def test_terminal_shows_the_microphone_when_no_daemon_runs(tmux: Tmux, short_dir: Path) -> None:
    home = short_dir / "home"
    home.mkdir()
    mic = FifoMic(home)  # ALSA device `testmic`, found through HOME/.asoundrc
    mic.play(square(high=32767, low=-32768, seconds=60.0))
    daemon: ServerThread | None = None
    try:
        path = short_dir / "monitor.sock"
        tmux.start(path, "testmic", home)
        screen = tmux.wait_for("microphone level", lambda s: NOTICE_DIRECT in s
                               and bool(re.search(r"^level.*CLIP!", s, re.MULTILINE)))
        assert "turn on the light" not in screen

        daemon = ServerThread(path)  # a daemon starts: the monitor hands it the microphone
        daemon.transcript(TRANSCRIPT)
        screen = tmux.wait_for("the daemon", lambda s: "turn on the light" in s)
        assert NOTICE_DIRECT not in screen

        tmux.tmux("send-keys", "-t", "monitor", "C-c")
        tmux.wait_for("exit status", lambda s: "monitor exited 0" in s)
    finally:
        if daemon is not None:
            daemon.stop()
        mic.stop()


def read_until(process: subprocess.Popen[bytes], wanted: bytes, timeout: float) -> bytes:
    """Read the process's stdout until `wanted` has come; fails after `timeout`."""
    assert process.stdout is not None
    fd, got = process.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            raise TimeoutError(f"{wanted!r} not on stdout within {timeout}s: {got[-200:]!r}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"stdout closed before {wanted!r}: {got[-200:]!r}")
        got += chunk
    return got


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_monitor_is_interrupted_cleanly_without_a_terminal(
    short_dir: Path, signum: signal.Signals
) -> None:
    """No daemon and no microphone: it keeps retrying, and Ctrl-C or `kill` exits 0."""
    script = short_dir / "monitor.py"
    script.write_text(MONITOR)
    process = subprocess.Popen(
        [sys.executable, str(script), str(short_dir / "absent.sock"), "no-such-device"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"HOME": str(short_dir), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        # As from a terminal: a shell's background job (a test run started
        # with `&`) passes SIGINT on ignored, and Python then keeps it so.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Running, with its handlers in place, once it has drawn its notice.
        shown = read_until(process, NOTICE_DIRECT.encode(), TIMEOUT_S)
        assert process.poll() is None, process.communicate()
        process.send_signal(signum)
        out, err = process.communicate(timeout=TIMEOUT_S)
        out = shown + out
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert NOTICE_DIRECT.encode() in out
    assert b"no-such-device" in out
    assert b"\x1b[" not in out, "not a terminal: plain lines, no escape sequences"
