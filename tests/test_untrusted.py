"""Outside text in a log line: one line, no terminal escapes, bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edged.untrusted import LOG_TEXT_MAX, loggable


def test_a_newline_cannot_start_a_forged_line() -> None:
    text = loggable("boom\n2026-01-01 00:00:00 ERROR edged forged\r\x85\u2028x")
    assert text == "boom\\n2026-01-01 00:00:00 ERROR edged forged\\r\\x85\\u2028x"
    assert text.splitlines() == [text]


def test_terminal_escapes_and_lone_surrogates_are_written_out() -> None:
    assert loggable("\x1b[2J\x1b[31mred\x07") == "\\x1b[2J\\x1b[31mred\\x07"
    assert loggable("a\ud800b") == "a\\ud800b"  # would make the log handler fail
    assert loggable("\u202eevil") == "\\u202eevil"  # a bidi override reorders what is read


def test_ordinary_text_is_left_alone_and_backslashes_stay_unambiguous() -> None:
    assert loggable("Wohnzimmer: Licht an, 21 °C") == "Wohnzimmer: Licht an, 21 °C"
    assert loggable("a\\nb") == "a\\\\nb"  # a backslash and an n, not a newline
    assert loggable(OSError(2, "No such file")) == "[Errno 2] No such file"


def test_a_900_kb_message_becomes_a_short_line_saying_how_much_was_cut() -> None:
    text = loggable("x" * 900_000)
    assert text == "x" * LOG_TEXT_MAX + f"...[{900_000 - LOG_TEXT_MAX} more chars]"
    escaped = loggable("\n" * 900_000, limit=10)
    assert escaped == "\\n" * 5 + f"...[{900_000 - 5} more chars]"  # no escape cut in half


@given(st.text(), st.integers(1, 500))
def test_always_one_printable_line_of_bounded_length(text: str, limit: int) -> None:
    safe = loggable(text, limit)
    assert safe.isprintable()
    assert len(safe) <= limit + len(f"...[{len(text)} more chars]")
