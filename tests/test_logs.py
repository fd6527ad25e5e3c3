"""Logging for journald: priorities, rate limits, secrets masked."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from edged.config import load_config
from edged.logs import RateLimitFilter, SecretFilter, setup_logging


def record(message: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("edged.test", level, __file__, 1, message, args, None)


def test_repeated_warnings_are_held_back_and_counted() -> None:
    now = [0.0]
    limiter = RateLimitFilter(burst=3, window_s=60, clock=lambda: now[0])
    passed = [limiter.filter(record("mqtt.connect_failed attempt=%d", n)) for n in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limiter.filter(record("other.event")), "other events are not held back"
    assert limiter.filter(record("x", level=logging.INFO)), "info is never limited"
    now[0] = 61.0
    late = record("mqtt.connect_failed attempt=%d", 11)
    assert limiter.filter(late)
    assert late.getMessage() == "mqtt.connect_failed attempt=11 suppressed=7"


def test_secret_is_masked_whatever_logged_it() -> None:
    masking = SecretFilter(["sk-123"])
    line = record("connect url=%s header=%s", "wss://x", "sk-123")
    masking.filter(line)
    assert "sk-123" not in line.getMessage()
    assert "********" in line.getMessage()


def test_journal_stream_gets_syslog_priority_prefixes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    setup_logging("info")
    logging.getLogger("edged.test").error("stt.auth_failed retry_in=60s")
    logging.getLogger("edged.test").info("stt.connected session=1")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2] == "<3>edged.test stt.auth_failed retry_in=60s"
    assert lines[-1] == "<6>edged.test stt.connected session=1"


def test_library_lines_and_tracebacks_are_masked_with_keys_found_by_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edged.toml"
    config.write_text('[stt]\nurl = "wss://stt.example/v1/listen?api_key=sk-SECRET%2Bkey"\n'
                      '[stt.params]\ntoken = "tok-SECRET-7"\n')
    setup_logging("debug", secrets=load_config([config], environ={}).settings.secrets)
    sent = "wss://stt.example/v1/listen?api_key=sk-SECRET%2Bkey&token=tok-SECRET-7"
    logging.getLogger("websockets.client").warning("> GET %s HTTP/1.1", sent)
    logging.getLogger("edged.stt").debug("stt.params token=%s", "tok-SECRET-7")
    try:
        raise ValueError(f"{sent} isn't a valid URI")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    err = capsys.readouterr().err
    assert "SECRET" not in err
    assert "api_key=********&token=********" in err
    assert "ValueError: wss://stt.example/v1/listen?api_key=********" in err, "traceback kept"


def test_a_crash_traceback_goes_through_the_masking_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    setup_logging("info", secrets=["sk-SECRET-crash"])
    try:
        raise RuntimeError("wss://stt.example/?token=sk-SECRET-crash")
    except RuntimeError as error:
        sys.excepthook(RuntimeError, error, error.__traceback__)
    err = capsys.readouterr().err
    assert "CRITICAL edged edged.crash" in err
    assert "RuntimeError: wss://stt.example/?token=********" in err
    assert "SECRET" not in err


def test_a_secret_containing_another_is_masked_whole() -> None:
    masking = SecretFilter(["sk-1", "sk-12345"])
    line = record("key=%s", "sk-12345")
    masking.filter(line)
    assert line.getMessage() == "key=********"
