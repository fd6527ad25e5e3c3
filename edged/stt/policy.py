"""The reconnect policy, without I/O: which failures to retry, and how soon.

As robust clients of Deepgram-style services do: network errors, HTTP 5xx and
abnormal closes are transient (jittered exponential backoff, with a floor so
that a session that opens and dies at once cannot become a hot loop); a
rejected key (401/403) or a rejected request (other 4xx) will not heal in
seconds, so it is retried slowly and reported; 429 waits as long as
Retry-After says.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from edged.errors import (
    SttAuthError,
    SttError,
    SttRateLimited,
    SttRejectedError,
    SttTransientError,
)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
SLOW_RETRY_S = 60.0  # for failures a retry will not fix soon: one attempt a minute
RETRY_AFTER_MAX_S = 600.0


def status_error(status: int, headers: Mapping[str, str]) -> SttError:
    """The error an HTTP status at handshake time stands for."""
    if status in (401, 403):
        return SttAuthError(f"HTTP {status}: API key rejected")
    if status == 429:
        return SttRateLimited("HTTP 429: rate limited",
                              retry_after=retry_after_seconds(headers.get("Retry-After")))
    if 400 <= status < 500:
        return SttRejectedError(
            f"HTTP {status}: request rejected; check stt.url, stt.provider and stt.params"
        )
    return SttTransientError(f"HTTP {status}")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # A header from outside: "nan" would make every delay NaN (and the
        # backoff wait undefined); "inf" is capped like any long wait.
        return None if math.isnan(seconds) else max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def retry_delay(
    error: BaseException | None,
    consecutive_failures: int,
    uniform: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt after `error`."""
    if isinstance(error, SttAuthError | SttRejectedError):
        return SLOW_RETRY_S
    if isinstance(error, SttRateLimited) and error.retry_after is not None:
        return min(max(error.retry_after, BACKOFF_INITIAL_S), RETRY_AFTER_MAX_S)
    # Full jitter over an exponential ceiling, never below the floor.
    exponent = min(max(consecutive_failures - 1, 0), 16)
    ceiling = min(BACKOFF_INITIAL_S * 2.0**exponent, BACKOFF_MAX_S)
    return BACKOFF_INITIAL_S + uniform() * (ceiling - BACKOFF_INITIAL_S)
