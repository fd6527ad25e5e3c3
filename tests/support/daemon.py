"""Run `edged run` as a real process with its own HOME, config and microphone.

A daemon is honest at the end of a test or the test fails (the `stack`
fixture checks): it exited with the status the test expected (0 unless
`expect(status=...)` says otherwise) and its part of the log has none of
`MUST_NOT_LOG` unless the test declared it with `allow(...)`. Several daemons
of one test append to one log file; each knows its own part of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# In a daemon's log, each of these fails the test unless it declared it with allow().
MUST_NOT_LOG = ("Traceback", "edged.fatal", "stt.close_timeout")


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
        self.expected_status = 0  # what the exit status must be at the end of the test
        self.allowed: set[str] = set()  # MUST_NOT_LOG entries this test expects
        self._log_start = 0  # this daemon's part of the shared log file: [start, end)
        self._log_end: int | None = None

    def expect(self, status: int) -> Daemon:
        """The exit status the test expects (-9: killed by SIGKILL; 78: a bad configuration)."""
        self.expected_status = status
        return self

    def allow(self, *patterns: str) -> Daemon:
        """Log lines the test expects, which would otherwise fail it (see MUST_NOT_LOG)."""
        self.allowed.update(patterns)
        return self

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        env.update({"HOME": str(self.home), "PYTHONUNBUFFERED": "1", **self.env})
        env.pop("JOURNAL_STREAM", None)
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "edged", "run", "--config", str(self.config),
             *self.args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def signal(self, signum: signal.Signals = signal.SIGTERM) -> None:
        assert self.process is not None
        if signum == signal.SIGKILL:
            self.expected_status = -signal.SIGKILL  # the test killed it: that is how it ends
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        status = self.process.wait(timeout)
        self.exited()
        return status

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self) -> bool:
        """Whether the process has ended; once it has, its part of the log is closed."""
        if self.process is None or self.process.poll() is None:
            return False
        if self._log_end is None:  # everything it wrote is in the file by now
            self._log_end = self.log_path.stat().st_size
            self._log.close()
        return True

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
        self.exited()
        return self.process.returncode

    @property
    def log(self) -> str:
        """This daemon's own lines of the shared log file."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as file:
            file.seek(self._log_start)
            end = self._log_end
            data = file.read() if end is None else file.read(end - self._log_start)
        return data.decode(errors="replace")

    def problems(self) -> list[str]:
        """What makes this daemon's run dishonest: an unexpected exit status, or a
        line it must not log. Call once it has exited."""
        found = []
        assert self.process is not None
        status = self.process.returncode
        if status != self.expected_status:
            found.append(f"exited with status {status}, expected {self.expected_status}")
        log = self.log
        for pattern in MUST_NOT_LOG:
            if pattern in log and pattern not in self.allowed:
                lines = [line for line in log.splitlines() if pattern in line]
                found.append(f"logged {pattern!r}: {lines[:3]}")
        return found

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not in the log after {timeout}s:\n{self.log}")
            if self.exited():
                assert self.process is not None
                if needle in self.log:
                    return
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log}")
            time.sleep(0.05)
