"""Logging fit for journald: one line per event, `event key=value` fields.

Under systemd (JOURNAL_STREAM set) each line starts with a `<N>` syslog
priority that journald turns into the entry's priority, and the time stamp is
left to the journal. Known secrets are masked in every line, whatever logged
it (edged or a library: the filter sits on the root handler), tracebacks
included, as a last line of defence.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

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


def _ordered(secrets: Iterable[str]) -> list[str]:
    # Longest first: a secret that contains a shorter one is masked whole,
    # rather than leaving its tail behind the shorter one's mask.
    return sorted({secret for secret in secrets if secret}, key=len, reverse=True)


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks known secrets in a record: its message, and the traceback and
    stack it carries (an exception's text may hold a URL with its query)."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = _ordered(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = _mask(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: render it here, masked.
            record.exc_text = _traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _mask(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = _mask(record.stack_info, self.secrets)
        return True


_traceback_formatter = logging.Formatter()


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
    _secret_filter.secrets = _ordered(secrets)


def mask_secrets(text: str) -> str:
    """`text` with the secrets known to the log filter masked: for strings
    that leave the process by other ways than the log (the state topic, the
    monitor), such as an error message that quotes the service's URL."""
    return _mask(text, _secret_filter.secrets)


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
    # A crash's traceback goes through the same handler as everything else:
    # masked, and with a journal priority.
    sys.excepthook = _log_crash
    threading.excepthook = _log_thread_crash


def _log_crash(kind: type[BaseException], error: BaseException,
               trace: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    logging.getLogger("edged").critical("edged.crash", exc_info=(kind, error, trace))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    logging.getLogger("edged").critical(
        "edged.thread_crash thread=%s", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
