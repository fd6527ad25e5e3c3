"""The PUBACK-dropping MQTT proxy, against a real mosquitto and real paho clients."""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Mosquitto, Subscriber
from tests.support.mqtt_proxy import PUBACK, MalformedPacket, MqttProxy, split_packets


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[MqttProxy]:
    server = MqttProxy(broker.port, drop_pubacks=True).start()
    yield server
    server.stop()


class Publisher:
    """A paho client whose acknowledged message ids arrive in a queue."""

    def __init__(self, port: int, protocol: int):
        self.acknowledged: queue.Queue[int] = queue.Queue()
        connected: queue.Queue[bool] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}",
                                  protocol=protocol)
        self.client.on_connect = lambda c, u, f, rc, p: connected.put(not rc.is_failure)
        self.client.on_publish = lambda c, u, mid, rc, p: self.acknowledged.put(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.get(timeout=10), "the broker refused the connection"

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == paho.MQTT_ERR_SUCCESS
        return info.mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.01)


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["3.1.1", "5"])
def test_pubacks_are_dropped_until_switched_off(broker: Mosquitto, proxy: MqttProxy,
                                                protocol: int) -> None:
    # The subscriber goes through the proxy too, so PUBLISH packets of every
    # size cross the packet-cutting direction; the large one spans many reads
    # and a 3-byte remaining length.
    subscriber = Subscriber(proxy.port, "proxy/#")
    publisher = Publisher(proxy.port, protocol)
    try:
        rng = random.Random(7)
        payloads = [rng.randbytes(size)
                    for size in (0, 1, 126, 127, 128, 16_383, 16_384, 300_000)]
        unacknowledged = [publisher.publish(f"proxy/{i}", p) for i, p in enumerate(payloads)]
        for index, payload in enumerate(payloads):
            message = subscriber.next(f"proxy/{index}", timeout=10)
            assert message.payload == payload, f"payload {index} changed on the way"
        # The broker acknowledged each; the proxy swallowed each acknowledgement.
        wait_until(lambda: proxy.pubacks_dropped == len(payloads), "PUBACKs reaching the proxy")
        assert publisher.acknowledged.empty(), "a PUBACK got through while dropping"
        assert proxy.to_client[PUBACK] == 0

        proxy.drop_pubacks = False
        acknowledged = [publisher.publish("proxy/after", b"%d" % i) for i in range(3)]
        got = {publisher.acknowledged.get(timeout=10) for _ in acknowledged}
        assert got == set(acknowledged)
        for i in range(3):
            subscriber.next("proxy/after", payload=b"%d" % i, timeout=10)
        assert publisher.acknowledged.empty()
        assert not set(unacknowledged) & got, "a dropped PUBACK came back"
        assert proxy.pubacks_dropped == len(payloads)
        assert proxy.to_client[PUBACK] == 3
    finally:
        publisher.close()
        subscriber.close()


def test_cutting_packets_however_the_reads_split_them() -> None:
    def packet(kind: int, body: bytes) -> bytes:
        length, remaining = bytearray(), len(body)
        while True:
            byte, remaining = remaining % 128, remaining // 128
            length.append(byte | (0x80 if remaining else 0))
            if not remaining:
                return bytes([kind << 4 | 2]) + bytes(length) + body

    packets = [packet(4, b"\x00\x01"), packet(3, b"x" * 200), packet(13, b""),
               packet(3, b"y" * 2_097_152), packet(4, b"\x00\x02\x10")]
    stream = b"".join(packets)
    rng = random.Random(3)
    for _ in range(20):
        buffer, got, offset = bytearray(), [], 0
        while offset < len(stream):
            size = rng.choice((1, 2, 3, 7, 4096, 100_000))
            buffer += stream[offset:offset + size]
            offset += size
            got += split_packets(buffer)
        assert got == packets
        assert not buffer


def test_a_remaining_length_longer_than_four_bytes_is_refused() -> None:
    with pytest.raises(MalformedPacket):
        split_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))
