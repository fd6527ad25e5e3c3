"""The microphone: opens at 16 kHz mono S16_LE (with the daemon's `open_pcm`),
and a few seconds of its level with a verdict.

The device is opened and read in a thread: opening a stale device or reading
a stalled one can block for ever, and the check must not.
"""

from __future__ import annotations

import sys
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Any

from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, AudioSettings, Settings
from edged.doctor.checks import MICROPHONE, Check, failed, passed, warned
from edged.monitor.level import CLIP_HIGH, CLIP_LOW, LevelMeter

OPEN_TIMEOUT_S = 5.0
STALL_S = 2.0  # open, but nothing arrived this long: stalled (as the daemon says)
SILENT_DBFS = -90.0  # RMS below this is a dead input, not a quiet room
QUIET_DBFS = -60.0  # RMS below this: speech will be too quiet to recognise well
CLIPPING_SHARE = 0.001  # more than this share of samples at full scale: clipping

_FULL_SCALE = (CLIP_HIGH, CLIP_HIGH + 1, CLIP_LOW, CLIP_LOW - 1)
_DEVICES_HINT = "see `edged devices`; `plughw:CARD,DEV` or `default` let ALSA convert"


@dataclass(frozen=True)
class Measurement:
    seconds: float
    rms_dbfs: float
    peak_dbfs: float
    clipped: int  # samples at (or within 1 LSB of) full scale
    samples: int
    constant: bool  # every sample the same value: exact digital silence

    @property
    def clipped_share(self) -> float:
        return self.clipped / self.samples if self.samples else 0.0

    @property
    def verdict(self) -> str:
        if self.constant or self.rms_dbfs < SILENT_DBFS:
            return "silent"
        if self.clipped_share > CLIPPING_SHARE:
            return "clipping"
        if self.rms_dbfs < QUIET_DBFS:
            return "too quiet"
        return "fine"


class _Recorder:
    """Opens the device and reads `seconds` of audio in a daemon thread."""

    def __init__(self, settings: AudioSettings, seconds: float):
        self.settings = settings
        self.wanted = round(seconds * SAMPLE_RATE)
        self.opened = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None  # opening failed
        self.lost: str | None = None  # reading failed
        self.last_audio = 0.0  # monotonic
        self._meter = LevelMeter()
        self._clipped = 0
        self._samples = 0
        self._low = 0
        self._high = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="doctor-mic", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def measurement(self) -> Measurement:
        with self._lock:
            level = self._meter.snapshot()
            return Measurement(self._samples / SAMPLE_RATE, level.rms_dbfs, level.peak_dbfs,
                               self._clipped, self._samples, self._low == self._high)

    def _run(self) -> None:
        from edged.audio.capture import open_pcm  # ALSA only when the check runs

        try:
            pcm = open_pcm(self.settings)
        except BaseException as error:  # reported by the check, whatever it is
            self.error = error
            self.opened.set()
            self.done.set()
            return
        self.last_audio = time.monotonic()
        self.opened.set()
        try:
            self._read(pcm)
        finally:
            pcm.close()
            self.done.set()

    def _read(self, pcm: Any) -> None:
        import alsaaudio

        while self._samples < self.wanted and not self._stop.is_set():
            try:
                length, data = pcm.read()
            except alsaaudio.ALSAAudioError as error:
                self.lost = str(error)
                return
            if length <= 0 or not data:
                continue  # an overrun: pyalsaaudio has recovered, read on
            self.last_audio = time.monotonic()
            self._feed(data[: (self.wanted - self._samples) * SAMPLE_WIDTH])

    def _feed(self, pcm: bytes) -> None:
        samples = array("h")
        samples.frombytes(pcm[: len(pcm) & ~1])
        if sys.byteorder == "big":
            samples.byteswap()
        values = samples.tolist()
        if not values:
            return
        low, high = min(values), max(values)
        clipped = sum(values.count(value) for value in _FULL_SCALE)
        with self._lock:
            if not self._samples:
                self._low, self._high = low, high
            self._meter.feed(pcm)
            self._clipped += clipped
            self._low, self._high = min(self._low, low), max(self._high, high)
            self._samples += len(values)


