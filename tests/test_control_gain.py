"""Home Assistant's gain number, end to end: a real mosquitto and daemon.

The number entity exists only while fleet control is on and may set
`audio.gain_db`; a value on its command topic is set through the remote
`config` path (validated, kept in the remote layer, applied by a reload)
and comes back in the audio report, which is the entity's state. Garbage
and values out of range change nothing.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.waiting import wait_until
from tests.test_control import check_config

NUMBER = "homeassistant/number/edged_testpi/gain/config"
AUDIO = "edged/testpi/audio"
FAST = {"device": "testmic", "chunk_ms": 100, "level_interval_s": 1.0}


def retained(stack: Stack, topic: str) -> bytes | None:
    """The broker's retained copy on `topic` (None when there is none)."""
    late = Subscriber(stack.broker.port, topic.rsplit("/", 1)[0] + "/#")
    try:
        late.sync()
        found = [m for m in late.pending() if m.topic == topic and m.retain]
    finally:
        late.close()
    return found[-1].payload if found else None


def reported_gain(subscriber: Subscriber, gain: float) -> dict[str, Any]:
    def report() -> dict[str, Any] | None:
        try:
            message = subscriber.next(AUDIO, timeout=0.5).json()
        except TimeoutError:
            return None
        return message if message.get("gain_db") == gain else None
    return wait_until(report, f"an audio report with gain_db={gain}", timeout=20)


def test_the_gain_number_sets_audio_gain_through_fleet_control(
        stack: Stack, mic: object, subscriber: Subscriber) -> None:
    daemon = stack.daemon(audio=FAST, control={"enabled": True})
    daemon.wait_for_log("control.enabled")
    config = wait_until(lambda: retained(stack, NUMBER), "the gain number's discovery config")
    number = json.loads(config)
    assert (number["command_topic"], number["state_topic"]) == ("edged/testpi/gain/set", AUDIO)
    assert (number["min"], number["max"]) == (-20.0, 30.0)  # audio.gain_db's own range
    reported_gain(subscriber, 0.0)

    subscriber.client.publish("edged/testpi/gain/set", b"12", qos=1)
    reported_gain(subscriber, 12.0)
    daemon.wait_for_log("config.reloaded changed=audio")
    shown = check_config(stack.home / "edged.toml")
    gain_line = next(line for line in shown.splitlines() if "audio.gain_db" in line)
    assert "12.0" in gain_line, gain_line
    assert "remote (" in gain_line, gain_line

    # Garbage and a value out of range: refused, said, nothing changes.
    for payload in (b"loud", b"nan", b"99", b"\xff\xfe", b"1" * 100):
        subscriber.client.publish("edged/testpi/gain/set", payload, qos=1)
    daemon.wait_for_log("control.gain_refused value=99.0")
    subscriber.client.publish("edged/testpi/gain/set", b"-6", qos=1)  # still listening
    reported_gain(subscriber, -6.0)
    assert daemon.log.count("control.gain_refused") == 5

    # Control off: the number goes away (an empty retained config), the
    # command topic is no longer heard.
    stack.config(audio=FAST)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("control.disabled")
    wait_until(lambda: retained(stack, NUMBER) is None, "the gain number removed")
