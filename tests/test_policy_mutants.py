"""The reconnect policy, edge cases found by mutation testing (docs/testing.md):
what each handshake failure says (it is the state topic's `last_error`),
Retry-After values at the edges, and the exact backoff ceilings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from edged.errors import SttTransientError
from edged.stt.policy import (
    BACKOFF_INITIAL_S,
    retry_after_seconds,
    retry_delay,
    status_error,
)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "HTTP 401: API key rejected"),
        (403, "HTTP 403: API key rejected"),
        (429, "HTTP 429: rate limited"),
        (404, "HTTP 404: request rejected; check stt.url, stt.provider and stt.params"),
        (503, "HTTP 503"),
    ],
)
def test_a_handshake_failure_says_what_the_service_answered(status: int, message: str) -> None:
    assert str(status_error(status, {})) == message


def test_retry_after_zero_retries_at_the_floor() -> None:
    assert retry_after_seconds("0") == 0.0
    assert retry_after_seconds("-5") == 0.0
    assert retry_delay(status_error(429, {"Retry-After": "0"}), 1) == BACKOFF_INITIAL_S


def test_retry_after_as_a_date_without_a_zone_is_utc() -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("Thu, 26 Nov 2026 12:00:30 -0000", now) == 30.0


def test_retry_after_as_a_date_is_measured_from_now() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (retry_after_seconds(soon) or 0) <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert retry_after_seconds(past) == 0.0


def test_backoff_ceiling_doubles_from_half_a_second_to_thirty() -> None:
    highs = [retry_delay(SttTransientError("x"), n, uniform=lambda: 1.0) for n in range(1, 10)]
    assert highs == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    middle = retry_delay(SttTransientError("x"), 3, uniform=lambda: 0.5)
    assert middle == 0.5 + 0.5 * (2.0 - 0.5)
