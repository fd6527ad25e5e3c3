"""`edged doctor` against real parts: the broker, the STT double and the local
STT server, a wrong key, a stopped broker, a locked broker, wss:// with and
without its CA, and the FIFO microphone playing a tone, silence, a
whisper and a clipping square wave. Each run is `python -m edged doctor` as a
process, with the stack's HOME (its ~/.asoundrc holds `testmic`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from edged.config import load_config
from edged.doctor.checks import ORDER, Check, check_clock, check_state_directory
from edged.doctor.report import line, masked
from edged.errors import ConfigError
from edged.logs import set_secrets
from tests.conftest import API_KEY, Stack
from tests.support.broker import Mosquitto, free_port, wait_for_port
from tests.support.certs import make_pki
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import tone

WRONG_KEY = "sk-WRONG+key/4711"
PASSWORD = "s3cret-broker-pass"
NO_DAC = ["setpriv", "--inh-caps=-all",
          "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown", "--"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.stdout)  # nothing else on stdout
        return document

    @property
    def checks(self) -> dict[str, dict[str, Any]]:
        return {check["name"]: check for check in self.report["checks"]}

    def verdicts(self) -> dict[str, str]:
        return {name: check["verdict"] for name, check in self.checks.items()}


def doctor(stack: Stack, *args: str, env: dict[str, str] | None = None,
           config: Path | None = None, wrap: list[str] | None = None,
           **overrides: dict[str, Any]) -> Run:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    environment.pop("JOURNAL_STREAM", None)
    environment.update({"HOME": str(stack.home), "EDGED_STT__API_KEY": API_KEY, **(env or {})})
    process = subprocess.run(
        [*(wrap or []), sys.executable, "-m", "edged", "doctor",
         "--config", str(config or stack.config(**overrides)), "--seconds", "1", *args],
        env=environment, capture_output=True, text=True, timeout=60,
    )
    print(process.stdout, process.stderr)  # shown on failure
    return Run(process.returncode, process.stdout, process.stderr)


def square_wave(seconds: float) -> bytes:
    """Full scale, both rails: every sample clips."""
    half = 8  # samples: a 1 kHz square wave
    cycles = round(seconds * 16_000 / (2 * half))
    return array("h", ([32767] * half + [-32768] * half) * cycles).tobytes()


def whisper(seconds: float) -> bytes:
    """A tone at about -70 dBFS RMS: a working input, far too quiet for speech."""
    return array("h", (round(30 * math.sin(2 * math.pi * 440 * n / 16_000))
                       for n in range(round(seconds * 16_000)))).tobytes()


# ---------------------------------------------------------------------------
# All links


def test_every_link_passes_with_the_double_the_broker_and_a_tone(
    stack: Stack, mic: FifoMic
) -> None:
    mic.play(tone("alpha", 4.0))

    run = doctor(stack, "--json")

    assert run.returncode == 0
    assert run.report["ok"] is True
    assert [check["name"] for check in run.report["checks"]] == list(ORDER)
    assert set(run.verdicts().values()) == {"pass"}
    checks = run.checks
    level = checks["microphone"]["data"]
    assert level["level"] == "fine"
    assert -16.5 < level["rms_dbfs"] < -14.0  # a sine of amplitude 8000: -15.2 dBFS
    assert -13.0 < level["peak_dbfs"] < -11.5
    stt = checks["stt"]["data"]
    assert (stt["status"], stt["close_code"], stt["audio_s"]) == (101, 1000, 1.0)
    assert "key accepted" in checks["stt"]["detail"]
    assert checks["broker"]["data"]["topic"] == "edged/testpi/doctor"
    assert "STT server's clock" in checks["clock"]["detail"]
    assert run.stderr == ""


def test_every_link_passes_with_the_local_stt_server(
    stack: Stack, mic: FifoMic, tmp_path: Path
) -> None:
    port = free_port()
    with (tmp_path / "stt-server.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "edged", "stt-server", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout=60)
        stack.stt_url = f"ws://127.0.0.1:{port}/v1/listen"
        mic.play(tone("charlie", 4.0))
        run = doctor(stack, "--json", stt={"provider": "pocketsphinx"})
    finally:
        server.terminate()
        server.wait(10)

    assert run.returncode == 0
    assert set(run.verdicts().values()) == {"pass"}
    assert run.checks["stt"]["data"]["close_code"] == 1000


# ---------------------------------------------------------------------------
# The microphone


@pytest.mark.parametrize(("sound", "level", "verdict", "status"), [
    (None, "silent", "fail", 1),
    (whisper, "too quiet", "warn", 0),
    (square_wave, "clipping", "warn", 0),
], ids=["silence", "whisper", "square-wave"])
def test_the_microphone_level_has_a_verdict(
    stack: Stack, mic: FifoMic, sound: Any, level: str, verdict: str, status: int
) -> None:
    if sound is not None:
        mic.play(sound(4.0))  # else the FIFO plays exact digital silence

    run = doctor(stack, "--json")

    microphone = run.checks["microphone"]
    assert microphone["data"]["level"] == level
    assert microphone["verdict"] == verdict
    assert f"({level})" in microphone["detail"]
    assert microphone["fix"]
    assert run.returncode == status, "a warning does not fail the run"
    if level == "clipping":
        assert microphone["data"]["clipped_percent"] == 100.0
        assert microphone["data"]["peak_dbfs"] == 0.0
    if level == "silent":
        assert "exact digital silence" in microphone["detail"]
        assert "alsamixer" in microphone["fix"]


def test_a_microphone_that_is_not_there_is_named(stack: Stack, mic: FifoMic) -> None:
    run = doctor(stack, "--json", audio={"device": "nosuchmic"})

    microphone = run.checks["microphone"]
    assert microphone["verdict"] == "fail"
    assert "nosuchmic" in microphone["detail"]
    assert "edged devices" in microphone["fix"]
    assert run.returncode == 1


# ---------------------------------------------------------------------------
# The STT service


def test_a_wrong_key_fails_the_stt_check_naming_401_and_stays_secret(
    stack: Stack, mic: FifoMic
) -> None:
    mic.play(tone("alpha", 4.0))

    # The wrong key as the header, and again in the URL's query via stt.params.
    run = doctor(stack, "--json", env={"EDGED_STT__API_KEY": WRONG_KEY},
                 stt={"params": {"api_key": WRONG_KEY}})

    assert run.returncode == 1
    assert run.report["ok"] is False
    stt = run.checks["stt"]
    assert stt["verdict"] == "fail"
    assert "the key was refused (HTTP 401)" in stt["detail"]
    assert "stt.api_key" in stt["fix"]
    assert stt["data"]["status"] == 401
    others = {name: verdict for name, verdict in run.verdicts().items() if name != "stt"}
    assert set(others.values()) == {"pass"}
    output = run.stdout + run.stderr
    for form in (WRONG_KEY, "sk-WRONG%2Bkey%2F4711", "sk-WRONG+key%2F4711"):
        assert form not in output


def test_secrets_are_masked_in_every_string_of_a_check() -> None:
    set_secrets([WRONG_KEY])
    try:
        check = masked(Check("stt", "fail", f"refused {WRONG_KEY}", f"not {WRONG_KEY}",
                             {"url": f"x?k={WRONG_KEY}", "steps": [WRONG_KEY]}))
    finally:
        set_secrets([])
    assert WRONG_KEY not in repr(check)
    assert check.detail == "refused ********"


@pytest.fixture
def wss_double(tmp_path: Path) -> Iterator[tuple[SttDouble, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server = SttDouble(api_key=API_KEY, tls=context).start()
    yield server, pki.ca
    server.stop()


def test_wss_fails_at_tls_without_its_ca_and_passes_with_it(
    stack: Stack, mic: FifoMic, wss_double: tuple[SttDouble, Path]
) -> None:
    server, ca = wss_double
    stack.stt_url = server.url
    mic.play(tone("alpha", 8.0))

    unverified = doctor(stack, "--json")
    assert not server.sessions, "no audio to a server that was not verified"
    verified = doctor(stack, "--json", stt={"ca_file": str(ca)})

    stt = unverified.checks["stt"]
    assert stt["verdict"] == "fail"
    assert "certificate of 127.0.0.1 was not accepted" in stt["detail"]
    assert "stt.ca_file" in stt["fix"]
    assert verified.checks["stt"]["verdict"] == "pass"
    assert "TLSv1.3 verified" in verified.checks["stt"]["detail"]


# ---------------------------------------------------------------------------
# The broker


def test_a_stopped_broker_fails_with_the_fix(stack: Stack, mic: FifoMic) -> None:
    mic.play(tone("alpha", 4.0))
    config = stack.config()
    stack.broker.stop()

    run = doctor(stack, config=config)  # the text report

    lines = run.stdout.splitlines()
    assert (f"[FAIL] broker: connection refused at 127.0.0.1:{stack.broker.port} — fix: "
            "start the broker (`sudo systemctl start mosquitto`) or set mqtt.host / "
            "mqtt.port") in lines
    assert lines[-1] == "edged doctor: FAILED: broker (5 passed, 1 failed)"
    assert [row[:6] for row in lines[:-1]] == ["[ OK ]"] * 4 + ["[FAIL]", "[ OK ]"]
    assert run.returncode == 1


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "edged", PASSWORD],
                   check=True, capture_output=True, timeout=30)
    broker = Mosquitto(tmp_path / "locked", extra=f"password_file {passwords}\n",
                       anonymous=False).start()
    yield broker
    broker.stop()


def test_bad_broker_credentials_are_named_and_stay_secret(
    stack: Stack, mic: FifoMic, locked_broker: Mosquitto
) -> None:
    mic.play(tone("alpha", 8.0))
    mqtt = {"port": locked_broker.port, "username": "edged"}

    wrong = doctor(stack, "--json", env={"EDGED_MQTT__PASSWORD": "not-the-password"},
                   mqtt=mqtt)
    right = doctor(stack, "--json", env={"EDGED_MQTT__PASSWORD": PASSWORD}, mqtt=mqtt)

    broker = wrong.checks["broker"]
    assert broker["verdict"] == "fail"
    assert "bad credentials" in broker["detail"]
    assert "mqtt.password" in broker["fix"]
    assert "not-the-password" not in wrong.stdout + wrong.stderr
    assert right.checks["broker"]["verdict"] == "pass"
    assert "CONNACK accepted for user edged" in right.checks["broker"]["detail"]
    assert PASSWORD not in right.stdout + right.stderr


# ---------------------------------------------------------------------------
# Configuration, state directory, clock, Ctrl-C


def test_a_configuration_error_is_the_first_failure_and_the_rest_skip(
    stack: Stack, tmp_path: Path
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[mqtt]\nport = 70000\n")

    run = doctor(stack, "--json", config=config)

    configuration = run.checks["configuration"]
    assert configuration["verdict"] == "fail"
    assert configuration["detail"].startswith(f"mqtt.port (from {config})")
    assert f"correct mqtt.port in {config}" in configuration["fix"]
    assert [v for name, v in run.verdicts().items() if name != "configuration"] == ["skip"] * 5
    assert run.returncode == 1


def test_an_unwritable_state_directory_fails(stack: Stack, mic: FifoMic) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory root cannot write")
    mic.play(tone("alpha", 4.0))
    state = stack.home / "state"
    state.mkdir(mode=0o555)
    state.chmod(0o555)

    run = doctor(stack, "--json", wrap=NO_DAC)

    check = run.checks["state directory"]
    assert check["verdict"] == "fail"
    assert "not writable as root: unwritable (Permission denied" in check["detail"]
    assert "chown" in check["fix"]
    assert not list(state.iterdir()), "the probe file was not left behind"


def test_the_state_directory_and_its_free_space(tmp_path: Path) -> None:
    def settings(path: Path, keep_free_percent: float = 0.0) -> Any:
        flags = {"state_dir": str(path), "device.id": "testpi"}
        loaded = load_config([], flags=flags, environ={
            "EDGED_BUFFER__SPOOL_KEEP_FREE_PERCENT": str(keep_free_percent),
            "EDGED_BUFFER__SPOOL_KEEP_FREE_MB": "0"})
        return loaded.settings

    (tmp_path / "state").mkdir()
    (tmp_path / "afile").write_text("")
    fine = check_state_directory(settings(tmp_path / "state"))
    missing = check_state_directory(settings(tmp_path / "new" / "state"))
    with pytest.raises(ConfigError, match="state_dir"):
        # A path that can never be a directory is a configuration error, so
        # the doctor's first check (configuration) fails and names it.
        settings(tmp_path / "afile")
    short = check_state_directory(settings(tmp_path / "state", keep_free_percent=90))

    assert fine.verdict == "pass"
    assert "writable" in fine.detail
    assert " free of " in fine.detail
    assert missing.verdict == "pass"
    assert "edged creates it at start" in missing.detail
    stats = os.statvfs(tmp_path)
    if stats.f_bavail < 0.9 * stats.f_blocks:
        assert short.verdict == "warn"
        assert "spool's reserve" in short.detail


def test_the_clock_is_set_and_close_to_the_servers() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now, usegmt=True)

    unset = check_clock(now=datetime(1970, 1, 1, 0, 1, tzinfo=UTC))
    alone = check_clock(now=now)
    close = check_clock(header, (now + timedelta(seconds=0.6)).isoformat(), now=now)
    behind = check_clock(header, (now - timedelta(minutes=12)).isoformat(), now=now)

    assert unset.verdict == "fail"
    assert "never set" in unset.detail
    assert "timedatectl set-ntp true" in (unset.fix or "")
    assert alone.verdict == "pass"
    assert "not checked against a server" in alone.detail
    assert close.verdict == "pass"
    assert "within 1 s of the STT server's clock" in close.detail
    assert behind.verdict == "fail"
    assert "720 s behind the STT server's clock" in behind.detail
    assert line(behind).startswith("[FAIL] clock: 2026-03-01 12:00:00 UTC is 720 s behind")


def test_ctrl_c_ends_it_cleanly(stack: Stack, mic: FifoMic) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    environment["HOME"] = str(stack.home)
    process = subprocess.Popen(
        [sys.executable, "-m", "edged", "doctor", "--config", str(stack.config()),
         "--seconds", "10"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 10
    assert process.stdout is not None
    while "state directory" not in process.stdout.readline():  # the microphone is next
        assert time.monotonic() < deadline
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=10)

    assert process.returncode == 130
    assert stderr.strip() == "edged doctor: interrupted"
    assert "microphone" not in stdout
