"""SIGHUP: a new configuration applied to a running daemon, nothing lost;
a bad one refused, the old one kept."""

from __future__ import annotations

import signal

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_end_to_end import assert_matches_truth


def test_reload_moves_topics_and_stt_params_without_losing_words(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    audio, truth = script([["alpha", "bravo"]])
    offset = mic.play(audio)
    before = subscriber.next("edged/testpi/transcript").json()
    assert_matches_truth([before], truth, offset)

    house = Subscriber(stack.broker.port, "house/#")
    stack.config(mqtt={"base_topic": "house"}, stt={"params": {"language": "de"}})
    audio, truth = script([["charlie"], ["delta", "echo"]])
    offset = mic.play(audio)  # speech goes on while the daemon reloads
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded")

    try:
        after = [house.next("house/testpi/transcript", timeout=30).json() for _ in range(2)]
    finally:
        house.close()
    assert_matches_truth(after, truth, offset)
    assert after[0]["seq"] == before["seq"] + 1, "seq goes on: nothing lost, nothing twice"
    assert stt.sessions[-1].query.get("language") == ["de"]
    assert subscriber.next("edged/testpi/availability", payload=b"offline", timeout=5)
    assert not [m for m in subscriber.seen if m.topic == "edged/testpi/transcript"][1:]


def test_bad_configuration_on_reload_is_refused_and_the_old_one_kept(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    stack.config(mqtt={"port": 99999})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reload_refused")
    assert "mqtt.port" in daemon.log
    audio, truth = script([["foxtrot"]])
    offset = mic.play(audio)
    final = subscriber.next("edged/testpi/transcript", timeout=20).json()
    assert_matches_truth([final], truth, offset)
    assert daemon.process is not None
    assert daemon.process.poll() is None
