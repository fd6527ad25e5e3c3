"""Fault injection: a service that drops, refuses, rate-limits and garbles."""

from __future__ import annotations

import random

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import VOCABULARY, script
from tests.test_end_to_end import (
    assert_matches_truth,
    assert_no_late_transcripts,
    collect_finals,
)

BYTES_PER_S = 32_000


def test_every_word_once_through_a_dozen_abrupt_drops(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    rng = random.Random(20261126)
    utterances = [[rng.choice(VOCABULARY) for _ in range(rng.randint(1, 3))] for _ in range(14)]
    # Each session dies abruptly after a random 0.4 to 2.5 s of audio.
    stt.faults.drop_after_bytes = [rng.randint(BYTES_PER_S * 4 // 10, BYTES_PER_S * 5 // 2)
                                   for _ in range(12)]
    stt.faults.malformed_after_final = True
    daemon = stack.daemon()
    audio, truth = script(utterances, pause_s=0.7)
    offset = mic.play(audio)

    finals = collect_finals(subscriber, len(utterances), timeout=90)

    assert len(stt.sessions) == 13, "twelve drops, twelve reconnects"
    assert_matches_truth(finals, truth, offset, mic)
    assert [final["seq"] for final in finals] == list(range(1, 15))
    assert_no_late_transcripts(subscriber)
    # Each reconnect re-sent from the last final, at stt.replay_speed: the
    # daemon is still well behind live audio, and a SIGTERM now cannot wait
    # for all of it (stt.close_timeout_s): what is left goes to the spool.
    stop_keeping_the_rest(daemon, stack.home / "state")
    assert "stt.close_timeout" in daemon.log


def test_rate_limited_connect_waits_as_long_as_retry_after_says(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.refuse_status, stt.faults.refuse_count, stt.faults.retry_after = 429, 1, "3"
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected", timeout=15)
    waited = stt.sessions[0].opened_at - stt.refused_at[0]
    assert 3.0 <= waited <= 4.0, f"reconnected after {waited:.2f}s; Retry-After: 3"
    assert "stt.connect_failed retry_in=3.00s error=HTTP 429" in daemon.log
    assert stt.refused == 1
    audio, truth = script([["golf"]])
    offset = mic.play(audio)
    assert_matches_truth(collect_finals(subscriber, 1), truth, offset, mic)
