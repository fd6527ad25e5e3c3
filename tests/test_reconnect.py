"""Failures of the STT service that edged rides out without losing a word."""

from __future__ import annotations

import json

from tests.conftest import Stack
from tests.support.broker import Subscriber
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
    assert len(stt.sessions) >= 3
    assert_matches_truth(finals, truth, offset)


def test_refused_connects_and_malformed_frames_are_survived_and_counted(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 2
    stt.faults.malformed_after_final = True
    daemon = stack.daemon()
    audio, truth = script(SEQUENCE[:2])
    offset = mic.play(audio)
    finals = collect_finals(subscriber, 2, timeout=40)
    assert_matches_truth(finals, truth, offset)
    assert stt.refused == 2
    deadline_state = None
    for _ in range(40):
        message = subscriber.next("edged/testpi/state", timeout=10)
        deadline_state = json.loads(message.payload)
        if deadline_state["malformed_frames"] >= 2:
            break
    assert deadline_state is not None
    assert deadline_state["malformed_frames"] >= 2
    assert "stt.malformed_frame" in daemon.log
    assert "HTTP 503" in daemon.log
