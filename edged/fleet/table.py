"""The fleet as a text table, trouble first (pure: lines in, no terminal).

Device ids, statuses and versions come from whoever published them: each
cell goes through `loggable` (escapes shown, not obeyed) and is cut to its
column, so a hostile payload can neither drive the terminal nor push the
columns apart.
"""

from __future__ import annotations

from datetime import datetime

from edged.fleet.model import Device, is_muted, ordered, transcript_age_s, trouble
from edged.monitor.terminal import bar_cells, fit, printable
from edged.untrusted import loggable

ERROR_MARK = "!"
LEVEL_CELLS = 8
# (heading, width); the last column takes what is left.
COLUMNS = (("", 1), ("DEVICE", 0), ("STATUS", 18), ("PROBLEM", 20), ("MUTED", 5),
           ("LAST TEXT", 9), ("RECONN", 6), ("QUEUED", 6), ("LEVEL dBFS", 22), ("VERSION", 0))
DEVICE_MAX = 24


def render(devices: list[Device], now: datetime, width: int, *, title: str,
           notice: str | None = None, overflow: bool = False) -> list[str]:
    """The screen: a title, a notice, the header and a row per device (with a
    line under it naming what could not be read), as lines of at most `width`."""
    rows = ordered(devices)
    in_trouble = sum(1 for device in rows if trouble(device)[1] is not None)
    plural = "s" * (len(rows) != 1)
    lines = [f"{title}  {len(rows)} device{plural}, {in_trouble} need{'s' * (in_trouble == 1)} "
             f"a look  {now.astimezone().strftime('%H:%M:%S')}"]
    if notice:
        lines.append(f">> {notice}")
    if overflow:
        lines.append(">> more devices than can be shown: the rest are left out")
    lines.append("")
    device_width = max([len("DEVICE"), *(len(_device_name(device)) for device in rows)])
    widths = [w or min(device_width, DEVICE_MAX) for _, w in COLUMNS]
    lines.append(_join([heading for heading, _ in COLUMNS], widths))
    for device in rows:
        lines.append(_join(_cells(device, now), widths))
        if device.problems:
            problems = "; ".join(device.problems[kind] for kind in sorted(device.problems))
            lines.append(f"    {ERROR_MARK} {loggable(problems)}")
    if not rows:
        lines.append("  (no edged has published here yet)")
    return [fit(printable(line), max(width, 20)) for line in lines]


def _join(cells: list[str], widths: list[int]) -> str:
    fitted = [fit(cell, width).ljust(width) if width else cell
              for cell, width in zip(cells[:-1], widths, strict=False)]
    return " ".join([*fitted, cells[-1]]).rstrip()


def _device_name(device: Device) -> str:
    return loggable(device.id, 100)


def _cells(device: Device, now: datetime) -> list[str]:
    rank_reason = trouble(device)[1]
    status = "offline" if device.online is False else device.status
    # The reason, unless the status says it already (offline, reconnecting).
    problem = "" if rank_reason in (None, status) else loggable(rank_reason)
    mark = ERROR_MARK if rank_reason is not None or device.problems else " "
    return [mark, _device_name(device), _text(status), problem, _muted(device),
            _age(device, now), _count(device.reconnects), _count(device.outbox_depth),
            _level(device), _text(device.version)]


def _text(value: str | None) -> str:
    return "?" if value is None else loggable(value, 100)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _muted(device: Device) -> str:
    muted = is_muted(device)
    return "?" if muted is None else "yes" if muted else "no"


def _age(device: Device, now: datetime) -> str:
    age = transcript_age_s(device, now)
    if age is None:
        return "never" if device.reports_transcripts else "?"
    return age_text(age)


def age_text(seconds: float) -> str:
    """A short age: `12 s`, `5 min`, `3 h`, `2 d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _level(device: Device) -> str:
    if not device.has_audio or "audio" in device.problems:
        return "?"
    if device.rms_dbfs is None:
        return "no audio"
    filled = bar_cells(device.rms_dbfs, LEVEL_CELLS)
    bar = "#" * filled + "." * (LEVEL_CELLS - filled)
    clip = " CLIP" if device.clipping else ""
    return f"{device.rms_dbfs:6.1f} [{bar}]{clip}"
