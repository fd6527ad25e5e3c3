"""The publisher's subscriptions: what fleet control listens with.

A real mosquitto; the publisher in this process. Handlers run on the asyncio
loop, see whether a message was a retained copy, never see an oversized
payload, and keep hearing after the broker restarts.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import paho.mqtt.publish as publish

from edged.config import Settings, load_config
from edged.mqtt.publisher import MAX_INCOMING_BYTES, Message, MqttPublisher
from edged.outbox import Outbox
from tests.support.broker import Mosquitto

TOPIC = "edged/subpi/request/health_check"


def settings(broker: Mosquitto, state_dir: Path) -> Settings:
    return load_config([], environ={}, flags={
        "device.id": "subpi", "mqtt.port": broker.port, "mqtt.discovery": False,
        "state_dir": str(state_dir),
    }).settings


def publish_once(broker: Mosquitto, topic: str, payload: bytes) -> None:
    publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=broker.port)


def publish_retained(broker: Mosquitto, topic: str, payload: bytes) -> None:
    publish.single(topic, payload, qos=1, retain=True, hostname="127.0.0.1", port=broker.port)


async def heard(inbox: asyncio.Queue[tuple[Message, bool]], within_s: float = 10) -> Message:
    message, on_loop = await asyncio.wait_for(inbox.get(), within_s)
    assert on_loop, "a handler ran off the event loop's thread"
    return message


def test_a_handler_hears_its_topic_on_the_loop_again_after_a_broker_restart(
        broker: Mosquitto, tmp_path: Path) -> None:
    async def scenario() -> None:
        loop_thread = threading.get_ident()
        inbox: asyncio.Queue[tuple[Message, bool]] = asyncio.Queue()
        publisher = MqttPublisher(settings(broker, tmp_path), Outbox(tmp_path / "o.sqlite3"),
                                  asyncio.get_running_loop())
        publisher.subscribe("edged/subpi/request/+",
                            lambda m: inbox.put_nowait((m, threading.get_ident() == loop_thread)))
        publish_retained(broker, TOPIC, b"left from before")
        publisher.start()
        try:
            retained = await heard(inbox)
            assert (retained.topic, retained.payload, retained.retained) == (
                TOPIC, b"left from before", True)
            publish_retained(broker, TOPIC, b"")  # clear it (subscribers hear that too)
            assert (await heard(inbox)).payload == b""

            publish_once(broker, "edged/subpi/request/reload", b"x" * (MAX_INCOMING_BYTES + 1))
            publish_once(broker, "edged/otherpi/request/reload", b"not ours")
            publish_once(broker, "edged/subpi/request/reload", b"{}")
            live = await heard(inbox)  # the oversized one and the other device's never came
            assert (live.topic, live.payload, live.retained) == (
                "edged/subpi/request/reload", b"{}", False)

            broker.stop()
            broker.start()
            await asyncio.wait_for(_until(lambda: publisher.connected and publisher.connects == 2),
                                   60)
            # Subscribed again by the new connection (a clean session lost the old one).
            for _ in range(50):
                publish_once(broker, TOPIC, b"after the restart")
                try:
                    again = await heard(inbox, within_s=0.2)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("nothing heard after the broker restarted")
            assert (again.payload, again.retained) == (b"after the restart", False)
        finally:
            await publisher.stop(within_s=1.0)

    asyncio.run(scenario())


async def _until(condition: object) -> None:
    assert callable(condition)
    while not condition():  # noqa: ASYNC110 - the publisher's state, set from paho's thread
        await asyncio.sleep(0.05)


async def heard_after_publishing(broker: Mosquitto, inbox: asyncio.Queue[tuple[Message, bool]],
                                 topic: str, payload: bytes) -> Message:
    """Publish until heard: a SUBSCRIBE just sent may not be granted yet."""
    for _ in range(50):
        publish_once(broker, topic, payload)
        try:
            return await heard(inbox, within_s=0.2)
        except TimeoutError:
            continue
    raise AssertionError(f"nothing heard on {topic}")


def test_a_filter_added_while_the_connection_is_being_announced_is_subscribed(
        broker: Mosquitto, tmp_path: Path) -> None:
    async def scenario() -> None:
        inbox: asyncio.Queue[tuple[Message, bool]] = asyncio.Queue()
        publisher = MqttPublisher(settings(broker, tmp_path), Outbox(tmp_path / "o.sqlite3"),
                                  asyncio.get_running_loop())
        announced = threading.Event()
        on_connect = publisher._client.on_connect

        def traced(*args: Any) -> None:
            on_connect(*args)  # the real one: its snapshot of the filters is taken
            announced.set()

        publisher._client.on_connect = traced
        publisher.start()
        try:
            # The loop is held here, so the publisher's `_connected` (queued by
            # paho's thread) has not run: the window a reload's filter can fall into.
            assert announced.wait(10), "no connection"
            assert not publisher.connected
            publisher.subscribe(TOPIC, lambda m: inbox.put_nowait((m, True)))
            message = await heard_after_publishing(broker, inbox, TOPIC, b"late filter")
            assert message.payload == b"late filter"
        finally:
            await publisher.stop(within_s=1.0)

    asyncio.run(scenario())


def test_a_topic_that_is_not_utf8_is_dropped_and_messages_still_flow(
        broker: Mosquitto, tmp_path: Path) -> None:
    async def scenario() -> None:
        inbox: asyncio.Queue[tuple[Message, bool]] = asyncio.Queue()
        publisher = MqttPublisher(settings(broker, tmp_path), Outbox(tmp_path / "o.sqlite3"),
                                  asyncio.get_running_loop())
        publisher.subscribe("edged/subpi/request/+", lambda m: inbox.put_nowait((m, True)))
        publisher.start()
        try:
            await asyncio.wait_for(_until(lambda: publisher.connected), 10)
            # mosquitto refuses such topics; a laxer broker would hand this to paho.
            bad = paho.MQTTMessage(topic=b"edged/subpi/request/\xff\xfe")
            bad.payload = b"{}"
            publisher._on_message(publisher._client, None, bad)  # must not raise
            publisher._on_message(publisher._client, None, bad)
            message = await heard_after_publishing(broker, inbox, TOPIC, b"still here")
            assert message.payload == b"still here"
        finally:
            await publisher.stop(within_s=1.0)

    asyncio.run(scenario())
