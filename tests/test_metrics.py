"""Prometheus metrics: scraped during a run, the counters move."""

from __future__ import annotations

import re
import time
import urllib.request

from tests.conftest import Stack
from tests.support.broker import Subscriber, free_port
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.support.waiting import wait_until


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def wait_scrape(port: int, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_counters_move_during_a_run(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    port = free_port()
    stt.faults.drop_after_bytes = [32000 * 2]  # one lost connection
    stack.daemon(metrics={"enabled": True, "port": port})
    first = wait_scrape(port)
    audio, _ = script([["alpha", "bravo"], ["charlie"], ["delta"]])
    mic.play(audio)
    for _ in range(3):
        subscriber.next("edged/testpi/transcript", timeout=30)
    # The third PUBACK may reach the daemon after the subscriber has the message.
    later = wait_until(lambda: (values := scrape(port))[
        "edged_final_publish_latency_seconds_count"] == 3 and values,
        "three publish latencies in the metrics", timeout=10)

    assert later["edged_audio_captured_seconds_total"] > first["edged_audio_captured_seconds_total"]
    assert later["edged_audio_sent_seconds_total"] > first["edged_audio_sent_seconds_total"]
    assert later["edged_finals_total"] == 3
    assert later['edged_reconnects_total{cause="network"}'] == 1
    assert later["edged_final_publish_latency_seconds_count"] == 3
    assert later["edged_stt_connected"] == 1
    assert later["edged_outbox_depth"] == 0


def test_metrics_listen_on_loopback_only_by_default(stack: Stack, mic: FifoMic) -> None:
    port = free_port()
    daemon = stack.daemon(metrics={"enabled": True, "port": port})
    wait_scrape(port)
    assert f"metrics.listening address=127.0.0.1:{port}" in daemon.log
