"""Every command ends cleanly on SIGINT or SIGTERM at any moment, from the
first instant: no traceback, a status that says so."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = [["check-config"], ["monitor"], ["doctor", "--seconds", "0.5"], ["fleet", "--json"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_signal_at_any_moment_of_a_start_ends_it_cleanly(tmp_path: Path,
                                                           command: list[str]) -> None:
    config = tmp_path / "edged.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[stt]\nurl = "ws://127.0.0.1:9/v1/listen"\n'
                      '[mqtt]\nhost = "127.0.0.1"\nport = 9\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env.update(HOME=str(tmp_path), CREDENTIALS_DIRECTORY=str(tmp_path))
    rng = random.Random(11)
    for signum in [signal.SIGINT, signal.SIGTERM] * 4:
        process = subprocess.Popen(
            [sys.executable, "-m", "edged", *command[:1], "--config", str(config), *command[1:]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # no terminal's SIGINT disposition inherited
        )
        time.sleep(rng.uniform(0.0, 0.4))  # a random moment of the start (fault timing)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
        text = stderr.decode(errors="replace")
        assert "Traceback" not in text, text
        # 69: fleet found no broker (there is none on port 9) before the signal came.
        assert process.returncode in (0, 1, 69, 78, 128 + signum), (signum, process.returncode,
                                                                   text)


def test_an_interrupt_that_lands_in_a_weakref_callback_still_ends_the_command() -> None:
    """Python cannot raise an exception out of a weakref callback: it prints it
    with a traceback and goes on. An interrupt landing there (a signal during a
    garbage collection) must still end the command, with one line."""
    script = (
        "import os, signal, sys, weakref\n"
        "from edged import cli\n"
        "sys.unraisablehook = cli._unraisable\n"
        "signal.signal(signal.SIGINT, cli._raise_interrupt)\n"
        "class Thing: pass\n"
        "def callback(ref):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    for _ in range(1000): pass  # the handler runs here, inside the callback\n"
        "thing = Thing(); ref = weakref.ref(thing, callback)\n"
        "del thing\n"
        "print('went on after the interrupt', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 128 + signal.SIGINT, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr == "edged: interrupted (SIGINT)\n"
    assert "went on" not in result.stdout
