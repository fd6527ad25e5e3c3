"""Capture from ALSA with pyalsaaudio, in a thread of its own.

ALSA reads block for one period; doing them on the event loop would stall
the network. The thread hands whole periods to the loop, batched to about
a frame (`handoff_ms`), with `call_soon_threadsafe`, so the buffer is only
ever touched by the loop.

A device that is missing or vanishes (USB unplugged) is reopened with
backoff and reported; a device that cannot deliver 16 kHz S16_LE mono is
refused for good, because streaming at the wrong rate would garble every
transcript and shift every timestamp.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import alsaaudio
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from edged.audio import devices
from edged.audio.alsalog import route_alsa_messages
from edged.config import CHANNELS, SAMPLE_RATE, SAMPLE_WIDTH, AudioSettings
from edged.errors import CaptureError, CaptureFormatError
from edged.untrusted import loggable

log = logging.getLogger("edged.capture")

# Batches handed to the event loop but not yet taken (15 s at the default
# 300 ms hand-off: three 100 ms periods reaching a 250 ms frame).
MAX_IN_FLIGHT = 50


@dataclass
class CaptureStats:
    """Written by the capture thread, read by the loop (ints: atomic under the GIL)."""

    open: bool = False
    overruns: int = 0
    reopen_attempts: int = 0
    last_error: str | None = None


def open_pcm(settings: AudioSettings) -> Any:
    """Open the capture device and check what ALSA actually negotiated."""
    route_alsa_messages()  # this thread's alsa-lib chatter goes to the log, not stderr
    device = devices.resolve(settings.device)
    if device != settings.device:
        _log_auto_choice(device)
    try:
        pcm = alsaaudio.PCM(
            type=alsaaudio.PCM_CAPTURE,
            mode=alsaaudio.PCM_NORMAL,
            device=device,
            rate=SAMPLE_RATE,
            channels=CHANNELS,
            format=alsaaudio.PCM_FORMAT_S16_LE,
            periodsize=settings.chunk_frames,
            periods=4,
        )
    except alsaaudio.ALSAAudioError as error:
        shown = device if device == settings.device else f"{device} (auto)"
        raise CaptureError(f"cannot open ALSA device {shown!r}: {error}") from None
    info = pcm.info()
    got = (info.get("rate"), info.get("channels"), info.get("format_name"))
    if got != (SAMPLE_RATE, CHANNELS, "S16_LE"):
        pcm.close()
        raise CaptureFormatError(
            f"device {device!r} offers rate={got[0]} channels={got[1]} "
            f"format={got[2]}, not {SAMPLE_RATE} Hz mono S16_LE; use a device where ALSA "
            f"converts, such as 'plughw:...' instead of 'hw:...', or 'default'",
            key="audio.device",
        )
    return pcm


_auto_choice: list[str] = []  # the last PCM `auto` chose: logged when it changes


def _log_auto_choice(device: str) -> None:
    if _auto_choice != [device]:
        _auto_choice[:] = [device]
        card = devices.pick(devices.cards())
        log.info("capture.auto picked=%s card=%s usb=%s", loggable(device),
                 loggable(card.name) if card else "none (no card can capture)",
                 str(card.usb).lower() if card else "false")


def _worth_retrying(error: BaseException) -> bool:
    # A missing device may come back (USB re-plugged); a wrong format never will.
    return isinstance(error, CaptureError) and not isinstance(error, CaptureFormatError)


class Capture:
    """Reads the microphone in a thread; calls `on_audio(bytes)` on the loop."""

    def __init__(
        self,
        settings: AudioSettings,
        loop: asyncio.AbstractEventLoop,
        on_audio: Callable[[bytes], None],
        on_fatal: Callable[[BaseException], None],
        on_change: Callable[[], None] = lambda: None,
        handoff_ms: int | None = None,
    ):
        self.settings = settings
        handoff_ms = max(handoff_ms or settings.chunk_ms, settings.chunk_ms)
        self._handoff_bytes = SAMPLE_RATE * SAMPLE_WIDTH * handoff_ms // 1000
        self.stats = CaptureStats()
        self._loop = loop
        self._on_audio = on_audio
        self._on_fatal = on_fatal
        self._on_change = on_change
        self._stop = threading.Event()
        # A bounded handoff: batches handed over minus batches taken. Each
        # counter has one writer (the thread, the loop), so no lock is needed.
        self._handed = 0
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name="edged-capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop reading. A read blocks at most one period on a real device; a
        stalled one (a FIFO nobody feeds) cannot be interrupted, and the
        thread is a daemon, so we do not wait for it past `timeout`."""
        self._stop.set()
        if self._thread.ident is not None:  # never started: a daemon that started muted
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                pcm = self._open_with_backoff()
                if pcm is None:
                    return
                try:
                    self._read_until_error(pcm)
                finally:
                    pcm.close()
                    self._set_open(False)
        except BaseException as error:
            self._loop.call_soon_threadsafe(self._on_fatal, error)

    def _open_with_backoff(self) -> Any:
        retrying = Retrying(
            retry=retry_if_exception(_worth_retrying),
            wait=wait_exponential_jitter(initial=1, max=30),
            sleep=self._sleep,
            before_sleep=self._report_open_failure,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._stop.is_set():
                    return None
                pcm = open_pcm(self.settings)
                log.info("capture.open device=%s period_ms=%d", loggable(self.settings.device),
                         self.settings.chunk_ms)
                self.stats.last_error = None
                self._set_open(True)
                return pcm
        return None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # interruptible, so SIGTERM is not held up

    def _report_open_failure(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.stats.reopen_attempts += 1
        self.stats.last_error = str(error)
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("capture.unavailable attempt=%d retry_in=%.1fs error=%s",
                    state.attempt_number, delay, loggable(error))
        self._loop.call_soon_threadsafe(self._on_change)

    def _read_until_error(self, pcm: Any) -> None:
        # Periods are handed to the loop in batches of `handoff_ms`: each
        # handoff wakes the loop, and wake-ups are most of the daemon's CPU.
        # This loop runs ten times a second for ever: names are bound once.
        read, stopping, handoff_bytes = pcm.read, self._stop.is_set, self._handoff_bytes
        batch: list[bytes] = []
        batched = 0
        while True:
            try:
                length, data = read()
            except alsaaudio.ALSAAudioError as error:
                if batch:
                    self._hand_over(b"".join(batch))
                self.stats.last_error = f"device lost: {error}"
                log.warning("capture.lost device=%s error=%s", loggable(self.settings.device),
                            loggable(error))
                return
            if stopping():  # a read blocks a period: look after it, not before
                # What was read is audio like any other: handed over, not
                # dropped (a SIGTERM or a new microphone loses none of it).
                if length > 0 and data:
                    batch.append(data)
                if batch:
                    self._hand_over(b"".join(batch))
                return
            if length < 0:
                # Overrun (-EPIPE): we were too slow and ALSA dropped samples.
                # pyalsaaudio has already recovered the stream; count it, read on.
                self._overran()
                continue
            if data:
                batch.append(data)
                batched += len(data)
                if batched >= handoff_bytes:
                    self._hand_over(b"".join(batch) if len(batch) > 1 else batch[0])
                    batch, batched = [], 0

    def _hand_over(self, data: bytes) -> None:
        if self._handed - self._taken >= MAX_IN_FLIGHT:
            # The loop is not keeping up: drop this audio, counted as an
            # overrun, rather than queue without bound (memory, and a
            # SIGTERM stuck behind the queue).
            self._overran()
            return
        self._handed += 1
        self._loop.call_soon_threadsafe(self._deliver, data)

    def _overran(self) -> None:
        self.stats.overruns += 1
        count = self.stats.overruns
        if count in (1, 10, 100) or count % 1000 == 0:  # the log and the state say so
            log.warning("capture.overrun count=%d", count)
            self._loop.call_soon_threadsafe(self._on_change)

    def _deliver(self, data: bytes) -> None:
        self._taken += 1
        self._on_audio(data)

    def _set_open(self, is_open: bool) -> None:
        self.stats.open = is_open
        self._loop.call_soon_threadsafe(self._on_change)
