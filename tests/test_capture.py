"""The capture thread on its own, with a microphone that can be unplugged:
the audio from the fault-free ALSA device comes from tests/support/mic.py;
a device that vanishes under an open PCM cannot be made from a FIFO, so
here `open_pcm` gives a stand-in whose reads fail as a USB device's do."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import alsaaudio
import pytest

from edged.audio import capture as capture_module
from edged.audio.capture import Capture
from edged.config import AudioSettings
from edged.errors import CaptureError

PERIOD = bytes(3200)  # 100 ms of silence


class UsbMicrophone:
    """Delivers `periods` periods (paced like a device), then is unplugged."""

    def __init__(self, periods: int):
        self.periods = periods

    def read(self) -> tuple[int, bytes]:
        if self.periods == 0:
            raise alsaaudio.ALSAAudioError("No such device [-19]")
        self.periods -= 1
        time.sleep(0.01)
        return 1600, PERIOD

    def close(self) -> None:
        pass


@pytest.fixture
def plugs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Open attempts: a microphone that works for 0.5 s and is then pulled
    out, one failed reopen (still unplugged), then one that stays."""
    outcomes: Iterator[UsbMicrophone | CaptureError] = iter([
        UsbMicrophone(5), CaptureError("cannot open ALSA device 'usbmic': No such device"),
        UsbMicrophone(10**9)])
    attempts: list[float] = []

    def open_pcm(settings: AudioSettings) -> UsbMicrophone:
        attempts.append(time.monotonic())
        outcome = next(outcomes)
        if isinstance(outcome, CaptureError):
            raise outcome
        return outcome

    monkeypatch.setattr(capture_module, "open_pcm", open_pcm)
    return attempts


def test_an_unplugged_microphone_is_reopened_with_backoff(plugs: list[float]) -> None:
    async def scenario() -> tuple[Capture, list[bool]]:
        loop = asyncio.get_running_loop()
        fatal: list[BaseException] = []
        seen_open: list[bool] = []
        after_replug = 0
        audio_again = asyncio.Event()

        def on_audio(data: bytes) -> None:
            nonlocal after_replug
            if len(plugs) == 3:
                after_replug += len(data)
                if after_replug >= 5 * len(PERIOD):
                    audio_again.set()

        capture = Capture(AudioSettings(device="usbmic", chunk_ms=100), loop, on_audio,
                          fatal.append, lambda: seen_open.append(capture.stats.open))
        capture.start()
        try:
            await asyncio.wait_for(audio_again.wait(), 10)
        finally:
            await asyncio.to_thread(capture.stop)
        assert not fatal, "an unplugged microphone is not fatal"
        return capture, seen_open

    capture, seen_open = asyncio.run(scenario())
    changes = [is_open for is_open, _ in itertools.groupby(seen_open)]
    assert changes == [True, False, True, False], "open, lost (no_microphone), again, stopped"
    assert capture.stats.reopen_attempts == 1
    assert capture.stats.last_error is None
    # Reopened at once, then after the backoff's first step (1 s, plus up to 1 s of jitter).
    assert plugs[1] - plugs[0] < 1.0
    assert 1.0 <= plugs[2] - plugs[1] <= 2.2
