"""`edged fleet` against a real mosquitto: crafted devices, a real daemon, hostile
payloads, an unreachable broker, and the live view in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest

from edged import __version__
from edged.errors import EX_UNAVAILABLE
from tests.conftest import Stack
from tests.support.broker import Mosquitto, Subscriber, free_port
from tests.support.daemon import write_config
from tests.support.mic import FifoMic
from tests.support.tonespeech import script
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]  # edged from this tree, not the venv's install
HEALTHY = {"status": "streaming", "version": "0.2.0", "device": "x", "reconnects": 0,
           "outbox_depth": 0, "microphone": "ok", "storage": "ok", "muted": False,
           "last_transcript_at": None}


def fleet_config(directory: Path, port: int) -> Path:
    return write_config(directory / "fleet.toml", {"mqtt": {"host": "127.0.0.1", "port": port}})


def run_fleet(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "edged", "fleet", "--config", str(config),
                           *args], capture_output=True, env=env, timeout=30, check=False)


def fleet_json(config: Path) -> list[dict[str, Any]]:
    done = run_fleet(config, "--json")
    assert done.returncode == 0, done.stderr.decode()
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def retain(port: int, devices: dict[str, dict[str, Any]]) -> None:
    """Retained messages per device: `state` and `audio` (a dict, or raw bytes), `availability`."""
    messages = []
    for name, parts in devices.items():
        for kind, value in parts.items():
            payload = value if isinstance(value, bytes | str) else json.dumps(value)
            messages.append({"topic": f"edged/{name}/{kind}", "payload": payload, "qos": 1,
                             "retain": True})
    publish.multiple(messages, hostname="127.0.0.1", port=port)


def test_json_lists_every_device_with_those_in_trouble_first(
    broker: Mosquitto, tmp_path: Path
) -> None:
    retain(broker.port, {
        "kitchen": {"availability": "online", "state": HEALTHY,
                    "audio": {"rms_dbfs": -38.5, "peak_dbfs": -20.0, "clipping": 0.0,
                              "microphone": "plughw:1,0", "gain_db": 0.0, "interval_s": 10.0}},
        "attic": {"availability": "online",
                  "state": {**HEALTHY, "status": "muted", "muted": True, "microphone": "absent"}},
        "hall": {"availability": "offline", "state": HEALTHY},
        "garage": {"availability": "online",
                   "state": {**HEALTHY, "status": "microphone_stalled", "microphone": "stalled",
                             "reconnects": 4}},
        "porch": {"availability": "online", "state": {**HEALTHY, "outbox_depth": 31}},
        "shed": {"availability": "online", "state": "{\"status\": \"stream"},
    })
    started = time.monotonic()
    rows = fleet_json(fleet_config(tmp_path, broker.port))
    assert time.monotonic() - started < 10, "it waits for the retained messages, not for ever"
    assert [row["device"] for row in rows] == ["hall", "shed", "garage", "porch", "attic",
                                               "kitchen"]
    by_name = {row["device"]: row for row in rows}
    assert by_name["hall"]["online"] is False
    assert by_name["hall"]["trouble"] == "offline"
    assert by_name["shed"]["error"] == "state is not JSON"
    assert by_name["garage"]["trouble"] == "microphone stalled"
    assert by_name["garage"]["reconnects"] == 4
    assert by_name["porch"]["outbox_depth"] == 31
    assert by_name["attic"]["muted"] is True
    assert by_name["attic"]["trouble"] is None
    kitchen = by_name["kitchen"]
    assert kitchen["trouble"] is None
    assert kitchen["level_dbfs"] == -38.5
    assert kitchen["version"] == "0.2.0"
    assert kitchen["last_transcript_at"] is None


def test_a_table_into_a_pipe_is_printed_once(broker: Mosquitto, tmp_path: Path) -> None:
    retain(broker.port, {"kitchen": {"availability": "online", "state": HEALTHY},
                         "hall": {"availability": "offline", "state": HEALTHY}})
    done = run_fleet(fleet_config(tmp_path, broker.port))
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert "\x1b" not in text, "no escape sequences into a pipe"
    lines = text.splitlines()
    assert "2 devices, 1 needs a look" in lines[0]
    rows = [line for line in lines if line[2:].startswith(("kitchen", "hall"))]
    assert [row.split()[1] if row.startswith("!") else row.split()[0] for row in rows] == [
        "hall", "kitchen"]


def test_a_broker_that_cannot_be_used_exits_69_saying_why(tmp_path: Path) -> None:
    done = run_fleet(fleet_config(tmp_path, free_port()), "--json")
    assert done.returncode == EX_UNAVAILABLE
    assert done.stdout == b""
    assert b"cannot reach the broker at 127.0.0.1:" in done.stderr
    assert b"Connection refused" in done.stderr

    locked = Mosquitto(tmp_path / "locked", anonymous=False).start()
    try:
        done = run_fleet(fleet_config(tmp_path, locked.port), "--json")
    finally:
        locked.stop()
    assert done.returncode == EX_UNAVAILABLE
    assert b"refused the connection" in done.stderr
    assert b"Traceback" not in done.stderr


def test_hostile_retained_payloads_are_shown_marked_and_never_obeyed(
    broker: Mosquitto, tmp_path: Path
) -> None:
    # mosquitto refuses C0 and C1 controls in topic names; bidi overrides and
    # line separators pass, and other brokers may be laxer still.
    evil_id = "evil\u202edi\u2028x"
    retain(broker.port, {
        "fine": {"availability": "online", "state": HEALTHY},
        evil_id: {"availability": "online", "state": HEALTHY},
        "escapes": {"availability": "online",  # valid JSON, with ESC sequences in its strings
                    "state": {**HEALTHY, "status": "\x1b[2J\x1b]0;owned\x07streaming",
                              "version": "1\r\n2"}},
        "types": {"availability": "online",
                  "state": {**HEALTHY, "reconnects": "lots", "muted": "no", "status": ["x"]}},
        "huge": {"availability": "online", "state": b"{\"a\": \"" + b"x" * 300_000 + b"\"}"},
        "deep": {"availability": "online", "state": b"[" * 20_000 + b"]" * 20_000},
        "binary": {"availability": "\xff\x00", "state": b"\xff\xfe\x1b[31m\x00"},
        "noise": {"availability": "online", "state": HEALTHY,
                  "audio": {"rms_dbfs": "-3", "clipping": 7}},
        "digits": {"availability": "online", "state": HEALTHY,
                   "audio": b'{"rms_dbfs": ' + b"9" * 400 + b"}"},
        "year-one": {"availability": "online",
                     "state": {**HEALTHY, "last_transcript_at": "0001-01-01T00:00:00+14:00"}},
    })
    config = fleet_config(tmp_path, broker.port)
    rows = {row["device"]: row for row in fleet_json(config)}
    assert set(rows) == {"fine", evil_id, "escapes", "types", "huge", "deep", "binary", "noise",
                         "digits", "year-one"}
    assert rows["fine"]["error"] is None
    assert rows[evil_id]["error"] == "device id has unprintable characters"
    assert rows["escapes"]["status"] == "\x1b[2J\x1b]0;owned\x07streaming"  # the data, as JSON
    assert "reconnects is not a count" in rows["types"]["error"]
    assert rows["huge"]["error"].startswith("state too large")
    assert rows["deep"]["error"] == "state is not JSON"
    assert rows["binary"]["error"] == ("availability is neither online nor offline; "
                                       "state is not JSON")
    assert "rms_dbfs is not a number" in rows["noise"]["error"]
    assert "rms_dbfs is not a number" in rows["digits"]["error"]
    assert "last_transcript_at is out of range" in rows["year-one"]["error"]

    done = run_fleet(config)  # the table, into a pipe
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    assert all(line.isprintable() for line in text.splitlines())
    assert "\\x1b[2J\\x1b]0;" in text  # its status, escaped (and cut to its column)
    assert "evil\\u202edi\\u2028x" in text
    marked = [line for line in text.splitlines() if line.startswith("    ! ")]
    assert len(marked) == 9, text  # every device but the fine one has its problem named
    assert "status has unprintable characters" in rows["escapes"]["error"]


def test_a_running_daemon_appears_with_its_last_transcript(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon()
    subscriber.next("edged/testpi/availability", payload=b"online")
    audio, _ = script([["alpha", "bravo"]])
    spoken_at = datetime.now(UTC)
    mic.play(audio)
    subscriber.next("edged/testpi/transcript", timeout=30)

    def settled_state() -> dict[str, Any] | None:
        state: dict[str, Any] = subscriber.next("edged/testpi/state", timeout=20).json()
        return state if state["last_transcript_at"] and not state["outbox_depth"] else None

    state = wait_until(settled_state, "a state with the transcript delivered")
    rows = fleet_json(stack.config())
    (row,) = rows
    assert row["device"] == "testpi"
    assert row["online"] is True
    assert row["status"] == "streaming"
    assert row["trouble"] is None
    assert row["version"] == __version__
    assert row["last_transcript_at"] == state["last_transcript_at"]
    heard = datetime.fromisoformat(row["last_transcript_at"])
    assert spoken_at <= heard <= datetime.now(UTC)
    assert 0 <= row["last_transcript_age_s"] < 30


# -- the live view in a real terminal ------------------------------------------------------


@pytest.fixture
def terminal() -> Iterator[Path]:
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed (scripts/test installs it)")
    directory = Path(tempfile.mkdtemp(prefix="edged-fleet-"))  # a socket path must be short
    yield directory / "tmux.sock"
    subprocess.run(["tmux", "-S", str(directory / "tmux.sock"), "kill-server"],
                   capture_output=True, timeout=20, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def tmux(socket: Path, *args: str) -> str:
    return subprocess.run(["tmux", "-S", str(socket), "-f", "/dev/null", *args],
                          capture_output=True, text=True, timeout=20, check=True).stdout


def test_live_view_follows_the_broker_and_quits_on_q(
    broker: Mosquitto, tmp_path: Path, terminal: Path
) -> None:
    retain(broker.port, {"kitchen": {"availability": "online", "state": HEALTHY}})
    command = shlex.join(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "edged", "fleet",
                          "--config", str(fleet_config(tmp_path, broker.port))])
    tmux(terminal, "new-session", "-d", "-s", "fleet", "-x", "140", "-y", "20",
         f'{command}; echo "fleet exited $?"; sleep 600')

    def screen() -> str:
        return tmux(terminal, "capture-pane", "-p", "-t", "fleet")

    def rows(text: str) -> list[str]:
        return [line[2:].split()[0] for line in text.splitlines()
                if line[2:].startswith(("kitchen", "porch"))]

    def screen_when(shows: Callable[[str], bool]) -> str | None:
        text = screen()
        return text if shows(text) else None

    wait_until(lambda: rows(screen()) == ["kitchen"], "the kitchen on the live view")
    assert "q or Ctrl-C quits" in screen()
    retain(broker.port, {"porch": {"availability": "offline", "state": HEALTHY}})
    shown = wait_until(lambda: screen_when(lambda s: rows(s) == ["porch", "kitchen"]),
                       "the porch, offline, above the kitchen without a restart", timeout=10)
    assert "2 devices, 1 needs a look" in shown

    broker.kill()
    lost = wait_until(lambda: screen_when(lambda s: "connection to the broker lost" in s),
                      "the notice of a lost broker", timeout=10)
    assert rows(lost) == ["porch", "kitchen"], "what was known stays on screen"
    again = Mosquitto(broker.workdir, port=broker.port).start()
    try:
        wait_until(lambda: screen_when(lambda s: "connection to the broker lost" not in s),
                   "the view to reconnect by itself", timeout=15)
    finally:
        again.stop()
    tmux(terminal, "send-keys", "-t", "fleet", "q")
    left = wait_until(lambda: screen_when(lambda s: "fleet exited" in s), "the view to quit")
    assert "fleet exited 0" in left
    assert "kitchen" not in left, "the alternate screen is gone: the terminal is as it was"
