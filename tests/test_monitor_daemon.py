"""`edged monitor` in a real terminal (tmux) against a real running daemon."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.mic import FifoMic
from tests.support.tonespeech import script


def tmux(socket: Path, *args: str) -> str:
    return subprocess.run(["tmux", "-S", str(socket), "-f", "/dev/null", *args],
                          capture_output=True, text=True, timeout=20, check=True).stdout


def test_monitor_shows_level_state_and_transcripts_of_the_daemon(
    stack: Stack, mic: FifoMic
) -> None:
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (scripts/test installs it)")
    config = stack.config()
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    socket = stack.home / "tmux.sock"
    command = shlex.join(["env", f"HOME={stack.home}", sys.executable, "-m", "edged",
                          "monitor", "--config", str(config)])
    tmux(socket, "new-session", "-d", "-s", "monitor", "-x", "100", "-y", "30",
         f"{command}; sleep 600")
    try:
        audio, _ = script([["alpha", "bravo"]], pause_s=0.5)
        mic.play(audio)
        seen_bar = seen_transcript = False
        deadline = time.monotonic() + 40
        screen = ""
        while not (seen_bar and seen_transcript) and time.monotonic() < deadline:
            if mic.stream_seconds > 3 and not seen_bar:
                mic.play(audio)  # keep sound coming, so the bar has something to show
            time.sleep(0.2)
            screen = tmux(socket, "capture-pane", "-p", "-t", "monitor")
            seen_bar |= bool(re.search(r"^level +-?\d+\.\d dBFS \[#+", screen, re.MULTILINE))
            seen_transcript |= "Alpha bravo." in screen and "streaming" in screen
        assert seen_bar, f"no level bar while speech played:\n{screen}"
        assert seen_transcript, f"no transcript on the monitor:\n{screen}"
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True,
                       timeout=20, check=False)


def test_monitor_writes_plain_lines_when_its_output_is_not_a_terminal(
    stack: Stack, mic: FifoMic
) -> None:
    import os
    import signal

    config = stack.config()
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    log = stack.home / "monitor.out"
    with log.open("wb") as out:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "edged", "monitor", "--config", str(config)],
            env={**os.environ, "HOME": str(stack.home)}, stdout=out, stderr=subprocess.STDOUT)
        try:
            audio, _ = script([["charlie"]], pause_s=0.5)
            mic.play(audio)
            deadline = time.monotonic() + 30
            while "Charlie." not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.1)
        finally:
            monitor.send_signal(signal.SIGTERM)
            status = monitor.wait(10)
    text = log.read_text(errors="replace")
    assert status == 0
    assert "\x1b[" not in text, "no escape sequences into a file or a pipe"
    assert "Traceback" not in text
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in text.splitlines()), text
