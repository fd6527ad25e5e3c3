"""A broker that takes everything and acknowledges nothing (through a proxy
that drops every PUBACK): transcripts wait in the outbox on disk, the daemon
stays up, stops in bounded time, and still says `offline` (its Last Will);
with a broker that acknowledges again, every transcript is delivered once,
with its own (stream_id, seq)."""

from __future__ import annotations

import signal
import time

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.mqtt_proxy import MqttProxy
from tests.support.tonespeech import script
from tests.test_restarts import Transcripts


def test_a_broker_that_never_acknowledges_loses_nothing_and_hears_offline(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    proxy = MqttProxy(stack.broker.port, drop_pubacks=True).start()
    try:
        daemon = stack.daemon(mqtt={"port": proxy.port, "drain_timeout_s": 1.0})
        audio, _ = script([["alpha"], ["bravo", "charlie"], ["delta"]])
        mic.play(audio)
        daemon.wait_for_log("transcript seq=3")
        heard = Transcripts(subscriber)
        deadline = time.monotonic() + 10
        while len(heard.by_key) < 3:  # the broker got them; we never hear so
            assert time.monotonic() < deadline, heard.by_key
            time.sleep(0.05)
            heard.poll()
        assert proxy.pubacks_dropped >= 3
        stopped_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert time.monotonic() - stopped_at < 10, "a silent broker does not hold up a stop"
        assert "mqtt.unpublished items=3 kept_in_outbox=true" in daemon.log
        late = Subscriber(stack.broker.port, "edged/testpi/availability")
        try:
            assert late.next("edged/testpi/availability", timeout=10).payload == b"offline"
        finally:
            late.close()
    finally:
        proxy.stop()

    again = stack.daemon()  # straight to the broker: PUBACKs come back
    redelivered = Transcripts(subscriber)
    deadline = time.monotonic() + 20
    while len(redelivered.by_key) < 3:
        assert time.monotonic() < deadline, redelivered.by_key
        time.sleep(0.05)
        redelivered.poll()
    assert redelivered.by_key == heard.by_key, "the same transcripts, the same pairs"
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0
