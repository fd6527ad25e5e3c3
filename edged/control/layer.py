"""The remote configuration layer's file: what `config` set writes.

It lives in the state directory, next to the outbox: JSON, one object shaped
like a config file's sections. Whoever can write the state directory could
have put anything there (a symlink, a FIFO, a gigabyte, garbage): it is read
as hostile, and anything that is not a small regular file holding a JSON
object is `Damaged` (moved aside by the daemon, like other damaged files).
Writes are atomic (temp file, fsync, rename, fsync of the directory): after a
power cut the layer is either the old one or the new one, never half of each.

No knowledge of the settings here (config.py validates the values): this
module only moves bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edged.storage import NotAFile, fsync_directory, read_small_file, replace_file

FILE_NAME = "remote-config.json"
MAX_BYTES = 64 * 1024  # a few keys are a few hundred bytes
MAX_DEPTH = 8  # a config file's sections are two or three levels deep


class Damaged(Exception):
    """The file is not a layer: why (no content of the file in the text)."""


def path_in(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def depth(value: Any) -> int:
    """How deeply containers nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: list[Any] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        stack += [(child, level + 1) for child in children]
    return deepest


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("a number too large for a float")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """JSON from outside: strict UTF-8, finite numbers, bounded nesting.
    Raises ValueError with a short reason that quotes none of the input."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as error:
        # json's messages say where, not what: safe to pass on. Others (an
        # integer of thousands of digits) get a fixed text.
        reason = (f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
                  if isinstance(error, json.JSONDecodeError) else f"not valid JSON ({error})")
        raise ValueError(reason) from None
    if depth(value) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def read(path: Path) -> dict[str, Any]:
    """The layer's document, {} when there is none. Raises `Damaged` for what
    is not a layer, OSError for a file that cannot be read (permissions: the
    caller says so, and leaves the file where it is)."""
    try:
        data = read_small_file(path, MAX_BYTES)
    except NotAFile as error:
        raise Damaged(str(error)) from None
    if data is None:
        return {}
    try:
        document = parse_json(data)
    except ValueError as error:
        raise Damaged(str(error)) from None
    if not isinstance(document, dict):
        raise Damaged("not a JSON object")
    return document


def write(path: Path, document: dict[str, Any]) -> None:
    """Replace the layer atomically; an empty document removes the file.
    Raises OSError (full, read-only, ...) with nothing half-written."""
    if not document:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(path.parent)
        return
    replace_file(path, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")
