"""The fleet as its retained messages describe it, and who needs a look first.

Each edged keeps three retained messages under `<base>/<device>/`:
`availability` (`online`, or `offline` from its stop or its Last Will),
`state` (JSON health, `Daemon.state()`) and `audio` (JSON level, from
versions that measure it). Anyone allowed to publish there can put anything
in them, so every payload is parsed as hostile: a payload that is too big,
not JSON, not an object, or holds a field of the wrong type leaves that part
unknown and the device marked with the problem, never an exception. Fields
a daemon does not send yet (an older version) are simply unknown.

No I/O here: `Fleet.receive` takes a topic and a payload, `ordered` sorts,
`as_json` gives the document `edged fleet --json` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

MAX_PAYLOAD = 64 * 1024  # a state is under 1 KiB: past this it is not one of ours
MAX_DEVICES = 10_000  # retained topics anyone can create must not exhaust memory
KINDS = ("state", "availability", "audio")
HEALTHY_STATUSES = ("streaming", "listening")

# How urgently a device needs a look: lower first. One list, so the order
# is read (and changed) in one place.
OFFLINE = 0
UNREADABLE = 1  # its state cannot be read: nothing says it is fine
NO_MICROPHONE = 2
MICROPHONE_STALLED = 3
MICROPHONE_SILENT = 4
STT_REFUSED = 5  # auth_failed, rejected: no retry will fix it
STORAGE = 6
BACKLOG = 7
UNSETTLED = 8  # connecting, reconnecting, stopping, no state yet, an odd payload
MUTED = 9  # on purpose and healthy (no reason given), but not listening: before the rest
HEALTHY = 10


@dataclass
class Device:
    """One device's row: every field None when unknown."""

    id: str
    has_availability: bool = False
    online: bool | None = None
    has_state: bool = False
    status: str | None = None
    version: str | None = None
    muted: bool | None = None
    reconnects: int | None = None
    outbox_depth: int | None = None
    microphone: str | None = None
    storage: str | None = None
    # The state has the field (a version that reports it): None in
    # last_transcript_at then means no final since the daemon started.
    reports_transcripts: bool = False
    last_transcript_at: datetime | None = None
    has_audio: bool = False
    rms_dbfs: float | None = None
    peak_dbfs: float | None = None
    clipping: float | None = None
    problems: dict[str, str] = field(default_factory=dict)  # by topic kind, or "device"

    @property
    def empty(self) -> bool:
        return not (self.has_availability or self.has_state or self.has_audio)


