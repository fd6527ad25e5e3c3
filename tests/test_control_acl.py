"""The README's mosquitto ACL for fleet control, on a real mosquitto: a
device's credentials cannot command another device (its request is dropped
by the broker and never answered), nor read another device's answers; the
fleet tool's (admin) can command one device or all."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, honest_stack
from tests.support.broker import Mosquitto, Subscriber
from tests.support.stt_double import SttDouble
from tests.support.waiting import assert_quiet
from tests.test_control import ask, until_answering

README = Path(__file__).resolve().parents[1] / "README.md"
PASSWORDS = {"admin": "admin-secret", "devicea": "secret-a", "deviceb": "secret-b"}


def readme_acl() -> str:
    """The ACL file as the README gives it (the test checks what users copy)."""
    text = README.read_text()
    match = re.search(r"```\n(# edged fleet ACL.*?)```", text, re.DOTALL)
    assert match, "README has no '# edged fleet ACL' block"
    return match.group(1)


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    workdir = tmp_path / "acl-broker"
    workdir.mkdir()
    passwords = workdir / "passwd"
    for user, password in PASSWORDS.items():
        create = ["-c"] if not passwords.exists() else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwords), user, password],
                       check=True, capture_output=True)
    passwords.chmod(0o600)
    acl = workdir / "acl"
    acl.write_text(readme_acl())
    acl.chmod(0o600)
    broker = Mosquitto(workdir, extra=f"password_file {passwords}\nacl_file {acl}\n",
                       anonymous=False).start()
    yield broker
    broker.stop()


@pytest.fixture
def device_a(tmp_path: Path, acl_broker: Mosquitto, stt: SttDouble) -> Iterator[Stack]:
    with honest_stack(tmp_path / "device-a", acl_broker, stt.url) as setup:
        yield setup


def test_a_device_cannot_command_another_but_the_fleet_tool_can(
        acl_broker: Mosquitto, device_a: Stack) -> None:
    device_a.microphone()
    device_a.daemon(control={"enabled": True}, device={"id": "devicea"},
                    mqtt={"username": "devicea"},
                    env={"EDGED_MQTT__PASSWORD": PASSWORDS["devicea"]})
    admin = Subscriber(acl_broker.port, "edged/#", login=("admin", PASSWORDS["admin"]))
    other = Subscriber(acl_broker.port, "edged/devicea/#",
                       login=("deviceb", PASSWORDS["deviceb"]))
    try:
        assert until_answering(admin, "devicea")["status"] == "ok"

        # Device B's credentials: its request on A's topic, and on the fleet
        # topic, are dropped by the broker; A never sees them, never answers.
        for topic in ("edged/devicea/request/reload", "edged/_fleet/request/reload"):
            other.client.publish(topic, b'{"transaction": "from-b"}', qos=1).wait_for_publish(5)
        admin.sync()  # everything the broker took before our marker has reached admin
        assert_quiet(lambda: not [m for m in admin.pending() + admin.seen
                                  if b"from-b" in m.payload], 1.5,
                     "B's requests never reach the broker's subscribers, nor get an answer")
        assert "control.request verb=reload" not in device_a.daemons[0].log

        # The fleet tool (admin) commands A, directly and through the fleet topic...
        assert ask(admin, "devicea", "reload", {})["status"] == "ok"
        fleet = ask(admin, "devicea", "health_check", {}, fleet=True)
        assert fleet["data"]["device"] == "devicea"
        # ... and B, subscribed to all of A's topics, read none of the answers.
        assert not [m for m in other.pending() if "/response/" in m.topic]
    finally:
        admin.close()
        other.close()
