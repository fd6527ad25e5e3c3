"""Run `edged run` as a real process with its own HOME, config and microphone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 top: dict[str, Any] | None = None) -> Path:
    lines = [f"{key} = {toml_value(value)}" for key, value in (top or {}).items()]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    def __init__(self, home: Path, config: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None, wrap: list[str] | None = None):
        self.home = home
        self.wrap = wrap or []  # a command the daemon runs under (setpriv, ...)
        self.config = config
        self.env = env or {}
        self.args = args or []
        self.log_path = home / "edged.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        env.update({"HOME": str(self.home), "PYTHONUNBUFFERED": "1", **self.env})
        env.pop("JOURNAL_STREAM", None)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "edged", "run", "--config", str(self.config),
             *self.args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def signal(self, signum: signal.Signals = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in the log after {timeout}s:\n{self.log}")
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log}")
            time.sleep(0.05)
