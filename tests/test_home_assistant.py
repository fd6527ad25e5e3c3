"""Home Assistant discovery, Rhasspy Hermes and partials, against a real broker."""

from __future__ import annotations

import json
import signal
import time

import paho.mqtt.publish as publish

from tests.conftest import Stack
from tests.support.broker import Message, Subscriber
from tests.support.mic import FifoMic
from tests.support.tonespeech import script

ENTITIES = 12
EDGED_TOPICS = {
    "edged/testpi/transcript", "edged/testpi/state", "edged/testpi/availability",
    "edged/testpi/audio",
}


def collect(subscriber: Subscriber, count: int, topic_prefix: str,
            timeout: float = 20.0) -> dict[str, Message]:
    found: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while len(found) < count:
        message = subscriber.next(timeout=max(deadline - time.monotonic(), 0.1))
        if message.topic.startswith(topic_prefix):
            found[message.topic] = message
    return found


def test_discovery_configs_point_at_edged_topics_and_follow_the_birth_message(
    stack: Stack, mic: FifoMic
) -> None:
    daemon = stack.daemon(device={"name": "Kitchen mic", "area": "Kitchen"})
    daemon.wait_for_log("mqtt.discovery_announced")
    ha = Subscriber(stack.broker.port, "homeassistant/#")  # a late joiner: retained configs
    try:
        configs = collect(ha, ENTITIES, "homeassistant/")
        by_object = {topic.split("/")[-2]: json.loads(m.payload) for topic, m in configs.items()}
        assert all(m.retain for m in configs.values())
        for name, config in by_object.items():
            referenced = {config[key] for key in ("state_topic", "json_attributes_topic",
                                                   "availability_topic") if key in config}
            assert referenced <= EDGED_TOPICS, (name, referenced)
            assert config["availability_topic"] == "edged/testpi/availability"
            assert config["unique_id"].startswith("edged_testpi_")
            assert config["device"]["identifiers"] == ["edged_testpi"]
            assert config["device"]["suggested_area"] == "Kitchen"
            assert config["device"]["name"] == "Kitchen mic"
        assert "homeassistant/sensor/edged_testpi/transcript/config" in configs
        assert "homeassistant/event/edged_testpi/speech/config" in configs
        assert by_object["stt"]["device_class"] == "connectivity"
        for problem in ("microphone", "storage"):
            assert by_object[problem]["device_class"] == "problem"
            assert by_object[problem]["state_topic"] == "edged/testpi/state"
        for level in ("sound_level", "peak_level"):
            config = by_object[level]
            # dBFS is no sound pressure (dB SPL): no device class to mislabel it.
            assert "device_class" not in config
            assert (config["unit_of_measurement"], config["state_class"]) == ("dBFS",
                                                                               "measurement")
            assert config["state_topic"] == "edged/testpi/audio"
        assert by_object["clipping"]["unit_of_measurement"] == "%"

        publish.single("homeassistant/status", "online", hostname="127.0.0.1",
                       port=stack.broker.port)
        again = collect(ha, ENTITIES, "homeassistant/")  # re-announced, live this time
        assert not any(m.retain for m in again.values())
    finally:
        ha.close()

    stack.config(mqtt={"discovery": False})
    removed = Subscriber(stack.broker.port, "homeassistant/#")
    try:
        collect(removed, ENTITIES, "homeassistant/")  # the retained configs, still there
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("config.reloaded")
        emptied = collect(removed, ENTITIES, "homeassistant/")
        assert all(m.payload == b"" and m.retain is False for m in emptied.values())
    finally:
        removed.close()
    late = Subscriber(stack.broker.port, "homeassistant/#")
    try:
        late.sync()  # every retained config would have come before our own marker
        assert not late.pending(), "no entity may stay behind once discovery is off"
    finally:
        late.close()


def test_hermes_and_partials_when_asked(stack: Stack, mic: FifoMic) -> None:
    watcher = Subscriber(stack.broker.port, "#")
    try:
        stack.daemon(mqtt={"hermes": True, "partials": True})
        audio, _ = script([["echo", "golf", "hotel"]])
        mic.play(audio)
        hermes = watcher.next("hermes/asr/textCaptured", timeout=20).json()
        assert hermes["siteId"] == "testpi"
        assert hermes["text"] == "Echo golf hotel."
        assert [t["value"] for t in hermes["asrTokens"][0]] == ["echo", "golf", "hotel"]
        partials = [m for m in watcher.seen if m.topic == "edged/testpi/partial"]
        assert partials, "partials were asked for"
        assert all(json.loads(m.payload)["text"] for m in partials)
    finally:
        watcher.close()


def test_partials_are_off_by_default(stack: Stack, mic: FifoMic, subscriber: Subscriber) -> None:
    stack.daemon()
    audio, _ = script([["alpha", "bravo"]])
    mic.play(audio)
    subscriber.next("edged/testpi/transcript", timeout=20)
    assert not [m for m in subscriber.seen if m.topic.endswith("/partial")]
