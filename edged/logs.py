"""Logging fit for journald: one line per event, `event key=value` fields.

Under systemd (JOURNAL_STREAM set) each line starts with a `<N>` syslog
priority that journald turns into the entry's priority, and the time stamp is
left to the journal. Known secrets are masked in every line, whatever logged
it, as a last line of defence.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable

_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
MASK = "********"


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


class SecretFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, MASK)
                record.msg, record.args = message, None
        return True


class RateLimitFilter(logging.Filter):
    """Lets through at most `burst` warnings or errors of one kind (logger and
    message template) per `window_s`; the next one let through says how many
    were held back. A broker down for a day must not fill the journal."""

    def __init__(self, burst: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        started, count, held = self._seen.get(key, (now, 0, 0))
        if now - started >= self.window_s:
            started, count = now, 0
        if count >= self.burst:
            self._seen[key] = (started, count, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} suppressed={held}"
        self._seen[key] = (started, count + 1, 0)
        return True


_secret_filter = SecretFilter(())


def set_secrets(secrets: Iterable[str]) -> None:
    """Mask these values in every log line from now on (a reload may bring a new key)."""
    _secret_filter.secrets = [secret for secret in secrets if secret]


def setup_logging(level: str = "info", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    set_secrets(secrets)
    handler.addFilter(RateLimitFilter())
    handler.addFilter(_secret_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries log at their own names; keep their chatter out of info.
    for noisy in ("websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
