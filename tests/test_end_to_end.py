"""The whole data path with real parts: FIFO mic -> ALSA -> edged -> WebSocket -> MQTT."""

from __future__ import annotations

import signal

from tests.conftest import API_KEY, Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import SpokenWord, script, words_of

TOLERANCE_S = 0.05
TOPIC = "edged/testpi/transcript"

SEQUENCE = [
    ["alpha", "bravo", "charlie"],
    ["delta"],
    ["echo", "foxtrot", "golf", "hotel"],
    ["bravo", "bravo"],  # the same word twice is two words, not a duplicate
]


def collect_finals(subscriber: Subscriber, count: int, timeout: float = 30.0) -> list[dict]:
    return [subscriber.next(TOPIC, timeout=timeout).json() for _ in range(count)]


def assert_matches_truth(finals: list[dict], truth: list[list[SpokenWord]], offset: float) -> None:
    heard = [word for final in finals for word in final["words"]]
    spoken = words_of(truth)
    assert [w["text"] for w in heard] == [w.text for w in spoken]
    for got, want in zip(heard, spoken, strict=True):
        assert abs(got["start"] - (want.start + offset)) <= TOLERANCE_S, (got, want, offset)
        assert abs(got["end"] - (want.end + offset)) <= TOLERANCE_S, (got, want, offset)
    for final, utterance in zip(finals, truth, strict=True):
        assert abs(final["start"] - (utterance[0].start + offset)) <= TOLERANCE_S
        assert abs(final["end"] - (utterance[-1].end + offset)) <= TOLERANCE_S


def test_spoken_sequence_arrives_once_in_order_with_true_times(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    assert subscriber.next("edged/testpi/availability").payload == b"online"
    audio, truth = script(SEQUENCE)
    offset = mic.play(audio)

    finals = collect_finals(subscriber, len(SEQUENCE))

    assert_matches_truth(finals, truth, offset)
    seqs = [final["seq"] for final in finals]
    assert seqs == list(range(seqs[0], seqs[0] + len(SEQUENCE)))
    for final in finals:
        assert final["device"] == "testpi"
        assert final["provider"] == "deepgram"
        assert final["time"].endswith("Z")
        assert final["text"]
    assert stt.sessions[0].api_key == API_KEY
    assert stt.sessions[0].query["provider"] == ["deepgram"]
    sizes = stt.sessions[0].frame_sizes
    assert min(sizes) >= 3200, "frames must be at least 100 ms"
    assert max(sizes) <= 8000, "frames must be at most 250 ms"

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert subscriber.next("edged/testpi/availability", payload=b"offline", timeout=5)
    extra = [m for m in subscriber.seen + _drain(subscriber) if m.topic == TOPIC]
    assert len(extra) == len(SEQUENCE), "no final may be published twice"
    assert stt.sessions[-1].close_stream_received
    spooled = list((stack.home / "state").glob("spool/*.spool"))
    assert not spooled, "no audio may touch the disk while streaming normally"


def _drain(subscriber: Subscriber) -> list:
    drained = []
    while not subscriber.messages.empty():
        drained.append(subscriber.messages.get_nowait())
    return drained


def test_sigterm_mid_utterance_flushes_last_final_before_offline(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    subscriber.next("edged/testpi/availability", payload=b"online")
    audio, truth = script([["golf", "hotel"]], pause_s=0.0)  # no pause: the service has not
    offset = mic.play(audio)  # endpointed yet when SIGTERM comes
    mic.wait_idle()
    daemon.wait_for_log("stt.connected")
    import time
    time.sleep(0.3)  # the last period reaches the daemon
    daemon.signal(signal.SIGTERM)

    final = subscriber.next(TOPIC, timeout=15).json()
    assert_matches_truth([final], truth, offset)
    assert subscriber.next("edged/testpi/availability", payload=b"offline", timeout=10)
    assert daemon.wait(20) == 0


def test_lost_connection_resends_from_last_final_without_loss_or_duplicates(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    # Drop the first session abruptly in the middle of the third utterance.
    stt.faults.drop_after_bytes = [int(32000 * 3.3)]
    stack.daemon()
    subscriber.next("edged/testpi/availability", payload=b"online")
    audio, truth = script(SEQUENCE)
    offset = mic.play(audio)

    finals = collect_finals(subscriber, len(SEQUENCE), timeout=40)

    assert len(stt.sessions) >= 2, "the drop must have forced a reconnect"
    assert_matches_truth(finals, truth, offset)
    assert stt.sessions[1].api_key == API_KEY
    assert stt.sessions[1].query == stt.sessions[0].query
