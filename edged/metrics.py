"""Prometheus metrics on an opt-in loopback port (prometheus-client).

Counters and gauges are read from the daemon's own statistics when scraped,
so streaming pays nothing for them; only the final-to-publish latency is a
real histogram, observed once per transcript.

Scrapes are served by prometheus-client's HTTP server in its own thread: it
reads plain ints and floats that the event loop writes (atomic under the GIL).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edged.config import MetricsSettings
from edged.untrusted import loggable

log = logging.getLogger("edged.metrics")


@dataclass(frozen=True)
class Snapshot:
    captured_s: float
    sent_s: float
    dropped_s: float
    buffered_s: float
    outbox_depth: int
    finals: int
    malformed_frames: int
    overruns: int
    stt_connected: bool
    mqtt_connected: bool
    microphone_open: bool
    reconnects_by_cause: dict[str, int] = field(default_factory=dict)


class _DaemonCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        now = self._snapshot()
        for name, text, value in (
            ("edged_audio_captured_seconds", "Audio captured (stream time)", now.captured_s),
            ("edged_audio_sent_seconds", "Audio sent to the STT service", now.sent_s),
            ("edged_audio_dropped_seconds", "Audio lost for good", now.dropped_s),
            ("edged_finals", "Final transcripts received", now.finals),
            ("edged_malformed_frames", "Frames from the service skipped", now.malformed_frames),
            ("edged_capture_overruns", "ALSA capture overruns", now.overruns),
        ):
            yield CounterMetricFamily(name, text, value=value)
        reconnects = CounterMetricFamily("edged_reconnects", "STT reconnects by cause",
                                         labels=["cause"])
        for cause, count in sorted(now.reconnects_by_cause.items()):
            reconnects.add_metric([cause], count)
        yield reconnects
        for name, text, gauge in (
            ("edged_buffered_seconds", "Audio captured, not yet sent", now.buffered_s),
            ("edged_outbox_depth", "Transcripts waiting for the broker", now.outbox_depth),
            ("edged_stt_connected", "1 while an STT session is up", now.stt_connected),
            ("edged_mqtt_connected", "1 while connected to the broker", now.mqtt_connected),
            ("edged_microphone_open", "1 while the capture device is open", now.microphone_open),
        ):
            yield GaugeMetricFamily(name, text, value=float(gauge))


class Metrics:
    def __init__(self, settings: MetricsSettings, snapshot: Callable[[], Snapshot]):
        self.settings = settings
        self.registry = CollectorRegistry()
        self.registry.register(_DaemonCollector(snapshot))
        self.latency = Histogram(
            "edged_final_publish_latency_seconds",
            "From a final's arrival to the broker's PUBACK",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._server: Any = None

    def start(self) -> None:
        if not self.settings.enabled:
            return
        self._server, _ = start_http_server(self.settings.port, addr=self.settings.host,
                                            registry=self.registry)
        log.info("metrics.listening address=%s:%d", loggable(self.settings.host),
                 self.settings.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
