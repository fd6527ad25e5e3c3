"""A stand-in for systemd's notify socket: records what the daemon sends."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """What systemd would receive: (monotonic time, fields) per datagram."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0,
                 after: float = 0.0) -> float:
        """When the first datagram with `key` (= `value`) since `after` arrived."""
        return self.wait_for_fields(key, value, timeout, after)[0]

    def wait_for_fields(self, key: str, value: str | None = None, timeout: float = 20.0,
                        after: float = 0.0) -> tuple[float, dict[str, str]]:
        """The first datagram with `key` (= `value`) since `after`: (arrival, fields)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, fields in list(self.messages):
                if at >= after and key in fields and (value is None or fields[key] == value):
                    return at, fields
            time.sleep(0.01)
        raise TimeoutError(f"no {key}={value} from the daemon within {timeout}s; "
                           f"got {self.messages[-5:]}")

    def wait_for_pings(self, count: int, after: float = 0.0, timeout: float = 20.0
                       ) -> list[float]:
        """The first `count` WATCHDOG=1 pings since `after` (their arrival times)."""
        deadline = time.monotonic() + timeout
        while len(pings := self.pings_between(after, float("inf"))) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pings)} of {count} watchdog pings within {timeout}s")
            time.sleep(0.01)
        return pings[:count]

    def pings_between(self, start: float, end: float) -> list[float]:
        return [at for at, fields in list(self.messages)
                if fields.get("WATCHDOG") == "1" and start <= at <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
