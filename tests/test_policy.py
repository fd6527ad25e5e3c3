"""The reconnect policy: which failures are retried, and how soon."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edged.errors import SttAuthError, SttRateLimited, SttRejectedError, SttTransientError
from edged.stt.policy import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    SLOW_RETRY_S,
    retry_after_seconds,
    retry_delay,
    status_error,
)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, SttAuthError), (403, SttAuthError), (429, SttRateLimited), (400, SttRejectedError),
     (404, SttRejectedError), (500, SttTransientError), (503, SttTransientError)],
)
def test_handshake_status_is_classified(status: int, kind: type) -> None:
    assert isinstance(status_error(status, {}), kind)


def test_auth_and_rejected_requests_retry_once_a_minute() -> None:
    for failures in range(1, 50):
        assert retry_delay(SttAuthError("x"), failures) == SLOW_RETRY_S
        assert retry_delay(SttRejectedError("x"), failures) == SLOW_RETRY_S


def test_retry_after_is_honoured_in_seconds_or_as_a_date() -> None:
    limited = status_error(429, {"Retry-After": "7"})
    assert retry_delay(limited, 1) == 7.0
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("Thu, 26 Nov 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None  # not a duration: the normal backoff
    assert retry_delay(SttRateLimited("x", retry_after=retry_after_seconds("inf")), 1) == 600.0
    assert retry_delay(SttRateLimited("x", retry_after=None), 1) <= BACKOFF_INITIAL_S * 1.01


def test_transient_backoff_grows_with_jitter_between_a_floor_and_a_cap() -> None:
    lows = [retry_delay(SttTransientError("x"), n, uniform=lambda: 0.0) for n in range(1, 12)]
    highs = [retry_delay(SttTransientError("x"), n, uniform=lambda: 1.0) for n in range(1, 12)]
    assert all(low == BACKOFF_INITIAL_S for low in lows), "a floor even right after opening"
    assert highs == sorted(highs)
    assert highs[0] == BACKOFF_INITIAL_S
    assert highs[-1] == BACKOFF_MAX_S