class Fleet:
    """The devices seen under `base`, kept up to date message by message."""

    def __init__(self, base: str):
        self.base = base
        self.devices: dict[str, Device] = {}
        self.overflow = False  # more devices than MAX_DEVICES were offered

    @property
    def subscriptions(self) -> list[str]:
        return [f"{self.base}/+/{kind}" for kind in KINDS]

    def receive(self, topic: str, payload: bytes) -> bool:
        """Take one message; whether a device appeared that was not there before."""
        place = self._place(topic)
        if place is None:
            return False
        device_id, kind = place
        device = self.devices.get(device_id)
        new = device is None
        if device is None:
            if not payload:
                return False
            if len(self.devices) >= MAX_DEVICES:
                self.overflow = True
                return False
            device = self.devices[device_id] = Device(device_id)
            if not device_id.isprintable():
                device.problems["device"] = "device id has unprintable characters"
        device.problems.pop(kind, None)
        if kind == "availability":
            _read_availability(device, payload)
        elif kind == "state":
            _read_state(device, payload)
        else:
            _read_audio(device, payload)
        if device.empty:  # every retained message cleared: the device is gone
            del self.devices[device_id]
            return False
        return new


    def failed(self, topic: str, problem: str) -> None:
        """Taking a message under `topic` failed (a bug): its device shows `problem`."""
        place = self._place(topic)
        device = self.devices.get(place[0]) if place else None
        if place is not None and device is not None:
            device.problems[place[1]] = problem

    def _place(self, topic: str) -> tuple[str, str] | None:
        """(device id, kind) of a topic under `base`, None for any other topic."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) != 2 or parts[1] not in KINDS:
            return None
        return parts[0], parts[1]


# -- parsing ----------------------------------------------------------------------


class _Bad(Exception):
    """A payload or field we cannot use; its text names the problem."""


def _read_availability(device: Device, payload: bytes) -> None:
    device.has_availability = bool(payload)
    device.online = {b"online": True, b"offline": False}.get(payload.strip())
    if payload and device.online is None:
        device.problems["availability"] = "availability is neither online nor offline"


def _read_state(device: Device, payload: bytes) -> None:
    for name in ("status", "version", "muted", "reconnects", "outbox_depth", "microphone",
                 "storage", "last_transcript_at"):
        setattr(device, name, None)
    device.reports_transcripts = False
    device.has_state = bool(payload)
    if not payload:
        return
    try:
        state = _json_object(payload, "state")
    except _Bad as problem:
        device.problems["state"] = str(problem)
        return
    problems: list[str] = []

    def take(key: str, parse: Callable[[Any], Any]) -> Any:
        if key not in state:
            return None
        try:
            value = parse(state[key])
        except _Bad as problem:
            problems.append(f"{key} {problem}")
            return None
        if isinstance(value, str) and not value.isprintable():
            # No edged writes these: kept, to be shown escaped, but marked.
            problems.append(f"{key} has unprintable characters")
        return value

    device.status = take("status", _text)
    device.version = take("version", _text)
    device.muted = take("muted", _flag)
    device.reconnects = take("reconnects", _count)
    device.outbox_depth = take("outbox_depth", _count)
    device.microphone = take("microphone", _text)
    device.storage = take("storage", _text)
    if "last_transcript_at" in state:
        device.last_transcript_at = take("last_transcript_at", _moment)
        device.reports_transcripts = not any(p.startswith("last_transcript_at")
                                             for p in problems)
    if problems:
        device.problems["state"] = "state: " + "; ".join(problems)


def _read_audio(device: Device, payload: bytes) -> None:
    device.rms_dbfs = device.peak_dbfs = device.clipping = None
    device.has_audio = bool(payload)
    if not payload:
        return
    try:
        audio = _json_object(payload, "audio")
        device.rms_dbfs = _level(audio.get("rms_dbfs"), "rms_dbfs")
        device.peak_dbfs = _level(audio.get("peak_dbfs"), "peak_dbfs")
        device.clipping = _share(audio.get("clipping"))
    except _Bad as problem:
        device.problems["audio"] = str(problem)


def _json_object(payload: bytes, kind: str) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise _Bad(f"{kind} too large ({len(payload)} bytes)")
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the stack
        raise _Bad(f"{kind} is not JSON") from None
    if not isinstance(value, dict):
        raise _Bad(f"{kind} is not a JSON object")
    return value


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Bad("is not a string")


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _Bad("is not true or false")


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Bad("is not a count")


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise _Bad("is not an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad("is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _Bad("has no time zone")
    try:  # year 1 at +14:00 parses, yet lies before the first UTC moment there is
        moment.astimezone(UTC)
    except OverflowError:
        raise _Bad("is out of range") from None
    return moment


def _level(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)  # an integer of 400 digits overflows here
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise _Bad(f"audio: {key} is not a number")


def _share(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise _Bad("audio: clipping is not a share from 0 to 1")


# -- who needs a look first -------------------------------------------------------------


def trouble(device: Device) -> tuple[int, str | None]:
    """How urgently `device` needs a look (lower first) and why; None when it is
    healthy (a muted device is: it is not listening on purpose)."""
    if device.online is False:
        return OFFLINE, "offline"
    if "state" in device.problems:
        return UNREADABLE, "unreadable state"
    status = device.status
    muted = is_muted(device) is True
    if not muted:  # a muted device releases its microphone on purpose
        if status == "no_microphone" or device.microphone == "absent":
            return NO_MICROPHONE, "no microphone"
        if status == "microphone_stalled" or device.microphone == "stalled":
            return MICROPHONE_STALLED, "microphone stalled"
        if device.microphone == "silent":
            return MICROPHONE_SILENT, "microphone silent"
    if status in ("auth_failed", "rejected"):
        return STT_REFUSED, f"STT {status.replace('_', ' ')}"
    if device.storage not in (None, "ok"):
        return STORAGE, f"storage {device.storage}"
    if device.outbox_depth:
        return BACKLOG, f"{device.outbox_depth} queued"
    if not device.has_state:
        return UNSETTLED, "no state"
    if device.online is None:
        return UNSETTLED, "availability unknown"
    if status not in HEALTHY_STATUSES and not muted:
        return UNSETTLED, status or "status unknown"
    if device.problems:
        return UNSETTLED, "odd " + " and ".join(sorted(device.problems))
    if muted:
        return MUTED, None
    return HEALTHY, None


def is_muted(device: Device) -> bool | None:
    """Muted by its state's flag or its status; None when its version does not say."""
    if device.muted is True or device.status == "muted":
        return True
    return device.muted


def ordered(devices: list[Device]) -> list[Device]:
    """Trouble first, the worst kind first; by device id within a kind."""
    return sorted(devices, key=lambda device: (trouble(device)[0], device.id))


def transcript_age_s(device: Device, now: datetime) -> float | None:
    """Seconds since the device's last final (0 if its clock is ahead), None when none known."""
    if device.last_transcript_at is None:
        return None
    return max((now - device.last_transcript_at).total_seconds(), 0.0)


def _iso(moment: datetime | None) -> str | None:
    """In UTC, as the daemon writes it."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_json(devices: list[Device], now: datetime | None = None) -> list[dict[str, Any]]:
    """The rows of `edged fleet --json`, in order."""
    now = now or datetime.now(UTC)
    rows = []
    for device in ordered(devices):
        age = transcript_age_s(device, now)
        moment = device.last_transcript_at
        rows.append({
            "device": device.id,
            "online": device.online,
            "status": device.status,
            "muted": is_muted(device),
            "trouble": trouble(device)[1],
            "last_transcript_at": _iso(moment),
            "last_transcript_age_s": None if age is None else round(age, 1),
            "reconnects": device.reconnects,
            "outbox_depth": device.outbox_depth,
            "level_dbfs": device.rms_dbfs,
            "peak_dbfs": device.peak_dbfs,
            "clipping": device.clipping,
            "microphone": device.microphone,
            "storage": device.storage,
            "version": device.version,
            "error": "; ".join(device.problems[kind] for kind in sorted(device.problems))
            or None,
        })
    return rows
