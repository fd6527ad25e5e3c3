"""The checks, one function per link, and the order they run in.

Every check returns a `Check`; none raises for what it is checking (a
refused connection is a verdict, not an exception). A check that cannot run
because an earlier one failed (nothing can be tried without a valid
configuration) is skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from edged.config import (
    DEFAULT_SOURCE,
    LoadedConfig,
    Settings,
    load_config,
)
from edged.errors import ConfigError

Verdict = Literal["pass", "warn", "fail", "skip"]

CONFIGURATION = "configuration"
STATE_DIRECTORY = "state directory"
MICROPHONE = "microphone"
STT = "stt"
BROKER = "broker"
CLOCK = "clock"
ORDER = (CONFIGURATION, STATE_DIRECTORY, MICROPHONE, STT, BROKER, CLOCK)

MIN_YEAR = 2024  # a clock before this was never set (a Pi has no battery-backed clock)
MAX_SKEW_S = 300.0  # against the STT server's Date header
TIME_SYNC_FIX = ("turn on network time: `timedatectl set-ntp true` (systemd-timesyncd or "
                 "chrony), and let the device reach an NTP server")


@dataclass(frozen=True)
class Check:
    """One link's verdict. `detail` says what was found, `fix` what to do
    about it (None when it passed), `data` the measurements, for fleet tools."""

    name: str
    verdict: Verdict
    detail: str
    fix: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.verdict == "fail"


def passed(name: str, detail: str, **data: Any) -> Check:
    return Check(name, "pass", detail, None, data)


def warned(name: str, detail: str, fix: str, **data: Any) -> Check:
    return Check(name, "warn", detail, fix, data)


def failed(name: str, detail: str, fix: str, **data: Any) -> Check:
    return Check(name, "fail", detail, fix, data)


def skipped(name: str, reason: str) -> Check:
    return Check(name, "skip", reason)


# ---------------------------------------------------------------------------
# The order


def run_checks(
    config_paths: Sequence[Path] | None,
    flags: Mapping[str, Any],
    *,
    seconds: float,
    on_settings: Callable[[Settings], None] = lambda settings: None,
    announce: Callable[[str], None] = lambda name: None,
) -> Iterator[Check]:
    """Each check in data-path order, as it finishes. `on_settings(settings)`
    is called once the configuration is valid (for its secrets),
    `announce(name)` before each check starts."""
    announce(CONFIGURATION)
    configuration, loaded = check_configuration(config_paths, flags)
    yield configuration
    if loaded is None:
        for name in ORDER[1:]:
            yield skipped(name, "not checked: the configuration is invalid")
        return
    settings = loaded.settings
    on_settings(settings)

    from edged.doctor import broker, microphone, stt  # each imports its library when run

    announce(STATE_DIRECTORY)
    yield check_state_directory(settings)
    announce(MICROPHONE)
    yield microphone.check_microphone(settings, seconds)
    announce(STT)
    service = stt.check_stt(settings)
    yield service
    announce(BROKER)
    yield broker.check_broker(settings)
    announce(CLOCK)
    yield check_clock(service.data.get("server_date"), service.data.get("server_date_seen"))


# ---------------------------------------------------------------------------
# Configuration


def check_configuration(
    config_paths: Sequence[Path] | None, flags: Mapping[str, Any]
) -> tuple[Check, LoadedConfig | None]:
    try:
        loaded = load_config(config_paths, flags=flags)
    except ConfigError as error:
        fix = "correct it"
        if error.key and error.source:
            fix = f"correct {error.key} in {error.source}, then `edged check-config`"
        elif error.source:
            fix = f"correct {error.source}, then `edged check-config`"
        return failed(CONFIGURATION, str(error), fix, key=error.key, source=error.source), None
    settings = loaded.settings
    sources = [layer.source for layer in loaded.layers if layer.values] or [DEFAULT_SOURCE]
    detail = f"valid (from {', '.join(sources)}); device {settings.device.id}"
    # A missing API key is the STT check's to judge: a local server wants none.
    return passed(CONFIGURATION, detail, sources=sources, device=settings.device.id), loaded


# ---------------------------------------------------------------------------
# State directory


def check_state_directory(settings: Settings) -> Check:
    """Writable (a file is really written, synced and removed) by the user
    running this, and the free space against the spool's reserve."""
    from edged import storage

    path = settings.state_dir
    user = _user()
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return failed(STATE_DIRECTORY,
                          f"{path} does not exist, and {parent} is not writable as {user}",
                          f"create it for the user edged runs as: `sudo install -d -o edged "
                          f"-g edged {path}` (systemd's StateDirectory= does it), or set "
                          f"state_dir", path=str(path), exists=False, user=user)
        # edged makes it at start; the space is the parent's filesystem's.
        return _free_space(settings, parent, f"{path} does not exist yet: edged creates it "
                           f"at start ({parent} is writable as {user})", path=str(path),
                           exists=False, user=user)
    if not path.is_dir():
        return failed(STATE_DIRECTORY, f"{path} is not a directory",
                      "move the file away, or set state_dir to a directory",
                      path=str(path), user=user)
    probe = path / f".edged-doctor-{os.getpid()}"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, bytes(4096))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            probe.unlink(missing_ok=True)
    except OSError as error:
        condition = storage.condition_of(error, path)
        return failed(STATE_DIRECTORY,
                      f"{path} is not writable as {user}: {condition.replace('_', '-')} "
                      f"({storage.describe(error)})",
                      _storage_fix(condition, path), path=str(path), condition=condition,
                      user=user)
    return _free_space(settings, path, f"{path} is writable as {user}", path=str(path),
                       exists=True, user=user)