def check_microphone(settings: Settings, seconds: float) -> Check:
    from edged.errors import CaptureFormatError

    audio = settings.audio
    recorder = _Recorder(audio, seconds)
    if not recorder.opened.wait(OPEN_TIMEOUT_S):
        recorder.stop()
        return failed(MICROPHONE, f"opening {audio.device!r} did not return within "
                      f"{OPEN_TIMEOUT_S:.0f} s", f"check audio.device; {_DEVICES_HINT}",
                      device=audio.device)
    error = recorder.error
    if isinstance(error, CaptureFormatError):
        return failed(MICROPHONE, str(error), f"set audio.device to a converting device; "
                      f"{_DEVICES_HINT}", device=audio.device)
    if error is not None:
        return _open_failed(audio.device, error)
    while not recorder.done.wait(0.05):
        if time.monotonic() - recorder.last_audio > STALL_S:
            recorder.stop()  # a blocked read cannot be interrupted: the thread is a daemon
            heard = recorder.measurement()
            return failed(MICROPHONE, f"{audio.device!r} opened at 16 kHz mono, but no audio "
                          f"arrived for {STALL_S:.0f} s after {heard.seconds:.1f} s (stalled)",
                          "check the microphone's cable and power (`dmesg` for USB resets); "
                          "a device another program feeds must be fed", device=audio.device,
                          seconds=round(heard.seconds, 2))
    if recorder.lost is not None:
        return failed(MICROPHONE, f"{audio.device!r} was lost while reading: {recorder.lost}",
                      "check the microphone's cable and power (`dmesg` for USB resets)",
                      device=audio.device)
    return _judge(audio.device, recorder.measurement())


def _open_failed(device: str, error: BaseException) -> Check:
    text = str(error)
    if "busy" in text.lower():
        return failed(MICROPHONE, text,
                      "another program holds the microphone (edged itself, if it runs): stop "
                      "it for the check (`sudo systemctl stop edged`), or watch the level in "
                      "`edged monitor`", device=device)
    return failed(MICROPHONE, text,
                  f"check audio.device ({_DEVICES_HINT}); is the microphone plugged in, and is "
                  f"this user in group 'audio'?", device=device)


def _db(value: float) -> str:
    return f"{round(value, 1) + 0.0:.1f}"  # never "-0.0"


def _judge(device: str, heard: Measurement) -> Check:
    verdict = heard.verdict
    detail = (f"{device!r} at 16 kHz mono: RMS {_db(heard.rms_dbfs)} dBFS, peak "
              f"{_db(heard.peak_dbfs)} dBFS over {heard.seconds:.1f} s")
    if heard.clipped:
        detail += f", {100 * heard.clipped_share:.1f} % of samples at full scale"
    detail += f" ({verdict})"
    data = {"device": device, "seconds": round(heard.seconds, 2),
            "rms_dbfs": float(_db(heard.rms_dbfs)), "peak_dbfs": float(_db(heard.peak_dbfs)),
            "clipped_percent": round(100 * heard.clipped_share, 3), "level": verdict}
    if verdict == "silent":
        what = "exact digital silence" if heard.constant else "nothing but the noise floor"
        return failed(MICROPHONE, f"{detail}: {what}",
                      "unmute the capture switch and raise the capture gain (`alsamixer`, F4, "
                      "space), check the cable, and that audio.device is the microphone "
                      f"({_DEVICES_HINT})", **data)
    if verdict == "clipping":
        return warned(MICROPHONE, detail,
                      "lower the capture gain (`alsamixer`, F4) or move the microphone away "
                      "from the sound; clipped speech is recognised badly", **data)
    if verdict == "too quiet":
        return warned(MICROPHONE, detail,
                      "speak during the check; if it stays this low, raise the capture gain "
                      "(`alsamixer`, F4)", **data)
    return passed(MICROPHONE, detail, **data)
