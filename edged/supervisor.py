"""The supervisor: wires the data path, runs its tasks, stops them in order.

    capture thread -> AudioBuffer -> SttSession -> Outbox -> MqttPublisher

One TaskGroup holds the long-lived tasks. SIGTERM or SIGINT starts the
shutdown: stop capture, let the STT session send what is buffered and the
close message, wait (bounded) for the last finals, publish them, publish
`offline`, exit 0. A task that dies of a bug takes the daemon down with a
non-zero status, for systemd to restart it; the Last Will tells MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from edged import __version__
from edged.audio.buffer import AudioBuffer
from edged.audio.capture import Capture
from edged.audio.gain import Gain
from edged.audio.health import OK as MIC_OK
from edged.audio.health import SILENT, STALLED, MicrophoneHealth
from edged.audio.spool import Spool
from edged.audio.telemetry import AudioTelemetry, Context
from edged.audio.vad import SpeechGate
from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, Settings
from edged.control.mute import MuteFlag, switch_state
from edged.errors import ConfigError, EdgedError
from edged.logs import mask_secrets, set_secrets
from edged.monitor.server import MonitorServer
from edged.mqtt.payloads import (
    HERMES_TEXT_CAPTURED,
    hermes_text_captured,
    partial_payload,
    transcript_payload,
)
from edged.mqtt.publisher import MqttPublisher
from edged.outbox import Outbox
from edged.sdnotify import Notifier
from edged.storage import StorageHealth, describe, make_directory
from edged.streamclock import StreamClock
from edged.stt.protocol import Final, samples_to_seconds
from edged.stt.session import SttSession
from edged.untrusted import loggable

if TYPE_CHECKING:
    from edged.control.service import LoadConfig
    from edged.metrics import Metrics, Snapshot

log = logging.getLogger("edged")

STATE_INTERVAL_S = 1.0  # while the state moves by itself (a backlog, an outage)
STATE_HEARTBEAT_S = 60.0  # re-sent this often even when nothing changed
# Capture that delivered nothing for this long has stalled: systemd's
# watchdog is no longer fed, so it restarts us.
AUDIO_STALL_S = 2.0
MUTED = "muted"  # the status, and the microphone's condition, while muted


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did (SIGHUP, or a remote request that wants to say so)."""

    changed: list[str] = field(default_factory=list)  # sections now in force anew
    refused: str | None = None  # why the new configuration was refused (the old one stays)
    needs_restart: list[str] = field(default_factory=list)  # changed, kept until a restart


