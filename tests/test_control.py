"""Fleet control end to end: real mosquitto, real daemons, requests on MQTT.

Each verb answered on the device's response topic; malformed requests get an
error response and leave the daemon serving; refused keys named with their
reasons; a `config` set that survives a restart (and shows in check-config);
a fleet request answered by two daemons; control off by default and turned
on and off by a reload; a read-only state directory refused cleanly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, Stack, honest_stack
from tests.support.broker import Mosquitto, Subscriber
from tests.support.storage import read_only
from tests.support.stt_double import SttDouble
from tests.support.waiting import assert_quiet, wait_until

ON = {"enabled": True}


def ask(subscriber: Subscriber, device: str, verb: str, body: dict[str, Any] | bytes,
        *, fleet: bool = False, timeout: float = 20.0) -> dict[str, Any]:
    """Publish a request and return the device's answer to it (matched by transaction)."""
    transaction = f"t{time.monotonic_ns()}"
    if isinstance(body, dict):
        body = json.dumps({**body, "transaction": transaction}).encode()
        wanted: Any = transaction
    else:
        wanted = None  # a raw payload carries no transaction: the next answer is its
    topic = f"edged/_fleet/request/{verb}" if fleet else f"edged/{device}/request/{verb}"
    subscriber.client.publish(topic, body, qos=1)
    deadline = time.monotonic() + timeout
    while True:
        answer = subscriber.next(f"edged/{device}/response/{verb}",
                                 timeout=max(deadline - time.monotonic(), 0.01)).json()
        if answer.get("transaction") == wanted:
            assert isinstance(answer, dict)
            return answer


def until_answering(subscriber: Subscriber, device: str) -> dict[str, Any]:
    """The first health check answered (the daemon subscribes as it connects)."""
    def answered() -> dict[str, Any] | None:
        try:
            return ask(subscriber, device, "health_check", {}, timeout=0.5)
        except TimeoutError:
            return None
    return wait_until(answered, f"{device} answering requests")


def responses(subscriber: Subscriber, device: str) -> list[Any]:
    subscriber.pending()
    return [m for m in subscriber.seen if m.topic.startswith(f"edged/{device}/response/")]


