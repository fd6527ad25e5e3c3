"""Fault injection: a service that drops, refuses, rate-limits and garbles."""

from __future__ import annotations

import random
import time

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import VOCABULARY, script
from tests.test_end_to_end import assert_matches_truth, collect_finals

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
    stack.daemon()
    audio, truth = script(utterances, pause_s=0.7)
    offset = mic.play(audio)

    finals = collect_finals(subscriber, len(utterances), timeout=90)

    assert len(stt.sessions) >= 13, "all twelve drops must have happened"
    assert_matches_truth(finals, truth, offset)
    seqs = [final["seq"] for final in finals]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    time.sleep(1.5)  # a late duplicate would show up now
    assert subscriber.messages.empty() or all(
        m.topic != "edged/testpi/transcript" for m in list(subscriber.messages.queue)
    )


def test_rate_limited_connect_waits_as_long_as_retry_after_says(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.refuse_status, stt.faults.refuse_count, stt.faults.retry_after = 429, 1, "3"
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connect_failed")
    refused_at = time.monotonic()
    daemon.wait_for_log("stt.connected", timeout=15)
    waited = time.monotonic() - refused_at
    assert waited >= 2.5, f"reconnected after {waited:.1f}s despite Retry-After: 3"
    assert "retry_in=3.00s" in daemon.log
    audio, truth = script([["golf"]])
    offset = mic.play(audio)
    assert_matches_truth(collect_finals(subscriber, 1), truth, offset)
