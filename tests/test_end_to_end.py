"""The whole data path with real parts: FIFO mic -> ALSA -> edged -> WebSocket -> MQTT."""

from __future__ import annotations

import signal
from datetime import datetime

import pytest

from tests.conftest import API_KEY, Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import SpokenWord, script, words_of
from tests.support.waiting import assert_quiet

TOLERANCE_S = 0.05
# `time` is the wall clock at which `start` was captured: the microphone knows
# when it wrote that audio; capture hands periods over in batches of ~0.3 s.
TIME_TOLERANCE_S = 0.5
TOPIC = "edged/testpi/transcript"

SEQUENCE = [
    ["alpha", "bravo", "charlie"],
    ["delta"],
    ["echo", "foxtrot", "golf", "hotel"],
    ["bravo", "bravo"],  # the same word twice is two words, not a duplicate
]


def collect_finals(subscriber: Subscriber, count: int, timeout: float = 30.0) -> list[dict]:
    return [subscriber.next(TOPIC, timeout=timeout).json() for _ in range(count)]


def assert_matches_truth(finals: list[dict], truth: list[list[SpokenWord]], offset: float,
                         mic: FifoMic | None = None) -> None:
    """Words and stream times as spoken; with `mic`, also each final's `time`
    (see assert_captured_at)."""
    if mic is not None:
        assert_captured_at(finals, truth, offset, mic)
    heard = [word for final in finals for word in final["words"]]
    spoken = words_of(truth)
    assert [w["text"] for w in heard] == [w.text for w in spoken]
    for got, want in zip(heard, spoken, strict=True):
        assert abs(got["start"] - (want.start + offset)) <= TOLERANCE_S, (got, want, offset)
        assert abs(got["end"] - (want.end + offset)) <= TOLERANCE_S, (got, want, offset)
    for final, utterance in zip(finals, truth, strict=True):
        assert abs(final["start"] - (utterance[0].start + offset)) <= TOLERANCE_S
        assert abs(final["end"] - (utterance[-1].end + offset)) <= TOLERANCE_S


def assert_captured_at(finals: list[dict], truth: list[list[SpokenWord]], offset: float,
                       mic: FifoMic, tolerance: float = TIME_TOLERANCE_S) -> None:
    """Each final's `time` is the wall clock at which its first word was written
    to the microphone (`offset` is where the script starts in the microphone's
    own stream time), within `tolerance`; also after a replay."""
    for final, utterance in zip(finals, truth, strict=True):
        spoken_at = mic.wall_time(offset + utterance[0].start)
        stamped = datetime.fromisoformat(final["time"]).timestamp()
        assert final["time"].endswith("Z")
        assert abs(stamped - spoken_at) <= tolerance, (
            f"{final['text']!r} stamped {final['time']}, spoken "
            f"{datetime.fromtimestamp(spoken_at).astimezone().isoformat()} "
            f"({stamped - spoken_at:+.2f} s)")


def assert_no_late_transcripts(subscriber: Subscriber, for_s: float = 1.5) -> None:
    """A quiet period: no transcript arrives for `for_s` seconds (a late
    duplicate would have by then)."""
    def none_yet() -> bool:
        late = [m for m in subscriber.pending() if m.topic == TOPIC]
        assert not late, f"a late transcript: {late[0].payload[:120]!r}"
        return True

    assert_quiet(none_yet, for_s, "no late transcript")


def test_spoken_sequence_arrives_once_in_order_with_true_times(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon()
    assert subscriber.next("edged/testpi/availability").payload == b"online"
    audio, truth = script(SEQUENCE)
    offset = mic.play(audio)

    finals = collect_finals(subscriber, len(SEQUENCE))

    assert_matches_truth(finals, truth, offset, mic)
    assert [final["seq"] for final in finals] == [1, 2, 3, 4], "a new outbox counts from 1"
    assert len({final["stream_id"] for final in finals}) == 1
    for final in finals:
        assert final["device"] == "testpi"
        assert final["provider"] == "deepgram"
        assert final["text"]
    assert len(stt.sessions) == 1
    assert stt.sessions[0].api_key == API_KEY
    assert stt.sessions[0].query["provider"] == ["deepgram"]
    sizes = stt.sessions[0].frame_sizes
    assert min(sizes) >= 3200, "frames must be at least 100 ms"
    assert max(sizes) <= 8000, "frames must be at most 250 ms"

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert subscriber.next("edged/testpi/availability", payload=b"offline", timeout=5)
    subscriber.pending()
    published = [m for m in subscriber.seen if m.topic == TOPIC]
    assert len(published) == len(SEQUENCE), "no final may be published twice"
    assert stt.sessions[-1].close_stream_received
    spooled = list((stack.home / "state").glob("spool/*.spool"))
    assert not spooled, "no audio may touch the disk while streaming normally"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_mid_utterance_flushes_the_last_final_before_offline(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, signum: signal.Signals
) -> None:
    daemon = stack.daemon()
    subscriber.next("edged/testpi/availability", payload=b"online")
    daemon.wait_for_log("stt.connected")
    audio, truth = script([["golf", "hotel"]], pause_s=0.0)  # no pause: the service has not
    offset = mic.play(audio)  # endpointed yet when SIGTERM comes
    mic.wait_read(offset + truth[0][-1].end)  # the daemon's microphone has the last word
    daemon.signal(signum)

    final = subscriber.next(TOPIC, timeout=15).json()
    assert_matches_truth([final], truth, offset, mic)
    assert subscriber.next("edged/testpi/availability", payload=b"offline", timeout=10)
    assert daemon.wait(20) == 0
    assert stt.sessions[-1].finals_on_close == 1, "the final came out of CloseStream"
    assert f"shutdown.requested reason={signum.name}" in daemon.log


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

    assert len(stt.sessions) == 2, "the drop forced one reconnect"
    assert_matches_truth(finals, truth, offset, mic)
    assert [final["seq"] for final in finals] == [1, 2, 3, 4]
    assert stt.sessions[1].api_key == API_KEY
    assert stt.sessions[1].query == stt.sessions[0].query