def check_config(config: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "edged", "check-config", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            env={"EDGED_STT__API_KEY": API_KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_each_verb_answers_and_malformed_requests_get_errors(
        stack: Stack, mic: object, subscriber: Subscriber) -> None:
    daemon = stack.daemon(control=ON)
    health = until_answering(subscriber, "testpi")
    assert health["status"] == "ok"
    assert health["data"]["device"] == "testpi"
    assert isinstance(health["data"]["healthy"], bool)
    assert health["data"]["verdict"]
    assert "outbox_depth" in health["data"]  # the state as the state topic has it

    config = ask(subscriber, "testpi", "config", {})
    assert config["status"] == "ok"
    entries = config["data"]["config"]
    assert entries["audio.silent_after_s"] == {"value": 60.0, "source": "default"}
    assert entries["stt.api_key"] == {"value": "********",
                                      "source": "environment variable EDGED_STT__API_KEY"}
    assert entries["mqtt.port"]["source"] == str(stack.home / "edged.toml")
    assert API_KEY not in json.dumps(config)

    # Malformed: each gets an error on the verb's response topic, and the
    # daemon goes on serving.
    for payload, why in [(b"not json", "not valid JSON"), (b"[1,2]", "JSON object"),
                         (b"\xff\xfe", "not UTF-8"), (b"[" * 60_000, "nested too deeply"),
                         (b'{"options": "all"}', '"options" must be an object')]:
        answer = ask(subscriber, "testpi", "config", payload)
        assert answer["status"] == "error", answer
        assert why in answer["error"], answer
    unknown = ask(subscriber, "testpi", "self_destruct", {})
    assert unknown["status"] == "error"
    assert "unknown verb" in unknown["error"]
    odd = ask(subscriber, "testpi", "reload", b'{"transaction": {"nested": true}}')
    assert odd["status"] == "error"
    assert "transaction" in odd["error"]
    assert "transaction" not in odd

    # A flood (faster than requests are carried out) is dropped beyond the
    # queue and counted in the log; once it is past, the daemon answers again
    # (a request sent in the middle of it may have been dropped too).
    for number in range(300):
        subscriber.client.publish("edged/testpi/request/config",
                                  b'{"transaction": "flood-%d"}' % number, qos=0)
    daemon.wait_for_log("control.requests_dropped")
    assert until_answering(subscriber, "testpi")["status"] == "ok"
    flood = [m for m in responses(subscriber, "testpi") if b"flood-" in m.payload]
    assert 16 <= len(flood) < 300

    # Refused keys: each named with its reason; nothing changes.
    refused = ask(subscriber, "testpi", "config", {"options": {
        "stt": {"url": "ws://elsewhere.example/listen"}, "control.enabled": False,
        "audio": {"silent_after_s": -5, "device": "hw:9"}}})
    assert refused["status"] == "error"
    assert refused["error"] == "4 keys refused, nothing changed"
    reasons = {item["key"]: item["reason"] for item in refused["data"]["refused"]}
    assert reasons["stt.url"] == "never settable remotely"  # where the key and audio go
    assert reasons["audio.device"] == "not allowed (not in control.allowed_keys)"
    assert reasons["control.enabled"] == "never settable remotely"
    assert reasons["audio.silent_after_s"].startswith(
        "invalid: Input should be greater than or equal to 0")
    assert not (stack.home / "state" / "remote-config.json").exists()

    # A set: persisted, applied like SIGHUP, and what changed said.
    changed = ask(subscriber, "testpi", "config", {"options": {
        "audio": {"silent_after_s": 5}, "mqtt.partials": True}})
    assert changed["status"] == "ok", changed
    layer_source = f"remote ({stack.home / 'state' / 'remote-config.json'})"
    assert sorted(changed["data"]["changed"], key=lambda c: c["key"]) == [
        {"key": "audio.silent_after_s", "old": 60.0, "new": 5.0, "source": layer_source},
        {"key": "mqtt.partials", "old": False, "new": True, "source": layer_source}]
    assert sorted(changed["data"]["reload"]["changed"]) == ["audio", "mqtt"]
    daemon.wait_for_log("config.reloaded changed=audio,mqtt")
    assert json.loads((stack.home / "state" / "remote-config.json").read_text()) == {
        "audio": {"silent_after_s": 5}, "mqtt": {"partials": True}}

    # reload: like SIGHUP, says what changed (nothing, here).
    reload = ask(subscriber, "testpi", "reload", b"")
    assert reload == {"status": "ok", "data": {"changed": [], "needs_restart": []}}

    # A read-only state directory: an error naming the condition, nothing half-written.
    with read_only(stack.home / "state"):
        stuck = ask(subscriber, "testpi", "config", {"options": {"mqtt.partials": None}})
    assert stuck["status"] == "error"
    assert stuck["error"].startswith("storage read_only: cannot save remote-config.json")
    assert stuck["data"]["storage"] == "read_only"
    assert [p.name for p in (stack.home / "state").iterdir() if "remote" in p.name] == [
        "remote-config.json"]

    # null removes a key from the layer: back to the files' value.
    back = ask(subscriber, "testpi", "config", {"options": {"mqtt.partials": None}})
    assert back["status"] == "ok", back
    assert back["data"]["changed"] == [
        {"key": "mqtt.partials", "old": True, "new": False, "source": "default"}]
    assert ask(subscriber, "testpi", "health_check", {})["status"] == "ok"


def test_a_config_set_survives_a_restart_and_retained_requests_are_not_replayed(
        stack: Stack, mic: object, subscriber: Subscriber) -> None:
    daemon = stack.daemon(control=ON)
    until_answering(subscriber, "testpi")
    assert ask(subscriber, "testpi", "config", {"options": {"log_level": "debug"}})[
        "status"] == "ok"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    # A request left retained on the broker: replayed at the next connection,
    # it must not run again and again.
    subscriber.client.publish("edged/testpi/request/reload", b"{}", qos=1, retain=True)
    daemon = stack.daemon(control=ON)
    until_answering(subscriber, "testpi")
    daemon.wait_for_log("control.retained_request_ignored topic=edged/testpi/request/reload")
    subscriber.client.publish("edged/testpi/request/reload", b"", qos=1, retain=True)
    assert not [m for m in responses(subscriber, "testpi")
                if m.topic.endswith("/response/reload")]

    layer_source = f"remote ({stack.home / 'state' / 'remote-config.json'})"
    config = ask(subscriber, "testpi", "config", {})["data"]["config"]
    assert config["log_level"] == {"value": "debug", "source": layer_source}
    assert "level=DEBUG" in daemon.log or " DEBUG " in daemon.log
    line = next(line for line in check_config(stack.home / "edged.toml").splitlines()
                if line.startswith("log_level"))
    assert line.split("#")[1].strip() == layer_source

    # A layer damaged while the daemon was down: moved aside, startup goes on.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    (stack.home / "state" / "remote-config.json").write_bytes(b"\x00garbage{")
    daemon = stack.daemon(control=ON)
    until_answering(subscriber, "testpi")
    daemon.wait_for_log("storage.quarantined file=remote-config.json")
    assert not (stack.home / "state" / "remote-config.json").exists()
    assert [p for p in (stack.home / "state").iterdir()
            if p.name.startswith("remote-config.json.damaged-")]
    config = ask(subscriber, "testpi", "config", {})["data"]["config"]
    assert config["log_level"] == {"value": "info", "source": "default"}


@pytest.fixture
def second(tmp_path: Path, broker: Mosquitto, stt: SttDouble) -> Iterator[Stack]:
    """Another device on the same broker, with its own home and state."""
    with honest_stack(tmp_path / "home2", broker, stt.url) as setup:
        yield setup


def test_a_fleet_request_is_answered_by_each_device_on_its_own_topic(
        stack: Stack, second: Stack, mic: object, subscriber: Subscriber) -> None:
    stack.daemon(control=ON)
    second.microphone()
    second.daemon(control=ON, device={"id": "otherpi"})
    until_answering(subscriber, "testpi")
    until_answering(subscriber, "otherpi")
    subscriber.client.publish("edged/_fleet/request/health_check",
                              b'{"transaction": "everyone"}', qos=1)
    answers: dict[str, Any] = {}
    while len(answers) < 2:  # in whichever order they come
        message = subscriber.next()
        device = message.topic.split("/")[1]
        if message.topic.endswith("/response/health_check") and \
                message.json().get("transaction") == "everyone":
            answers[device] = message.json()
    assert {device: (a["transaction"], a["data"]["device"]) for device, a in answers.items()} \
        == {"testpi": ("everyone", "testpi"), "otherpi": ("everyone", "otherpi")}


def test_control_is_off_by_default_and_follows_reloads(
        stack: Stack, mic: object, subscriber: Subscriber) -> None:
    daemon = stack.daemon()
    daemon.wait_for_log("mqtt.connected")
    subscriber.client.publish("edged/testpi/request/health_check", b"", qos=1)
    subscriber.client.publish("edged/_fleet/request/health_check", b"", qos=1)
    assert_quiet(lambda: not responses(subscriber, "testpi"), 1.5,
                 "no answer while control is off")

    # On by a file edit and SIGHUP, together with an MQTT change that makes
    # the daemon a new client: control follows it there.
    stack.config(control=ON, mqtt={"keepalive_s": 20})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded changed=mqtt,control")
    until_answering(subscriber, "testpi")

    stack.config()  # off again
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("control.disabled")
    subscriber.sync()
    subscriber.pending()
    subscriber.client.publish("edged/testpi/request/health_check", b"", qos=1)
    seen = len(subscriber.seen)
    assert_quiet(lambda: not [m for m in subscriber.pending() + subscriber.seen[seen:]
                              if "/response/" in m.topic], 1.5,
                 "no answer once control is off again")