class Daemon:
    def __init__(self, load: Callable[[], Settings], loop: asyncio.AbstractEventLoop):
        settings = load()
        self.settings = settings
        self.loop = loop
        self._load = load  # SIGHUP loads again from the same files, variables and flags
        self._reloading = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[ReloadOutcome]] = set()
        # Called after a reload applied a new configuration, before a new
        # MQTT client (if any) connects: fleet control follows it there.
        self.reconfigured: list[Callable[[], None]] = []
        # Called when the shutdown begins: fleet control stops taking requests.
        self.stopping: list[Callable[[], None]] = []
        # A state directory that cannot be written is a reported condition:
        # the outbox and the spool fall back to memory and retry, audio flows.
        self.storage = StorageHealth(settings.state_retry_s)
        try:
            make_directory(settings.state_dir)
        except OSError as error:
            log.error("storage.state_dir_unusable path=%s error=%s", loggable(settings.state_dir),
                      loggable(describe(error)))
        # The privacy mute, read before anything could open the microphone.
        self.mute_flag = MuteFlag(settings.state_dir, self.storage)
        self.muted = self.mute_flag.load()
        if self.muted:
            log.warning("privacy.muted source=state_dir microphone=closed stt=closed")
        self._listening = False  # capture running and a session task: not while muted
        self._mute_changed = asyncio.Event()  # the wish changed: _follow_mute acts on it
        self._audio_lock = asyncio.Lock()  # one change of capture or session at a time
        self._stt_task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._mute_sent: tuple[int, int, bool] | None = None  # (client, connects, muted)
        self.outbox = Outbox(settings.state_dir / "outbox.sqlite3", self.storage)
        self.monitor = MonitorServer(settings.state_dir / "monitor.sock", self.state)
        self.publisher = MqttPublisher(settings, self.outbox, loop)
        self._wire_publisher()
        self.clock = StreamClock()
        self.spool = self._make_spool(settings)
        previous = self.outbox.previous_stream
        position = self.spool.recover(
            self.outbox.stream_id, self.outbox.transcribed,
            (previous.id, previous.transcribed) if previous else None)
        for record in self.spool.records:  # recovered audio keeps its capture time
            self.clock.captured(record.end, record.wall + samples_to_seconds(
                record.end - record.start), record.end - record.start)
        self.buffer = AudioBuffer(settings.buffer.max_seconds * SAMPLE_RATE, spool=self.spool,
                                  head=position, acknowledged=self.outbox.transcribed,
                                  release_limit=lambda: self.outbox.durable_transcribed)
        self.gate = SpeechGate(settings.vad) if settings.vad.enabled else None
        self.session = SttSession(settings, self.buffer, self._publish_final, self._changed,
                                  self._publish_partial, self.gate)
        self.session.finals.acknowledged = self.outbox.transcribed
        self.buffer.on_append = self.session.audio_arrived
        self.capture = self._make_capture(settings)
        self.metrics: Metrics | None = None  # prometheus-client is loaded only when asked for
        self.notifier = Notifier()
        self.mic_health = MicrophoneHealth(AUDIO_STALL_S, settings.audio.silent_after_s)
        self.gain = Gain(settings.audio.gain_db)
        self.audio_telemetry = AudioTelemetry(settings.audio.level_interval_s,
                                              settings.audio.level_change_db, time.monotonic())
        self._audio_report_wanted = asyncio.Event()
        self._mqtt_sessions = 0  # connections made, by any publisher: each wants the report
        self._mic_was_open = False
        self._mic_reported = MIC_OK  # the condition the state last said
        self._ready = False
        self._status_line = ""
        self._state_fingerprint = ""
        self._state_sent_at = 0.0
        self._last_state: dict[str, Any] = {}
        self._last_transcript_at: float | None = None  # wall time of the last final committed
        self._stop = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._fatal: BaseException | None = None
        self._stopping = False
        self._source = "state_dir"  # who asked for the current mute state

    def _start_metrics(self) -> None:
        settings = self.settings.metrics
        if not settings.enabled:
            return
        from edged.metrics import Metrics

        self.metrics = Metrics(settings, self._metrics_snapshot)
        self.publisher.on_delivered = self.metrics.latency.observe
        try:
            self.metrics.start()
        except OSError as error:  # a taken port must not stop the audio
            log.error("metrics.unavailable address=%s:%d error=%s", loggable(settings.host),
                      settings.port, loggable(error.strerror or error))

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
            self.publisher.on_delivered = None

    def _make_spool(self, settings: Settings) -> Spool:
        buffer = settings.buffer
        return Spool(settings.state_dir / "spool", buffer.spool_max_mb * 1024 * 1024,
                     self.storage, keep_free_bytes=buffer.spool_keep_free_mb * 1024 * 1024,
                     keep_free_ratio=buffer.spool_keep_free_percent / 100)

    def _make_capture(self, settings: Settings) -> Capture:
        # Audio leaves in frames of stt.frame_ms: handing it over from the
        # capture thread at that size wakes the loop no more than needed.
        return Capture(settings.audio, self.loop, self._captured, self._capture_failed,
                       self._changed, handoff_ms=settings.stt.frame_ms)

    # -- data path callbacks (all on the loop) --------------------------------

    def _captured(self, data: bytes) -> None:
        if self.muted:
            # Read before the device closed, handed over after the mute: audio
            # captured while muted never exists, not even in stream time.
            return
        data = self.gain.apply(data)  # before anything else sees the audio
        if self.audio_telemetry.feed(data):
            self._audio_report_wanted.set()
        self.mic_health.delivered(data, time.monotonic())
        if self._mic_reported != MIC_OK:  # back from a stall or from silence?
            self._judge_microphone()
        now = time.time()  # a period is handed over when its last sample is in
        if self.gate is not None:  # judged before the sender is woken by the append
            self.gate.feed(self.buffer.head, data)
        self.buffer.append(data, now - samples_to_seconds(len(data) // SAMPLE_WIDTH))
        self.clock.captured(self.buffer.head, now, len(data) // SAMPLE_WIDTH)
        if self.monitor.wants_audio:  # level metering costs CPU only while watched
            self.monitor.feed_audio(data)

    def _publish_final(self, final: Final | None, transcribed: int) -> None:
        """Commit a final (or, without one, the transcription point alone)
        before the session releases its audio."""
        if final is None:
            # Synced only when spooled audio behind the point is to be deleted.
            spooled_from = self.spool.start
            self.outbox.mark_transcribed(
                transcribed, durable=spooled_from is not None and spooled_from < transcribed)
            return
        received_at = time.monotonic()

        def render(stream_id: str, seq: int) -> bytes:
            return transcript_payload(
                final,
                stream_id=stream_id,
                seq=seq,
                device=self.settings.device.id,
                provider=self.settings.stt.provider,
                time=self.clock.iso(final.start),
            )

        item = self.outbox.add(render, transcribed)
        self._last_transcript_at = time.time()
        self._state_changed.set()  # the fleet view shows how long ago a device last heard speech
        self.publisher.submit(item, received_at)
        self.monitor.transcript(json.loads(item.payload))
        if self.settings.mqtt.hermes:
            self.publisher.publish_now(
                HERMES_TEXT_CAPTURED,
                hermes_text_captured(final, device=self.settings.device.id),
                qos=self.settings.mqtt.qos,
            )
        # Transcripts are what people said at home: their text stays out of the log.
        log.info("transcript seq=%d start=%.2f end=%.2f words=%d", item.seq,
                 samples_to_seconds(final.start), samples_to_seconds(final.end),
                 len(final.words))

    def _publish_partial(self, text: str, start: int, end: int) -> None:
        if self.settings.mqtt.partials and text:
            payload = partial_payload(text, start=start, end=end, device=self.settings.device.id)
            self.publisher.publish_now(self.publisher.topics.partial, payload, qos=0)

    def _capture_failed(self, error: BaseException) -> None:
        self._fatal = error
        self._stop.set()

    def _changed(self) -> None:
        self._state_changed.set()
        mic = self.capture.stats
        if mic.open and not self._mic_was_open:  # (re)opened: judged afresh
            self.mic_health.reset(time.monotonic())
        self._mic_was_open = mic.open
        if not self._ready and (mic.open or mic.reopen_attempts or self.muted):
            # Configured, and capture is open, or known to be absent and being
            # retried, or muted (never opened): start-up is over, STATUS says which.
            self._ready = True
            self.notifier.send(READY=1, STATUS=self._status_text())
            # What start-up made (modules, config models and their schemas)
            # lives as long as the process: out of the collector's sight, its
            # full collections no longer walk it again and again.
            gc.freeze()

    # -- state ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        stt, mic = self.session.stats, self.capture.stats
        # One frame being gathered is normal streaming, not a backlog.
        frame = SAMPLE_RATE * max(self.settings.stt.frame_ms, self.settings.audio.chunk_ms) // 1000
        backlog = max(self.buffer.unsent_samples - frame, 0)
        errors = [e for e in (stt.last_error, mic.last_error, self.publisher.last_error,
                              self.storage.reason) if e]
        return {
            "status": self._status(),
            "muted": self.muted,
            "version": __version__,
            "device": self.settings.device.id,
            "stt_connected": stt.state == "connected",
            "stt_state": stt.state,
            "mqtt_connected": self.publisher.connected,
            "microphone_open": mic.open,
            # ok | stalled (open, nothing arriving) | silent (exact digital
            # silence or a stuck value for audio.silent_after_s) | absent
            "microphone": self._mic_condition(),
            "buffered_s": round(samples_to_seconds(backlog), 1),
            "dropped_s": round(samples_to_seconds(self.buffer.dropped), 1),
            "reconnects": stt.reconnects,
            # Captured vs sent: with voice-activity gating, the billable share.
            "captured_s": round(samples_to_seconds(self.buffer.head)),
            "sent_s": round(samples_to_seconds(stt.sent_samples)),
            "overruns": mic.overruns,
            "malformed_frames": stt.malformed_frames,
            "outbox_depth": self.outbox.depth,
            "outbox_dropped": self.outbox.dropped,
            # ok | full | read_only | unwritable | corrupt | io_error: the state
            # directory; anything but ok means transcripts and audio wait in memory.
            "storage": self.storage.condition,
            "storage_error": self.storage.reason,
            # An error may quote the service's URL with a key in its query.
            "last_error": mask_secrets(errors[0]) if errors else None,
            # ISO 8601 UTC: when the last final was committed, null before the
            # first one since this start (`edged fleet` shows its age).
            "last_transcript_at": _iso(self._last_transcript_at),
        }

    def _metrics_snapshot(self) -> Snapshot:
        from edged.metrics import Snapshot

        stt, mic = self.session.stats, self.capture.stats
        return Snapshot(
            captured_s=samples_to_seconds(self.buffer.head),
            sent_s=samples_to_seconds(stt.sent_samples),
            dropped_s=samples_to_seconds(self.buffer.dropped),
            buffered_s=samples_to_seconds(self.buffer.unsent_samples),
            outbox_depth=self.outbox.depth,
            finals=stt.finals,
            malformed_frames=stt.malformed_frames,
            overruns=mic.overruns,
            stt_connected=stt.state == "connected",
            mqtt_connected=self.publisher.connected,
            microphone_open=mic.open,
            reconnects_by_cause=dict(stt.reconnect_causes),
        )

    def _status(self) -> str:
        if self._stopping:
            return "stopping"
        if self.muted:
            return MUTED
        if not self.capture.stats.open:
            return "no_microphone"
        if self._mic_condition() == STALLED:
            return "microphone_stalled"
        if self.session.stats.state in ("auth_failed", "rejected"):
            return self.session.stats.state
        gated = self.gate is not None
        if gated and self.session.stats.state == "idle":
            return "listening"  # no speech, so no session: nothing billed
        if self.session.stats.state == "connecting":
            return "connecting"  # not yet connected since the start
        if self.session.stats.state != "connected":
            return "reconnecting"
        if gated and self.gate is not None and not self.gate.in_speech:
            return "listening"
        return "streaming"

    def _status_text(self) -> str:
        """The line `systemctl status` shows."""
        state = self.state()
        text = (f"{state['status']}; {state['buffered_s']:.1f} s buffered; "
                f"{state['reconnects']} reconnects")
        if state["dropped_s"]:
            text += f"; {state['dropped_s']:.1f} s dropped"
        if state["outbox_depth"]:
            text += f"; {state['outbox_depth']} transcripts queued"
        if not state["mqtt_connected"]:
            text += "; MQTT down"
        if state["microphone"] == SILENT:
            text += "; microphone silent (exact digital silence: dead or muted?)"
        if state["storage"] != "ok":
            text += f"; storage {state['storage']}: {state['storage_error']}"
        return text

    async def _publish_state(self) -> None:
        while True:
            # Events (a session up or down, the microphone, a counter the
            # user should see) set _state_changed. Only a backlog, the
            # outbox or an outage move the state without one: then look every
            # second; while streaming steadily, sleep to the heartbeat.
            interval = STATE_INTERVAL_S
            if not self._state_moving():  # wake when the heartbeat is due
                heartbeat_in = self._state_sent_at + STATE_HEARTBEAT_S - time.monotonic()
                interval = max(heartbeat_in, STATE_INTERVAL_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._state_changed.wait()
            self._state_changed.clear()
            self._send_state()
            status = self._status_text()
            if self._ready and status != self._status_line:
                self._status_line = status
                self.notifier.send(STATUS=status)

    def _healthy(self) -> bool:
        """Audio is arriving, or the microphone is absent and being retried
        (restarting would not bring it back). An open microphone that has
        gone quiet is a stall: that one a restart may cure."""
        if self.muted:
            return True  # muted is healthy: a restart would only mute again
        mic = self.capture.stats
        if not mic.open:
            return mic.reopen_attempts > 0
        return self._mic_condition() != STALLED

    def _mic_condition(self) -> str:
        if self.muted:
            return MUTED  # closed on purpose: neither absent, stalled nor silent
        return self.mic_health.condition(self.capture.stats.open, time.monotonic())

    async def _watch_microphone(self) -> None:
        """A stall or silence shows without any event: look when the condition
        may change (every ~2 s while audio flows, no timer per hand-over)."""
        while True:
            await asyncio.sleep(max(self.mic_health.next_change(time.monotonic()), 0.25))
            self._judge_microphone()

    def _judge_microphone(self) -> None:
        condition = self._mic_condition()
        if condition == self._mic_reported:
            return
        if MUTED in (condition, self._mic_reported):  # closed on purpose, or opened again
            self._mic_reported = condition
            self._state_changed.set()
            return
        if condition in (STALLED, SILENT):
            log.warning("microphone.%s device=%s", condition, self.settings.audio.device)
        elif self._mic_reported in (STALLED, SILENT):
            log.info("microphone.recovered device=%s was=%s", self.settings.audio.device,
                     self._mic_reported)
        self._mic_reported = condition
        self._state_changed.set()
        self._audio_report_wanted.set()

    async def _publish_audio(self) -> None:
        """The audio telemetry, when it is due: on its interval, or when told
        (a level change, the microphone's condition, a new MQTT connection, a
        reload)."""
        while True:
            delay = None  # while MQTT is down, until the connection says so
            if self.publisher.connected:
                delay = max(self.audio_telemetry.due_in(time.monotonic()), 0.05)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._audio_report_wanted.wait()
            self._audio_report_wanted.clear()
            self._send_audio()

    def _mqtt_connected(self) -> None:
        """Each new connection, of any publisher: the retained reports again."""
        self._mqtt_sessions += 1
        self._audio_report_wanted.set()
        self._send_mute_state()

    def _send_audio(self) -> None:
        if not self.publisher.connected:
            return  # the window goes on: the next connection reports all of it
        now = time.monotonic()
        context = Context(self._mic_condition(), self.gain.db, self._mqtt_sessions)
        if self.audio_telemetry.due(context, now):
            self.publisher.publish_retained(self.publisher.topics.audio,
                                            self.audio_telemetry.report(context, now))

    async def _feed_watchdog(self, interval: float) -> None:
        # Runs on the event loop: if the loop is wedged, no ping goes out.
        # Fixed-rate deadlines, so the pings do not drift later and later.
        deadline = time.monotonic()
        while True:
            if self._healthy():
                self.notifier.send(WATCHDOG=1)
            deadline = max(deadline + interval, time.monotonic())
            await asyncio.sleep(deadline - time.monotonic())

    def _state_moving(self) -> bool:
        state = self._last_state
        return (state.get("status") not in ("streaming", "listening", MUTED)
                or not state.get("mqtt_connected") or bool(state.get("buffered_s"))
                or bool(state.get("outbox_depth")) or state.get("storage") != "ok")

    async def _retry_storage(self) -> None:
        """While the disk fails, try it again every `state_retry_s`; once it works, what
        memory holds (transcripts, the audio backlog) goes back on disk."""
        while True:
            await asyncio.sleep(min(self.storage.retry_s / 4, 5.0))
            if not self.storage.retry_due():
                continue
            if self.outbox.retry():
                self.publisher.fill()
            if self.spool.retry() and self.buffer.spooling:
                self.buffer.persist()
            await self.mute_flag.retry()
            self._changed()

    def _send_state(self) -> None:
        state = self.state()
        self._last_state = state
        # The counters of audio captured and sent move every second: they ride
        # along, but alone they re-publish the retained state once a minute.
        moving = {key: state.pop(key) for key in ("captured_s", "sent_s")}
        # A new broker connection (the broker may have lost the retained copy)
        # or a new client after a reload wants it again.
        fingerprint = f"{self.publisher.connects}:{id(self.publisher)}:" + json.dumps(state)
        self._send_mute_state()
        now = time.monotonic()
        if fingerprint == self._state_fingerprint and now - self._state_sent_at < STATE_HEARTBEAT_S:
            return
        payload = json.dumps({**state, **moving}, separators=(",", ":")).encode()
        if self.publisher.publish_state(payload):
            self._state_fingerprint, self._state_sent_at = fingerprint, now

    # -- privacy mute ---------------------------------------------------------------

    def set_muted(self, muted: bool, *, source: str) -> None:
        """Mute (or unmute) now; idempotent. From the moment of the call no
        captured audio enters the buffer and no new STT session starts; the
        microphone is released, the session closed (what was captured before
        is still sent and its finals published, within stt.close_timeout_s)
        and the flag persisted by `_follow_mute`, in that task's own time."""
        if muted == self.muted:
            log.info("privacy.%s source=%s unchanged=true", "muted" if muted else "unmuted",
                     loggable(source))
            return
        self.muted = muted
        if self._stopping:
            # `_follow_mute` may be gone before it gets to this: the flag is
            # written now (privacy first), the shutdown closes the rest.
            self.mute_flag.store_now(muted, source)
        if muted:
            self.session.close()  # at once: no new session from here on
        log.info("privacy.%s source=%s", "muted" if muted else "unmuted", loggable(source))
        self._source = source
        self._mute_changed.set()
        self._send_mute_state()
        self._changed()

    def _wire_publisher(self) -> None:
        """Each publisher (a new one after a reload) sends the retained reports
        on each of its connections (fleet control subscribes on its own)."""
        self.publisher.on_connected = self._mqtt_connected

    def _send_mute_state(self) -> None:
        """The retained `<base>/<device>/mute`, once per connection and change."""
        sent = (id(self.publisher), self.publisher.connects, self.muted)
        if sent != self._mute_sent and self.publisher.publish_retained(
                self.publisher.topics.mute, switch_state(self.muted)):
            self._mute_sent = sent

    async def _follow_mute(self) -> None:
        """Make the daemon what `self.muted` says, each change in turn: the flag
        on disk and the microphone and STT session at the same time (a disk that
        hangs must not keep a microphone open; a crash soon after must not
        forget a mute)."""
        while True:
            await self._mute_changed.wait()
            self._mute_changed.clear()
            muted = self.muted
            await asyncio.gather(self.mute_flag.store(muted, self._source),
                                 self._follow_audio(muted))
            self._changed()

    async def _follow_audio(self, muted: bool) -> None:
        async with self._audio_lock:
            if self.muted != muted:
                return  # changed again meanwhile: the next turn follows that
            if muted:
                await self._release_audio()
            else:
                await self._listen()

    async def _release_audio(self) -> None:
        """Close the microphone (a mic LED goes off) and the STT session: no
        connection at all while muted, and no reconnect loop."""
        if self._listening:
            self._listening = False
            await asyncio.to_thread(self.capture.stop)
        stt = self._stt_task
        if stt is None:
            return
        self.session.close()
        await self._wait_for_session(stt)
        self._stt_task = None
        self.buffer.rest()
        # A backlog from before the mute (the service was away) gets no more
        # appends to trigger the spool's once-a-second sync: durable now.
        self.spool.sync()
        log.info("privacy.released microphone_open=%s stt_state=%s",
                 str(self.capture.stats.open).lower(), self.session.stats.state)

    async def _wait_for_session(self, stt: asyncio.Task[None]) -> None:
        """The closing session sends what it has, then CloseStream, and waits
        for its last finals, within stt.close_timeout_s (a mute, a stop)."""
        done, _ = await asyncio.wait([stt], timeout=self.settings.stt.close_timeout_s)
        if not done:
            stt.cancel()
            log.warning("stt.close_timeout seconds=%.1f untranscribed_s=%.1f",
                        self.settings.stt.close_timeout_s,
                        samples_to_seconds(self.buffer.head - self.session.finals.acknowledged))
            await asyncio.wait([stt])

    async def _listen(self) -> None:
        """Open the microphone and a fresh session, continuing the stream."""
        stt = self._stt_task
        if self._stopping or (self._listening and stt is not None and not stt.done()
                              and not self.session.closing):
            return
        if stt is not None:
            # A mute taken back before its close was over: `set_muted` closed
            # the session at once, and its `run` ends; with the microphone
            # still open (`_release_audio` never ran) a new session must follow.
            await self._wait_for_session(stt)
            self._stt_task = None
        if self.muted or self._stopping:
            return  # muted again (or stopping) while it closed: the next turn follows
        assert self._tasks is not None
        self.session.resume()
        self._stt_task = self._tasks.create_task(self.session.run(), name="stt-session")
        if not self._listening:
            self.capture = self._make_capture(self.settings)
            self.capture.start()
            self._listening = True
        log.info("privacy.listening resume_from=%.3fs",
                 samples_to_seconds(self.session.finals.acknowledged))

    # -- lifecycle ----------------------------------------------------------------

    # -- SIGHUP: configuration reload -------------------------------------------------

    def request_reload(self) -> None:
        task = self.loop.create_task(self.reload(), name="config-reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def reload(self) -> ReloadOutcome:
        """Apply a new configuration, restarting only the parts it changes.

        Buffered audio and queued transcripts stay where they are: a new STT
        connection re-sends from the last final, a new MQTT client publishes
        what the outbox holds. A bad configuration is refused and the old one
        stays in force."""
        async with self._reloading:
            if self._stopping:  # a shutdown must not see capture or a client start again
                log.warning("config.reload_refused reason=stopping")
                return ReloadOutcome(refused="the daemon is stopping")
            self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
            try:
                return await self._reload()
            finally:
                self.notifier.send(READY=1, STATUS=self._status_text())

    async def _reload(self) -> ReloadOutcome:
        try:
            new = await asyncio.to_thread(self._load)
        except ConfigError as error:
            log.error("config.reload_refused keeping=current error=%s", loggable(error))
            return ReloadOutcome(refused=str(error))
        old = self.settings
        set_secrets(old.secrets + new.secrets)
        needs_restart = []
        if new.state_dir != old.state_dir:
            log.warning("config.reload state_dir=%s needs a restart; keeping %s",
                        loggable(new.state_dir), loggable(old.state_dir))
            new = new.model_copy(update={"state_dir": old.state_dir})
            needs_restart.append("state_dir")
        if new.vad != old.vad:
            log.warning("config.reload vad needs a restart; keeping the current vad settings")
            new = new.model_copy(update={"vad": old.vad})
            needs_restart.append("vad")
        changed = [name for name in Settings.model_fields
                   if getattr(new, name) != getattr(old, name)]
        if not changed:
            log.info("config.reload changed=none")
            return ReloadOutcome(needs_restart=needs_restart)
        try:
            await self._apply(new, old)
        except ConfigError as error:
            log.error("config.reload_refused keeping=current error=%s", loggable(error))
            return ReloadOutcome(refused=str(error))
        log.info("config.reloaded changed=%s", ",".join(changed))
        self._changed()
        return ReloadOutcome(changed, needs_restart=needs_restart)

    async def _apply(self, new: Settings, old: Settings) -> None:
        publisher = None
        if new.mqtt != old.mqtt or new.device != old.device:
            # First, as it may still refuse the configuration (TLS files).
            publisher = MqttPublisher(new, self.outbox, self.loop)
        self.settings = new
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
        if new.buffer != old.buffer:
            self.buffer.max_samples = new.buffer.max_seconds * SAMPLE_RATE
            self.spool.max_bytes = new.buffer.spool_max_mb * 1024 * 1024
            self.spool.keep_free_bytes = new.buffer.spool_keep_free_mb * 1024 * 1024
            self.spool.keep_free_ratio = new.buffer.spool_keep_free_percent / 100
            self.spool.enabled = new.buffer.spool_max_mb > 0
        self.storage.retry_s = new.state_retry_s
        self.mic_health.silent_after_s = new.audio.silent_after_s
        self._apply_audio_levels(new)
        if new.audio.reopens_device(old.audio) or new.stt.frame_ms != old.stt.frame_ms:
            async with self._audio_lock:  # not while a mute opens or closes it
                await asyncio.to_thread(self.capture.stop)
                self.capture = self._make_capture(new)
                if self._listening and not self.muted:  # a muted microphone stays closed
                    self.capture.start()
                else:  # (a mute not yet carried out: it stays closed from now)
                    self._listening = False
        self.session.reconfigure(new)
        if new.metrics != old.metrics:
            self._stop_metrics()
            self._start_metrics()
        if publisher is not None:
            publisher.on_delivered = self.metrics.latency.observe if self.metrics else None
            moved = (new.device.id, new.mqtt.discovery_prefix, new.mqtt.base_topic) != (
                old.device.id, old.mqtt.discovery_prefix, old.mqtt.base_topic)
            if old.mqtt.discovery and (moved or not new.mqtt.discovery):
                self.publisher.retract_discovery()  # entities that are going away
            await self.publisher.stop(within_s=1.0)
            self.publisher = publisher
            self._wire_publisher()
        else:
            self.publisher.reconfigure(new)
        for follow in self.reconfigured:
            follow()
        if publisher is not None:
            self.publisher.start()

    def _apply_audio_levels(self, new: Settings) -> None:
        """Gain and telemetry settings, applied to the running capture: the
        next hand-off is scaled by the new gain, nothing is dropped."""
        if new.audio.gain_db != self.gain.db:
            self.gain = Gain(new.audio.gain_db)
            self._audio_report_wanted.set()  # the telemetry says the gain
        self.audio_telemetry.interval_s = new.audio.level_interval_s
        self.audio_telemetry.change_db = new.audio.level_change_db

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("shutdown.requested reason=%s", reason)
        self._stop.set()

    async def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        self.loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info("edged.start version=%s device=%s", __version__, self.settings.device.id)
        self.publisher.start()
        if not self.muted:  # a muted daemon never opens the microphone
            self.capture.start()
            self._listening = True
        self._start_metrics()
        await self.monitor.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                if self._listening:
                    self._stt_task = tasks.create_task(self.session.run(), name="stt-session")
                else:
                    self._changed()  # ready, and STATUS says muted
                background = [tasks.create_task(self._publish_state(), name="state-publisher"),
                              tasks.create_task(self._retry_storage(), name="storage-retry"),
                              tasks.create_task(self._watch_microphone(), name="microphone"),
                              tasks.create_task(self._publish_audio(), name="audio-telemetry"),
                              tasks.create_task(self._follow_mute(), name="privacy-mute")]
                if self.notifier.watchdog_interval_s:
                    background.append(tasks.create_task(
                        self._feed_watchdog(self.notifier.watchdog_interval_s), name="watchdog"))
                await self._stop.wait()
                await self._shutdown()
                for task in background:
                    task.cancel()
        except BaseException:
            # A bug took a task down: what memory holds still goes to disk,
            # for the restart systemd is about to make.
            self._keep_for_next_start()
            raise
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(signum)
            await self.monitor.stop()
        await self.publisher.stop(self.settings.mqtt.drain_timeout_s)
        self._keep_for_next_start()
        self._stop_metrics()
        self.notifier.close()
        return self._exit_status()

    def _keep_for_next_start(self) -> None:
        """The transcription point, and the audio not yet transcribed, to disk:
        the next start replays from there."""
        self.outbox.close()
        self.buffer.persist()
        self.spool.close()

    async def _shutdown(self) -> None:
        self._stopping = True
        self.notifier.send(STOPPING=1, STATUS="stopping: sending the last audio and finals")
        for stop in self.stopping:
            stop()
        async with self._reloading:
            pass  # a reload under way finishes first; any later one is refused
        async with self._audio_lock:  # a mute or unmute under way finishes first
            self.capture.stop()
            self.session.close()
            if self._stt_task is not None:  # none while muted
                await self._wait_for_session(self._stt_task)
        self._send_state()

    def _exit_status(self) -> int:
        if self._fatal is None:
            log.info("edged.stop status=0")
            return 0
        status = self._fatal.exit_status if isinstance(self._fatal, EdgedError) else 1
        log.error("edged.fatal status=%d error=%s", status, loggable(self._fatal))
        return status


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


async def run_daemon(load: Callable[[], Settings], inspect: LoadConfig | None = None) -> int:
    """Run until SIGTERM/SIGINT; `load` gives the settings, at start and on SIGHUP;
    `inspect` loads them as check-config does, for fleet control (edged.control)."""
    daemon = Daemon(load, asyncio.get_running_loop())
    if inspect is None:
        return await daemon.run()
    from edged.control.service import Control

    control = Control(daemon, inspect)
    control.attach()  # before the publisher starts: its first connection subscribes
    try:
        return await daemon.run()
    finally:
        await control.close()
