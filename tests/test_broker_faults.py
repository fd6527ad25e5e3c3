"""A broker that takes everything and acknowledges nothing (through a proxy
that drops every PUBACK): transcripts wait in the outbox on disk, the daemon
stays up, stops in bounded time, and still says `offline` (its Last Will);
with a broker that acknowledges again, every transcript is delivered once,
with its own (stream_id, seq)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import Stack
from tests.support.broker import Subscriber, free_port
from tests.support.mic import FifoMic
from tests.support.mqtt_proxy import MqttProxy
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.support.waiting import wait_until
from tests.test_end_to_end import assert_matches_truth
from tests.test_metrics import scrape
from tests.test_restarts import Transcripts


def wait_for_state(port: int, want: Callable[[dict[str, Any]], bool],
                   timeout: float = 20.0) -> dict[str, Any]:
    """The first state (the retained one, then live ones) that satisfies `want`."""
    watcher = Subscriber(port, "edged/testpi/state")
    deadline = time.monotonic() + timeout
    try:
        while not want(state := watcher.next("edged/testpi/state",
                                             timeout=deadline - time.monotonic()).json()):
            pass
        return state
    finally:
        watcher.close()


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
        wait_until(lambda: heard.poll() or len(heard.by_key) == 3,
                   "three finals at the broker (that we never hear acknowledged)", timeout=10)
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
    wait_until(lambda: redelivered.poll() or len(redelivered.by_key) == 3,
               "the three finals again", timeout=20)
    redelivered.assert_no_late_deliveries(1.0)
    assert redelivered.by_key == heard.by_key, "the same transcripts, the same pairs"
    again.signal(signal.SIGTERM)
    assert again.wait(30) == 0


AVAILABILITY = "edged/testpi/availability"


def test_the_last_will_says_offline_when_the_daemon_is_killed(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    """SIGKILL: no goodbye from the daemon, and yet `offline`, from the broker."""
    daemon = stack.daemon()
    subscriber.next(AVAILABILITY, payload=b"online")
    daemon.expect(status=-signal.SIGKILL)
    daemon.signal(signal.SIGKILL)
    assert daemon.wait(10) == -signal.SIGKILL
    subscriber.next(AVAILABILITY, payload=b"offline", timeout=5)
    late = Subscriber(stack.broker.port, "edged/#")
    try:
        late.sync()
        retained = {m.topic: m for m in late.pending()}
        assert retained[AVAILABILITY].payload == b"offline"
        assert retained[AVAILABILITY].retain
    finally:
        late.close()
    assert "mqtt.disconnected" not in daemon.log, "it said nothing itself"


def test_a_broker_that_dies_mid_run_loses_no_queued_or_unacknowledged_final(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    """The broker is SIGKILLed with a final it took but never acknowledged;
    more finals come while it is dead. When it is back, every final arrives,
    the unacknowledged one again under its own (stream_id, seq)."""
    proxy = MqttProxy(stack.broker.port, drop_pubacks=True).start()
    try:
        daemon = stack.daemon(mqtt={"port": proxy.port})
        audio, truth = script([["alpha"]])
        offset = mic.play(audio)
        before = Transcripts(subscriber)
        wait_until(lambda: before.poll() or before.by_key, "alpha at the broker")
        subscriber.close()
        stack.broker.kill()  # alpha is in the daemon's outbox, unacknowledged
        more, more_truth = script([["bravo"], ["charlie", "delta"]])
        more_offset = mic.play(more)
        daemon.wait_for_log("transcript seq=3", timeout=30)  # all committed, broker dead
        proxy.drop_pubacks = False
        stack.broker.start()
        back = Subscriber(stack.broker.port, "edged/#")
        try:
            after = Transcripts(back)
            wait_until(lambda: after.poll() or len(after.by_key) == 3,
                       "three finals after the broker's return", timeout=60)
            after.assert_no_late_deliveries(1.0)
        finally:
            back.close()
        assert wait_for_state(stack.broker.port, lambda s: s["outbox_depth"] == 0)[
            "mqtt_connected"]
    finally:
        proxy.stop()
    ((stream, alpha_seq), alpha), = before.by_key.items()
    assert alpha_seq == 1
    assert sorted(after.by_key) == [(stream, seq) for seq in (1, 2, 3)]
    assert after.by_key[(stream, 1)] == alpha, "alpha again, under its own pair"
    finals = [after.by_key[(stream, seq)] for seq in (1, 2, 3)]
    assert_matches_truth(finals[:1], truth, offset, mic)
    assert_matches_truth(finals[1:], more_truth, more_offset, mic)
    assert after.deliveries == 3, "each once after the return"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def test_a_broker_that_never_acknowledges_holds_at_most_20_transcripts_at_once(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """Hundreds of finals and not one PUBACK: the broker is offered at most the
    window of 20 (memory stays flat), the rest wait in the outbox on disk."""
    port = free_port()
    stt.faults.finals_per_frame = 8  # 32 finals a second
    proxy = MqttProxy(stack.broker.port, drop_pubacks=True).start()
    try:
        daemon = stack.daemon(mqtt={"port": proxy.port, "drain_timeout_s": 1.0},
                              metrics={"enabled": True, "port": port})
        daemon.wait_for_log("transcript seq=150", timeout=30)
        at_the_broker = Transcripts(subscriber)
        at_the_broker.assert_no_late_deliveries(1.0)  # nothing more is offered
        assert 0 < len(at_the_broker.by_key) <= 20
        depth = wait_until(lambda: scrape(port)["edged_outbox_depth"] >= 150 and
                           scrape(port)["edged_outbox_depth"], "150 transcripts queued")
        stopped_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert time.monotonic() - stopped_at < 10, "a silent broker does not hold up a stop"
    finally:
        proxy.stop()
    kept = re.search(r"mqtt\.unpublished items=(\d+) kept_in_outbox=true", daemon.log)
    assert kept, daemon.log
    assert int(kept.group(1)) >= depth, "all of them are kept for the next start"
