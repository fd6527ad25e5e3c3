"""The microphone of scripts/systemtest: a FIFO that alsa-lib's `file` plugin reads.

Runs inside the test container as a systemd service. Writes one period at a
time, paced as a microphone would: a quiet room's noise (never exact digital
silence) and, once per SIGUSR1, the speech file. Reopens the FIFO whenever
its reader goes away, so a restarted daemon finds its microphone again.
SIGSTOP stalls it without closing the FIFO (what the watchdog must notice);
after SIGCONT it goes on at real time, without a burst to catch up.

    python3 systemtest_mic.py FIFO SPEECH.raw [--period-ms 100]
"""

from __future__ import annotations

import argparse
import array
import collections
import os
import random
import signal
import sys
import time

RATE = 16_000


def log(message: str) -> None:
    print(f"systemtest-mic: {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("fifo")
    parser.add_argument("speech")
    parser.add_argument("--period-ms", type=int, default=100)
    args = parser.parse_args()

    period_bytes = RATE * 2 * args.period_ms // 1000
    with open(args.speech, "rb") as source:
        speech = source.read()
    speech += bytes(-len(speech) % period_bytes)
    speech_periods = [speech[i : i + period_bytes] for i in range(0, len(speech), period_bytes)]
    rng = random.Random(0)  # a fixed, faint hiss: +-2 of 32767
    noise = array.array("h", (rng.randint(-2, 2) for _ in range(period_bytes // 2))).tobytes()
    interval = args.period_ms / 1000

    requests: list[int] = []
    signal.signal(signal.SIGUSR1, lambda *_: requests.append(1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue: collections.deque[bytes] = collections.deque()

    while True:
        try:
            # No O_CREAT: a microphone that is not there stays absent.
            fd = os.open(args.fifo, os.O_WRONLY)  # blocks until the daemon opens it
        except FileNotFoundError:
            time.sleep(0.5)
            continue
        log("reader connected")
        with os.fdopen(fd, "wb", buffering=0) as mic:
            next_at = time.monotonic()
            while True:
                while requests:
                    requests.pop()
                    queue.extend(speech_periods)
                    log(f"speaking {len(speech_periods) * interval:.1f} s")
                try:
                    mic.write(queue.popleft() if queue else noise)
                except BrokenPipeError:
                    log("reader gone; waiting for the next one")
                    break
                next_at += interval
                now = time.monotonic()
                if next_at < now - 0.5:  # we were stopped (SIGSTOP): no burst
                    next_at = now
                time.sleep(max(next_at - now, 0))


if __name__ == "__main__":
    sys.exit(main())