def _storage_fix(condition: str, path: Path) -> str:
    from edged import storage

    if condition == storage.READ_ONLY:
        return ("its filesystem is mounted read-only (after errors, often): see `dmesg`, "
                "`fsck` the card, remount it; or set state_dir")
    if condition == storage.FULL:
        return f"free space on the filesystem of {path} (`df -h {path}`)"
    if condition == storage.UNWRITABLE:
        return (f"give it to the user edged runs as: `sudo chown -R edged:edged {path}`; "
                f"run `sudo -u edged edged doctor` to check as that user")
    return f"check the storage device (`dmesg`), then {path}"


def _free_space(settings: Settings, where: Path, found: str, **data: Any) -> Check:
    """The free space of `where`'s filesystem against the spool's reserve."""
    stats = os.statvfs(where)
    free = stats.f_bavail * stats.f_frsize
    total = stats.f_blocks * stats.f_frsize
    buffer = settings.buffer
    reserve = max(buffer.spool_keep_free_mb * 2**20, total * buffer.spool_keep_free_percent / 100)
    percent = 100.0 * free / total if total else 0.0
    data.update(free_mb=round(free / 2**20, 1), total_mb=round(total / 2**20, 1),
                reserve_mb=round(reserve / 2**20, 1))
    detail = f"{found}; {_size(free)} free of {_size(total)} ({percent:.0f} %)"
    if free < reserve:
        return warned(STATE_DIRECTORY,
                      f"{detail}, under the spool's reserve of {_size(reserve)}: audio "
                      f"during an outage is kept in memory only",
                      f"free space on the filesystem of {where} (`df -h {where}`), or lower "
                      f"buffer.spool_keep_free_mb / buffer.spool_keep_free_percent", **data)
    return passed(STATE_DIRECTORY, detail, **data)


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


# ---------------------------------------------------------------------------
# Clock


def check_clock(server_date: str | None = None, seen_at: str | None = None,
                now: datetime | None = None) -> Check:
    """Set at all (a Pi boots in the past until network time arrives), and
    close to the STT server's clock when its Date header was seen (`seen_at`,
    ISO 8601: this clock when it came). A wrong clock breaks TLS (certificates
    not yet valid) and every `time` field."""
    now = now or datetime.now(UTC)
    shown = f"{now:%Y-%m-%d %H:%M:%S} UTC"
    if now.year < MIN_YEAR:
        return failed(CLOCK, f"the clock says {shown}: it was never set", TIME_SYNC_FIX,
                      now=now.isoformat())
    if server_date is None:
        return passed(CLOCK, f"{shown} (not checked against a server)", now=now.isoformat())
    try:
        server = parsedate_to_datetime(server_date)
    except (TypeError, ValueError):
        return passed(CLOCK, f"{shown} (the STT server's Date header was not readable)",
                      now=now.isoformat())
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    local = _parse_iso(seen_at) or now
    # The header has whole seconds, cut off: this clock reads up to 1 s later.
    skew = (local - server).total_seconds()
    data = {"now": now.isoformat(), "server": server.isoformat(), "skew_s": round(skew, 1)}
    if abs(skew) > MAX_SKEW_S:
        side = "ahead of" if skew > 0 else "behind"
        return failed(CLOCK, f"{shown} is {abs(skew):.0f} s {side} the STT server's clock",
                      TIME_SYNC_FIX, **data)
    return passed(CLOCK, f"{shown}, within {max(abs(skew), 1):.0f} s of the STT server's clock",
                  **data)


def _parse_iso(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
