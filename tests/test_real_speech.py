"""Real speech, real recognition: espeak-ng -> ALSA -> edged -> `edged stt-server` -> MQTT."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.broker import Subscriber, free_port, wait_for_port
from tests.support.mic import FifoMic
from tests.support.speech import silence, speak


@pytest.fixture
def stt_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "stt-server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "edged", "stt-server", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60)
        yield f"ws://127.0.0.1:{port}/v1/listen"
    finally:
        server.terminate()
        server.wait(10)


def test_spoken_sentence_becomes_a_transcript_on_mqtt(
    stack: Stack, stt_server: str, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.stt_url = stt_server
    stack.daemon(stt={"provider": "pocketsphinx"})
    start = mic.play(speak("turn on the kitchen light", lead_silence_s=0.5, tail_silence_s=1.5))

    final = subscriber.next("edged/testpi/transcript", timeout=60).json()

    assert final["text"].strip()
    assert final["provider"] == "pocketsphinx"
    assert final["words"]
    # The speech starts after 0.5 s of silence and lasts under 3 s.
    assert start + 0.2 <= final["start"] < final["end"] <= start + 4.5


def test_real_speech_between_silences_with_voice_activity_gating(
    stack: Stack, stt_server: str, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.stt_url = stt_server
    stack.daemon(stt={"provider": "pocketsphinx"}, vad={"enabled": True})
    start = mic.play(silence(4.0) + speak("what is the weather tomorrow", lead_silence_s=0.0,
                                         tail_silence_s=0.0) + silence(4.0))

    final = subscriber.next("edged/testpi/transcript", timeout=60).json()

    assert final["text"].strip()
    # True times although the silence before the speech was never sent.
    assert start + 3.5 <= final["start"] < final["end"] <= start + 4.0 + 3.5
