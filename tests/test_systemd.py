"""systemd integration: sd_notify over a real NOTIFY_SOCKET, the watchdog that
follows the microphone, and the unit's hardening score."""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.mic import FifoMic
from tests.support.notify import NotifySocket

ROOT = Path(__file__).resolve().parent.parent


def test_ready_watchdog_follows_the_microphone_and_stopping(
    stack: Stack, mic: FifoMic, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        daemon = stack.daemon(env={"NOTIFY_SOCKET": str(notify.path),
                                   "WATCHDOG_USEC": "2000000"})
        notify.wait_for("READY", "1")
        first_ping = notify.wait_for("WATCHDOG", "1")
        time.sleep(4)
        flowing = notify.pings_between(first_ping, time.monotonic())
        assert len(flowing) >= 4
        assert max(b - a for a, b in itertools.pairwise(flowing)) <= 1.5
        assert any("streaming" in f.get("STATUS", "") for _, f in notify.messages)

        mic.paused.set()  # the microphone stalls: nothing arrives any more
        stalled_at = time.monotonic()
        time.sleep(6)
        assert not notify.pings_between(stalled_at + 3.5, time.monotonic()), (
            "the watchdog must starve within a few seconds of a stall"
        )

        mic.paused.clear()
        resumed_at = time.monotonic()
        time.sleep(3)
        assert notify.pings_between(resumed_at, time.monotonic()), "pings resume with audio"

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        notify.wait_for("STOPPING", "1", timeout=2)
    finally:
        notify.close()


def test_unit_hardening_scores_at_most_1_9() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(ROOT / "systemd" / "edged.service")],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for edged.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.9, result.stdout
    unit = (ROOT / "systemd" / "edged.service").read_text()
    for required in ("Type=notify", "RestartPreventExitStatus=78", "DeviceAllow=char-alsa rw",
                     "SupplementaryGroups=audio", "WatchdogSec="):
        assert required in unit
    assert "PrivateDevices=yes" not in unit, "it would hide /dev/snd"
