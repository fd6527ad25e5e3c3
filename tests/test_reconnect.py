"""Failures of the STT service that edged rides out without losing a word."""

from __future__ import annotations

import time

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_end_to_end import SEQUENCE, assert_matches_truth, collect_finals


def test_unasked_clean_close_reconnects_and_loses_nothing(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.close_after_bytes = [32000 * 2, 32000 * 2]  # twice, each 2 s into a session
    stack.daemon()
    audio, truth = script(SEQUENCE)
    offset = mic.play(audio)
    finals = collect_finals(subscriber, len(SEQUENCE), timeout=40)
    assert len(stt.sessions) == 3, "two closes, two reconnects"
    assert_matches_truth(finals, truth, offset, mic)
    assert [final["seq"] for final in finals] == [1, 2, 3, 4]


def test_refused_connects_and_malformed_frames_are_survived_and_counted(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 2
    stt.faults.malformed_after_final = True
    daemon = stack.daemon()
    audio, truth = script(SEQUENCE[:2])
    offset = mic.play(audio)
    finals = collect_finals(subscriber, 2, timeout=40)
    assert_matches_truth(finals, truth, offset, mic)
    assert stt.refused == 2
    assert len(stt.sessions) == 1
    deadline = time.monotonic() + 10
    while (state := subscriber.next("edged/testpi/state",
                                    timeout=deadline - time.monotonic()).json()
           )["malformed_frames"] < 2:
        pass
    assert state["malformed_frames"] == 2, "one after each final"
    assert "stt.malformed_frame count=2" in daemon.log
    assert daemon.log.count("stt.connect_failed") == 2  # refused before the first session
    assert "HTTP 503" in daemon.log


def test_pings_notice_a_half_open_connection_and_nothing_is_lost(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """The service goes silent with the TCP connection up (nothing read,
    nothing answered, no FIN, no RST): a ping goes unanswered, the daemon
    gives up on the connection, reconnects and re-sends from the last final."""
    ping_s, close_s = 1.0, 1.0
    daemon = stack.daemon(stt={"ping_interval_s": ping_s, "close_timeout_s": close_s})
    audio, truth = script([["alpha", "bravo"]])
    offset = mic.play(audio)
    first = collect_finals(subscriber, 1)
    stt.freeze_connections()
    frozen_at = time.monotonic()
    more, more_truth = script([["charlie"], ["delta", "echo"]])
    more_offset = mic.play(more)

    daemon.wait_for_log("stt.connected session=2", timeout=15)
    noticed = stt.sessions[1].opened_at - frozen_at
    # A ping is due within ping_interval_s and unanswered ping_interval_s later;
    # websockets then waits close_timeout_s for a TCP close that never comes;
    # then the first backoff (at most 1 s).
    assert noticed < 2 * ping_s + close_s + 1.0 + 0.5, f"noticed after {noticed:.1f}s"
    finals = collect_finals(subscriber, 2)
    assert_matches_truth(first, truth, offset, mic)
    assert_matches_truth(finals, more_truth, more_offset, mic)
    assert [final["seq"] for final in first + finals] == [1, 2, 3]
    assert len(stt.sessions) == 2
    stop_keeping_the_rest(daemon, stack.home / "state")  # still replaying what it re-sent
