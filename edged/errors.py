"""One exception tree for edged, so callers can catch what they mean.

`EdgedError` is the root. Each subclass names the part of the data path that
failed, and carries the exit status the daemon should end with when the error
is fatal.
"""

from __future__ import annotations

from collections.abc import Sequence

EX_CONFIG = 78  # sysexits.h: configuration error; systemd must not restart on it
EX_UNAVAILABLE = 69  # sysexits.h: a service needed (the broker, for `edged fleet`) is unavailable


class EdgedError(Exception):
    """Base class of every error edged raises on purpose."""

    exit_status = 1


class ConfigError(EdgedError):
    """The configuration is invalid; `key` and `source` say where."""

    exit_status = EX_CONFIG

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        self.message = message  # without the key and source
        where = ""
        if key:
            where = f"{key}"
            if source:
                where += f" (from {source})"
            where += ": "
        elif source:
            where = f"{source}: "
        super().__init__(f"{where}{message}")
        self.problems: list[ConfigError] = [self]
        self.warnings: list[str] = []  # what could not be checked, said beside the problems

    @classmethod
    def of(cls, problems: Sequence[ConfigError]) -> ConfigError:
        """One error standing for several: each is in `problems` (the command
        line prints one line per problem), and its text joins them with "; "
        (for a log line)."""
        if len(problems) == 1:
            return problems[0]
        error = cls("; ".join(str(problem) for problem in problems))
        error.key, error.source = problems[0].key, problems[0].source
        error.problems = [p for problem in problems for p in problem.problems]
        return error


class CaptureError(EdgedError):
    """The microphone could not be opened or read."""


class CaptureFormatError(CaptureError, ConfigError):
    """The device cannot deliver 16 kHz S16_LE mono; retrying will not help."""


class SttError(EdgedError):
    """A failure talking to the speech-to-text service."""


class SttAuthError(SttError):
    """The service rejected our credentials (HTTP 401/403)."""


class SttRejectedError(SttError):
    """The service refused the request itself (HTTP 4xx): URL, provider or params."""


class SttRateLimited(SttError):
    """The service asked us to slow down (HTTP 429)."""

    def __init__(self, message: str, *, retry_after: float | None):
        super().__init__(message)
        self.retry_after = retry_after


class SttTransientError(SttError):
    """A failure worth retrying soon: network, 5xx, abnormal close."""
