"""systemd integration: sd_notify over a real NOTIFY_SOCKET, the watchdog that
follows the microphone, and the unit's hardening score."""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.daemon import Daemon
from tests.support.mic import FifoMic
from tests.support.notify import NotifySocket
from tests.support.waiting import assert_quiet

ROOT = Path(__file__).resolve().parent.parent


WATCHDOG_USEC = 2_000_000  # WatchdogSec=2: a ping every second
PING_EVERY_S = 1.0
WEDGE = Path(__file__).parent / "support" / "wedge"  # SIGUSR2 wedges the event loop


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    socket = NotifySocket(tmp_path / "notify.sock")
    yield socket
    socket.close()


def watched(stack: Stack, notify: NotifySocket, **env: str) -> Daemon:
    daemon = stack.daemon(env={"NOTIFY_SOCKET": str(notify.path),
                               "WATCHDOG_USEC": str(WATCHDOG_USEC), **env})
    notify.wait_for("READY", "1")
    return daemon


def assert_steady(pings: list[float]) -> None:
    assert max(b - a for a, b in itertools.pairwise(pings)) <= PING_EVERY_S * 1.5, pings


def test_ready_watchdog_follows_the_microphone_and_stopping(
    stack: Stack, mic: FifoMic, notify: NotifySocket
) -> None:
    daemon = watched(stack, notify)
    assert_steady(notify.wait_for_pings(4))
    notify.wait_for("STATUS", "streaming; 0.0 s buffered; 0 reconnects")

    mic.paused.set()  # the microphone stalls: nothing arrives any more
    stalled_at = time.monotonic()
    noticed_at = notify.wait_for("STATUS", "microphone_stalled; 0.0 s buffered; 0 reconnects",
                                 after=stalled_at, timeout=5)
    last_ping = max(notify.pings_between(0, noticed_at + 0.05), default=0.0)
    assert last_ping - stalled_at <= 2.0 + PING_EVERY_S, "the pings stop with the audio"
    # Starved for longer than WatchdogSec: systemd would restart it now.
    assert_quiet(lambda: not notify.pings_between(noticed_at + 0.05, float("inf")),
                 WATCHDOG_USEC / 1e6, "no watchdog ping while the microphone is stalled")

    mic.paused.clear()
    resumed_at = time.monotonic()
    assert_steady([*notify.wait_for_pings(3, after=resumed_at, timeout=5)])
    notify.wait_for("STATUS", "streaming; 0.0 s buffered; 0 reconnects", after=resumed_at)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    notify.wait_for("STOPPING", "1", timeout=2)


def test_the_watchdog_starves_while_the_event_loop_is_wedged(
    stack: Stack, mic: FifoMic, notify: NotifySocket
) -> None:
    """Audio keeps arriving (the capture thread reads on), but the loop does
    not turn: no WATCHDOG=1 until it does, so systemd restarts a wedged daemon."""
    daemon = watched(stack, notify, PYTHONPATH=str(WEDGE), TEST_WEDGE_S="3.5")
    before = notify.wait_for_pings(3)
    daemon.signal(signal.SIGUSR2)
    daemon.wait_for_log("test.wedged")
    read_at_wedge = mic.read_seconds
    daemon.wait_for_log("test.unwedged", timeout=10)
    wedged_at, unwedged_at = (float(at) for at in re.findall(r"wedged at=([0-9.]+)", daemon.log))
    resumed = notify.wait_for_pings(1, after=unwedged_at, timeout=5)[0]

    assert mic.read_seconds - read_at_wedge >= 2.5, "the microphone was read all along"
    # A ping sent just before the wedge may be read a moment later.
    assert not notify.pings_between(wedged_at + 0.05, unwedged_at), "no ping while wedged"
    gap = resumed - max(notify.pings_between(before[0], wedged_at + 0.05))
    assert gap > WATCHDOG_USEC / 1e6, f"a {gap:.1f} s gap: longer than WatchdogSec"
    assert_steady(notify.wait_for_pings(3, after=resumed + 0.1))


def test_a_reload_says_reloading_then_ready_and_the_watchdog_goes_on(
    stack: Stack, mic: FifoMic, notify: NotifySocket
) -> None:
    """RELOADING=1 with MONOTONIC_USEC, then READY=1, for a reload that restarts
    the microphone, the STT connection and the MQTT client, and for one that
    is refused; the watchdog is fed throughout."""
    daemon = watched(stack, notify)
    first = notify.wait_for_pings(2)[0]
    for change in ({"audio": {"device": "testmic", "chunk_ms": 50},
                    "stt": {"params": {"language": "de"}}, "mqtt": {"base_topic": "house"}},
                   {"mqtt": {"port": 99999}}):
        stack.config(**change)
        asked_at = time.monotonic()
        daemon.signal(signal.SIGHUP)
        reloading_at, fields = notify.wait_for_fields("RELOADING", "1", after=asked_at)
        assert abs(int(fields["MONOTONIC_USEC"]) / 1e6 - reloading_at) < 0.5
        ready_at, fields = notify.wait_for_fields("READY", "1", after=reloading_at)
        assert fields["STATUS"].split(";")[0] in ("streaming", "reconnecting")
    assert "config.reloaded changed=audio,stt,mqtt" in daemon.log
    assert "config.reload_refused" in daemon.log
    assert_steady(notify.pings_between(first, notify.wait_for_pings(3, after=ready_at)[-1]))


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
