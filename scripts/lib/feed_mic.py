"""Play raw 16 kHz s16le mono audio into a FIFO as a microphone would.

Used by scripts/demo: alsa-lib's `file` plugin reads the FIFO one period per
read, so this writes exactly one period at a time, in real time, and then
keeps the microphone alive with silence until it is stopped.

    python feed_mic.py FIFO AUDIO.raw [--period-ms 100] [--speed 1.0]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

RATE = 16_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("fifo")
    parser.add_argument("audio")
    parser.add_argument("--period-ms", type=int, default=100)
    parser.add_argument("--speed", type=float, default=1.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    period_bytes = RATE * 2 * args.period_ms // 1000
    with open(args.audio, "rb") as source:
        audio = source.read()
    audio += bytes(-len(audio) % period_bytes)
    silence = bytes(period_bytes)
    interval = args.period_ms / 1000 / args.speed
    with open(args.fifo, "wb", buffering=0) as mic:  # waits for the daemon to open it
        next_at = time.monotonic()
        offset = 0
        while True:
            if offset < len(audio):
                period, offset = audio[offset : offset + period_bytes], offset + period_bytes
            else:
                period = silence
            try:
                mic.write(period)
            except BrokenPipeError:
                return 0  # the daemon closed the microphone
            next_at += interval
            time.sleep(max(next_at - time.monotonic(), 0))


if __name__ == "__main__":
    sys.exit(main())
