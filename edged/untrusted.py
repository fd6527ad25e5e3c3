"""Text that came from outside, made safe for a log line.

A log line is one line: journald and whoever reads the journal split on
newlines, and a terminal obeys escape sequences. Text edged did not write
itself (a service's error message, a close reason, a broker's reason, a
frame's excerpt, a name from the configuration) could otherwise forge a
second line ("...\\n2026-01-01 00:00:00 ERROR edged ..."), recolour or clear
the reader's terminal, or make one line of a megabyte. `loggable` is the one
place that prevents all three.
"""

from __future__ import annotations

LOG_TEXT_MAX = 400  # characters of outside text per log field: a long path and a sentence

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def loggable(text: object, limit: int = LOG_TEXT_MAX) -> str:
    """`text` on one line: every character that is not printable (control
    characters, including newlines and the ESC of ANSI sequences; Unicode line
    separators, format and bidi controls; lone surrogates, which would make
    the log handler itself fail) is escaped as in a Python literal, and so is
    the backslash, so an escape in the output always means one in the input.
    At most `limit` characters are kept; a marker says how many were cut."""
    text = text if isinstance(text, str) else str(text)
    head = text[:limit]
    if head.isprintable() and "\\" not in head:  # the usual case: nothing to escape
        kept, used = head, len(head)
    else:
        kept, used = _escape(head, limit)
    cut = len(text) - used
    return f"{kept}...[{cut} more chars]" if cut > 0 else kept


def _escape(text: str, limit: int) -> tuple[str, int]:
    """Escaped `text` of at most `limit` characters, and how many input
    characters that covers (an escape is never split)."""
    parts: list[str] = []
    length = 0
    for used, char in enumerate(text):
        if char.isprintable() and char != "\\":
            piece = char
        else:
            piece = _NAMED.get(char) or char.encode("unicode_escape").decode("ascii")
        if length + len(piece) > limit:
            return "".join(parts), used
        parts.append(piece)
        length += len(piece)
    return "".join(parts), len(text)
