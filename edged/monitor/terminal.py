"""Plain-ANSI drawing shared by `edged monitor` and `edged fleet`.

Both redraw the alternate screen in place a few times a second, with no
curses, so they work over SSH on any terminal. What they show comes partly
from outside (transcripts, error messages, device ids from a broker): the
helpers here keep it to printable characters and to the screen's width.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
from collections.abc import Iterator
from typing import Any, Self

BAR_LOW_DBFS = -60.0  # a level bar's left end; quieter than this is room noise on any microphone


def printable(line: str) -> str:
    """`line` with every non-printable character (ESC above all) shown as `?`."""
    return "".join(c if c.isprintable() else "?" for c in line)


def fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def optional_number(value: Any) -> float | None:
    """`value` as a float if it is a JSON number (not a bool), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def number(value: Any, default: float) -> float:
    found = optional_number(value)
    return default if found is None else found


def bar_cells(value_dbfs: float, cells: int) -> int:
    """How many of `cells` a level bar fills for `value_dbfs`."""
    fraction = (value_dbfs - BAR_LOW_DBFS) / -BAR_LOW_DBFS
    return round(min(max(fraction, 0.0), 1.0) * cells)


def write(text: str) -> None:
    # Bytes in the terminal's encoding, so text in another script cannot
    # stop the view on a non-UTF-8 locale.
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout.buffer.write(text.encode(encoding, errors="replace"))
    sys.stdout.buffer.flush()


class AnsiScreen:
    """The alternate screen, redrawn in place (no clear: that flickers)."""

    def __enter__(self) -> Self:
        write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
        return self

    def __exit__(self, *_: object) -> None:
        write("\x1b[?25h\x1b[?1049l")

    @property
    def width(self) -> int:
        # One column spare: writing the last one leaves some terminals about to wrap.
        return shutil.get_terminal_size().columns - 1

    def show(self, lines: list[str], footer: str) -> None:
        """`lines` (already fitted to `width`), a blank line and `footer`, cut to the height."""
        lines = [*lines, "", footer][: max(shutil.get_terminal_size().lines, 1)]
        write("\x1b[H" + "\x1b[K\n".join(lines) + "\x1b[K\x1b[J")


@contextlib.contextmanager
def keys() -> Iterator[KeyReader]:
    """Single key presses from a terminal on stdin (cbreak: no Enter needed,
    Ctrl-C still interrupts); no keys at all when stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield KeyReader(None)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield KeyReader(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class KeyReader:
    def __init__(self, fd: int | None):
        self._fd = fd

    def wait(self, timeout: float) -> str:
        """What was typed within `timeout` (empty if nothing)."""
        if self._fd is None:
            select.select([], [], [], timeout)
            return ""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return ""
        data = os.read(self._fd, 64)
        if not data:  # the terminal went away: no more keys, only the timeout
            self._fd = None
        return data.decode(errors="replace")
