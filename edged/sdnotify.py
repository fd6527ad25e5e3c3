"""sd_notify in pure Python: READY, STATUS, WATCHDOG and STOPPING to systemd.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named
in NOTIFY_SOCKET (a leading `@` means the abstract namespace). Without that
variable, as outside systemd, every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from edged.untrusted import loggable

log = logging.getLogger("edged.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_interval_s = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> None:
        """Send `KEY=value` fields: send(READY=1, STATUS="streaming")."""
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message, self._address)
        except OSError as error:
            if not self._failed:  # once: a broken notify socket must not flood the log
                log.warning("sdnotify.failed error=%s", loggable(error))
                self._failed = True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout, as systemd recommends; None when there is none."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000 / 2
