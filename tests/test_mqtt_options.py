"""MQTT 5 with session expiry, and a broker that wants a login."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.broker import Mosquitto, Subscriber
from tests.support.mic import FifoMic
from tests.support.tonespeech import script

PASSWORD = "s3cret-broker-pass"


def test_mqtt_5_with_session_expiry_delivers(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon(mqtt={"protocol": "5", "session_expiry_s": 300})
    audio, _ = script([["golf"]])
    mic.play(audio)
    assert subscriber.next("edged/testpi/transcript", timeout=20).json()["text"] == "Golf."
    assert "mqtt.connected" in daemon.log


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "edged", PASSWORD],
                   check=True, capture_output=True, timeout=30)
    broker = Mosquitto(tmp_path / "locked", extra=f"password_file {passwords}\n",
                       anonymous=False).start()
    yield broker
    broker.stop()


@pytest.mark.parametrize("right", [True, False], ids=["right-password", "wrong-password"])
def test_broker_login_from_a_password_file_that_stays_secret(
    stack: Stack, mic: FifoMic, locked_broker: Mosquitto, tmp_path: Path, right: bool
) -> None:
    secret = tmp_path / "mqtt_password"
    secret.write_text((PASSWORD if right else "not-it-either") + "\n")
    secret.chmod(0o600)
    daemon = stack.daemon(mqtt={"port": locked_broker.port, "username": "edged",
                                "password_file": str(secret)})
    if right:
        daemon.wait_for_log("mqtt.connected")
    else:
        daemon.wait_for_log("mqtt.connect_failed")
        assert "mqtt.connected" not in daemon.log
        assert "Not authorized" in daemon.log or "refused" in daemon.log
    assert PASSWORD not in daemon.log
    assert "not-it-either" not in daemon.log
