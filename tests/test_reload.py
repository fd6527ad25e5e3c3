"""SIGHUP: a new configuration applied to a running daemon, nothing lost;
a bad one refused, the old one kept."""

from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import API_KEY, Stack
from tests.support.broker import Subscriber, free_port
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_end_to_end import (
    assert_captured_at,
    assert_matches_truth,
    assert_no_late_transcripts,
    collect_finals,
)

NEW_KEY = "test-key-rotated-456"


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


def test_reload_mid_utterance_with_finals_queued_loses_and_repeats_nothing(
    stack: Stack, stt: SttDouble, mic: FifoMic
) -> None:
    """Two finals wait in the outbox (the broker is not where the configuration
    says), and SIGHUP comes in the middle of a word of a third utterance, moving
    MQTT to the real broker and changing the STT request: all three arrive,
    once each, in order, with true times."""
    daemon = stack.daemon(mqtt={"port": free_port()})  # nobody there: finals queue
    audio, truth = script([["alpha"], ["bravo", "charlie"], ["delta", "echo"]])
    offset = mic.play(audio)
    daemon.wait_for_log("transcript seq=2")
    assert "mqtt.connected" not in daemon.log
    stack.config(stt={"params": {"language": "de"}})  # and the broker's real port
    mic.wait_read(offset + truth[2][0].start + 0.15)  # half-way through "delta"
    subscriber = Subscriber(stack.broker.port, "edged/#")
    try:
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("config.reloaded changed=stt,mqtt")
        finals = collect_finals(subscriber, 3)
        assert_no_late_transcripts(subscriber)
    finally:
        subscriber.close()
    assert_matches_truth(finals, truth, offset, mic)
    assert [final["seq"] for final in finals] == [1, 2, 3]
    assert len(stt.sessions) == 2
    assert stt.sessions[1].query.get("language") == ["de"]


def test_a_reload_with_a_new_api_key_reconnects_at_once_and_loses_nothing(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """The service stops taking the old key: 401, auth_failed, the next try a
    minute away. A reload with the new key connects at once, and what was
    said meanwhile is transcribed, stamped with when it was said."""
    key_file = stack.home / "api_key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    daemon = stack.daemon(api_key=None, stt={"api_key_file": str(key_file)})
    daemon.wait_for_log("stt.connected")
    stt.api_key = NEW_KEY  # rotated at the service
    stt.abort_connections()
    daemon.wait_for_log("stt.auth_failed retry_in=60s")
    audio, truth = script([["foxtrot", "golf"]])
    offset = mic.play(audio)
    mic.wait_read(offset + truth[0][-1].end + 0.5)  # said while no key works
    key_file.write_text(NEW_KEY + "\n")
    reloaded_at = time.monotonic()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("stt.connected session=2", timeout=10)

    assert stt.sessions[1].opened_at - reloaded_at < 2.0, "at once, not a minute later"
    assert stt.refused == 1, "one refusal, no retry before the new key"
    assert_matches_truth(collect_finals(subscriber, 1), truth, offset, mic)
    assert stt.sessions[1].api_key == NEW_KEY
    assert NEW_KEY not in daemon.log
    assert API_KEY not in daemon.log


def test_a_reload_with_a_new_microphone_keeps_the_audio_already_captured(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """The reload comes right after the last word of an utterance on the old
    microphone, before the service has ended it: that utterance still arrives
    whole, and the next one comes from the new microphone."""
    other = stack.microphone("othermic")
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    audio, truth = script([["hotel", "alpha"]])
    offset = mic.play(audio)
    mic.wait_read(offset + truth[0][-1].end)
    stack.config(audio={"device": "othermic"})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded changed=audio")
    daemon.wait_for_log("capture.open device=othermic")
    later, later_truth = script([["bravo", "delta"]])
    other_offset = other.play(later)

    first, second = collect_finals(subscriber, 2)
    assert_matches_truth([first], truth, offset, mic)
    assert_captured_at([second], later_truth, other_offset, other)
    assert [w["text"] for w in second["words"]] == ["bravo", "delta"]
    spoken = [w.end - w.start for w in later_truth[0]]
    heard = [w["end"] - w["start"] for w in second["words"]]
    assert heard == pytest.approx(spoken, abs=0.05)
    assert second["start"] > first["end"], "stream time goes on"
    assert (first["seq"], second["seq"]) == (1, 2)
