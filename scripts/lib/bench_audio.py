"""Micro-benchmark of the per-hand-off audio arithmetic: the level meter and
the software gain, against the pure-Python ways of doing the same.

    python scripts/lib/bench_audio.py

Prints microseconds of CPU per 250 ms hand-off (4000 samples, what the
daemon hands over at stt.frame_ms = 250) and per second of audio.
"""

from __future__ import annotations

import math
import random
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edged.audio.gain import Gain
from edged.monitor.level import LevelMeter

HANDOFF = 4000  # samples in 250 ms


def per_call_us(function: Callable[[], object], seconds: float = 1.0) -> float:
    """CPU time of one call, the best of five runs of about `seconds` / 5."""
    calls = 1
    while True:  # calibrate
        start = time.process_time()
        for _ in range(calls):
            function()
        if time.process_time() - start > seconds / 50:
            break
        calls *= 2
    best = math.inf
    for _ in range(5):
        start = time.process_time()
        for _ in range(calls * 10):
            function()
        best = min(best, (time.process_time() - start) / (calls * 10))
    return best * 1e6


def pure_python_meter(data: bytes) -> tuple[float, int, int]:
    """What LevelMeter did before: boxed once, then max, min, hypot in C."""
    samples = array("h")
    samples.frombytes(data)
    values = samples.tolist()
    return math.hypot(*values) ** 2, max(values), min(values)


def main() -> None:
    rng = random.Random(1)
    speech = array("h", (int(8000 * math.sin(n / 5) + rng.randint(-100, 100))
                         for n in range(HANDOFF))).tobytes()
    square = array("h", ([32767] * 8 + [-32768] * 8) * (HANDOFF // 16)).tobytes()
    factor = 10 ** (12 / 20)
    table = [max(-32768, min(32767, math.floor((i if i < 32768 else i - 65536) * factor)))
             for i in range(65536)]  # a signed sample indexes it as Python indexes lists

    def table_gain(data: bytes) -> bytes:
        samples = array("h")
        samples.frombytes(data)
        return array("h", list(map(table.__getitem__, samples.tolist()))).tobytes()

    def clamp_gain(data: bytes) -> bytes:
        samples = array("h")
        samples.frombytes(data)
        return array("h", [max(-32768, min(32767, math.floor(x * factor)))
                           for x in samples]).tobytes()

    meter = LevelMeter()
    gain_0, gain_12 = Gain(0.0), Gain(12.0)
    rows = [
        ("LevelMeter.feed (audioop), speech-like", lambda: meter.feed(speech)),
        ("LevelMeter.feed (audioop), every sample clipping", lambda: meter.feed(square)),
        ("pure-Python meter (tolist, max, min, hypot)", lambda: pure_python_meter(speech)),
        ("Gain(0 dB).apply", lambda: gain_0.apply(speech)),
        ("Gain(+12 dB).apply (audioop.mul)", lambda: gain_12.apply(speech)),
        ("gain by a 65536-entry lookup table (map)", lambda: table_gain(speech)),
        ("gain by a clamp per sample", lambda: clamp_gain(speech)),
    ]
    print(f"{'operation':52} {'us / 250 ms':>12} {'us / s audio':>13}")
    for name, function in rows:
        us = per_call_us(function)
        print(f"{name:52} {us:12.1f} {us * 4:13.1f}")


if __name__ == "__main__":
    main()
