"""The STT session: one WebSocket at a time to the service, for the daemon's life.

The asyncio adapter around `edged.stt.protocol`. It sends buffered audio as
binary frames, turns text frames into finals placed in stream time, and when
a connection is lost it reconnects (tenacity) and re-sends from the end of
the last final, so nothing captured goes untranscribed and nothing is
transcribed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from edged.audio.buffer import AudioBuffer
from edged.audio.vad import SpeechGate
from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, Settings
from edged.errors import (
    SttAuthError,
    SttError,
    SttRateLimited,
    SttRejectedError,
    SttTransientError,
)
from edged.stt.policy import retry_delay, status_error
from edged.stt.protocol import (
    Final,
    FinalFilter,
    MalformedFrame,
    OtherMessage,
    ReplayPacer,
    SessionTimeline,
    TranscriptMessage,
    listen_url,
    looks_partial,
    parse_frame,
    place_final,
    samples_to_seconds,
)
from edged.untrusted import loggable

log = logging.getLogger("edged.stt")

MAX_FRAME_BYTES = SAMPLE_RATE * SAMPLE_WIDTH // 4  # 250 ms: the protocol's largest frame
RECV_BYTES = 16 * 1024  # per read from the socket; see _read_in_small_buffers
STABLE_SESSION_S = 30.0  # a session that lived this long resets the backoff
# A close from the service after this long without audio is an idle timeout:
# services finalise within about a second of the last audio they get.
IDLE_CLOSE_QUIET_S = 2.0


@dataclass
class SttStats:
    state: str = "connecting"  # connecting|connected|disconnected|auth_failed|rejected|closed
    sessions: int = 0
    reconnects: int = 0
    finals: int = 0
    malformed_frames: int = 0
    sent_samples: int = 0
    reconnect_causes: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


class SttSession:
    def __init__(
        self,
        settings: Settings,
        buffer: AudioBuffer,
        on_final: Callable[[Final | None, int], None],
        on_change: Callable[[], None] = lambda: None,
        on_partial: Callable[[str, int, int], None] | None = None,
        gate: SpeechGate | None = None,
    ):
        self.settings = settings
        self.buffer = buffer
        self.stats = SttStats()
        self.url = listen_url(settings.stt.url, settings.stt.provider, settings.stt.params)
        self.finals = FinalFilter()
        self._on_final = on_final
        self._on_change = on_change
        self._on_partial = on_partial
        self.gate = gate  # with voice-activity gating: send only what it marks
        # With gating: the last speech heard when the service closed a session
        # by itself (see _speech_pending); None while that is not the case.
        self._speech_when_closed_on: int | None = None
        self._audio = asyncio.Event()
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()  # cuts a backoff short: closing or reconfigured
        self._connection: ClientConnection | None = None
        self._reconfigured = False
        self._tls: tuple[Path | None, ssl.SSLContext] | None = None
        self._failures = 0  # consecutive, for the backoff
        self._resumed = False  # the next session follows a mute, not a lost connection
        self._last_sent = 0.0  # monotonic time of the last frame of any kind
        self._last_audio_sent = 0.0  # of the last audio frame

    @property
    def _frame_bytes(self) -> int:
        """Live audio goes out once this much is in: fewer, larger frames cost
        less CPU on both ends; smaller ones bring finals a little sooner."""
        return SAMPLE_RATE * SAMPLE_WIDTH * self.settings.stt.frame_ms // 1000

    # -- called by the supervisor -------------------------------------------

    def audio_arrived(self) -> None:
        self._audio.set()

    def close(self) -> None:
        """Finish: send what is buffered, then the close message, then wait for the
        last finals and the service's close. `run` returns after; the caller
        bounds the wait (`stt.close_timeout_s`)."""
        self._closing.set()
        self._wake.set()
        self._audio.set()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def resume(self) -> None:
        """Be ready to `run` again after a `close` has finished (a privacy mute
        ended): the stream, its de-duplication and the counters carry on; the
        session that follows is a fresh start, not a reconnect."""
        self._closing.clear()
        self._wake.clear()
        self._failures = 0
        self._resumed = True
        self.stats.state = "connecting"

    def reconfigure(self, settings: Settings) -> None:
        """Use new settings; reconnect now if the STT ones changed (buffered
        audio is re-sent from the last final, as after any lost connection)."""
        changed = settings.stt != self.settings.stt
        self.settings = settings
        self.url = listen_url(settings.stt.url, settings.stt.provider, settings.stt.params)
        if not changed:
            return
        self._reconfigured = True
        self._wake.set()  # a new key or URL should not wait out an old backoff
        if self._connection is not None:
            self._connection.transport.abort()

    async def run(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SttError),
            wait=self._backoff,
            sleep=self._sleep,
            before_sleep=self._report_failure,
        )
        async for attempt in retrying:
            with attempt:
                if self._closing.is_set():
                    break
                if self.gate is not None and not await self._speech_to_send():
                    break  # closing while waiting
                await self._session()
        self.stats.state = "closed"

    async def _speech_to_send(self) -> bool:
        """With gating, connect only when there is speech to send: a session
        the service closed for idleness comes back when someone talks."""
        assert self.gate is not None
        if not self._speech_pending():
            self.stats.state = "idle"
            self._on_change()
        while not self._speech_pending():
            if self._closing.is_set():
                return False
            # Silence is settled: it needs no session, and no disk either.
            self.buffer.skip_silence(self.gate.silence_until())
            self._audio.clear()
            await self._audio.wait()
        return not self._closing.is_set()

    def _speech_pending(self) -> bool:
        """Whether gated audio waits to be sent: a span of speech (with its
        pre-roll and hang-over) past the transcription point, unless the
        service closed the last session for idleness (a close frame after
        `IDLE_CLOSE_QUIET_S` without audio) and nobody has spoken since. What
        is pending then was heard by the service, which gave no final for it:
        the hang-over after the last words. Sent again at once, it would only
        be closed on again, every idle timeout for as long as the silence
        lasts; it goes with the next speech instead (a word the service did
        hear and never finalised waits for that too: delayed, never lost)."""
        assert self.gate is not None
        if self.gate.next_sendable(max(self.finals.acknowledged, self.buffer.oldest)) is None:
            return False
        heard = self._speech_when_closed_on
        return heard is None or self.gate.last_speech_end > heard

    # -- one connection ------------------------------------------------------

    async def _session(self) -> None:
        self._reconfigured = False
        connection = await self._connect()
        _read_in_small_buffers(connection)
        self._connection = connection
        if self._reconfigured:  # settings changed while we were connecting
            connection.transport.abort()
        opened_at = time.monotonic()
        finals_before = self.stats.finals
        self.stats.sessions += 1
        if self.stats.sessions > 1 and not self._resumed:
            self.stats.reconnects += 1
        self._resumed = False
        self.stats.state = "connected"
        self.stats.last_error = None
        self._speech_when_closed_on = None
        self.buffer.session_opened()
        timeline = SessionTimeline()
        start = max(self.finals.acknowledged, self.buffer.oldest)
        log.info("stt.connected session=%d resend_from=%.3fs backlog=%.1fs",
                 self.stats.sessions, samples_to_seconds(start),
                 samples_to_seconds(self.buffer.head - start))
        self._on_change()
        lost: SttError | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send(connection, timeline, start), name="stt-send")
                tasks.create_task(self._receive(connection, timeline), name="stt-receive")
                tasks.create_task(self._keep_alive(connection), name="stt-keepalive")
        except* (ConnectionClosed, SttError) as group:
            lost = _lost_connection(group.exceptions[0])
        finally:
            self._connection = None
            if (self.gate is not None and connection.protocol.close_rcvd is not None
                    and time.monotonic() - self._last_audio_sent >= IDLE_CLOSE_QUIET_S):
                # The service closed the session (a close frame, not a lost
                # connection) after a quiet while: an idle timeout. What it was
                # sent it has heard, with time to give its finals.
                self._speech_when_closed_on = self.gate.last_speech_end
            await connection.close()
            self.buffer.session_lost(self.finals.acknowledged)
            # A session that delivered a final, or lived a while, proved the
            # path works: the next failure starts the backoff afresh.
            if (self.stats.finals > finals_before
                    or time.monotonic() - opened_at >= STABLE_SESSION_S):
                self._failures = 0
            self.stats.state = "closed" if self._closing.is_set() else "disconnected"
            self._on_change()
        if self._reconfigured and not self._closing.is_set():
            raise SttTransientError("reconnecting with new settings")
        if lost is not None and not self._closing.is_set():
            raise lost

    async def _connect(self) -> ClientConnection:
        stt = self.settings.stt
        try:
            return await connect(
                self.url,
                ssl=self._tls_context(),
                additional_headers=request_headers(self.settings),
                open_timeout=stt.connect_timeout_s,
                ping_interval=stt.ping_interval_s,  # notices a half-open connection
                ping_timeout=stt.ping_interval_s,
                close_timeout=stt.close_timeout_s,
                compression=None,  # PCM does not compress; deflate only burns CPU
                max_size=1 << 20,
            )
        except InvalidStatus as error:
            response = error.response
            raise status_error(response.status_code, response.headers) from None
        except InvalidURI as error:
            raise SttTransientError(f"invalid URL: {error}") from None
        except (OSError, TimeoutError, InvalidHandshake) as error:
            raise SttTransientError(f"cannot connect: {error or type(error).__name__}") from None

    def _tls_context(self) -> ssl.SSLContext | None:
        """Certificates are always verified: against stt.ca_file, else the system CAs."""
        if not self.url.startswith("wss:"):
            return None
        ca_file = self.settings.stt.ca_file
        if self._tls is None or self._tls[0] != ca_file:
            try:
                context = tls_context(ca_file)
            except (OSError, ssl.SSLError) as error:
                raise SttRejectedError(f"cannot load stt.ca_file: {error}") from None
            self._tls = (ca_file, context)
        return self._tls[1]

    async def _send(
        self, connection: ClientConnection, timeline: SessionTimeline, cursor: int
    ) -> None:
        pacer = ReplayPacer(self.settings.stt.replay_speed)
        while True:
            self._audio.clear()
            cursor, limit, tail = self._sendable(cursor)
            unsent_bytes = (limit - cursor) * SAMPLE_WIDTH
            closing = self._closing.is_set()
            if unsent_bytes < self._frame_bytes and not ((closing or tail) and unsent_bytes > 0):
                if closing:
                    # The service answers with its last finals, then closes.
                    # The supervisor bounds how long we wait for that.
                    await connection.send(self.settings.stt.close_message)
                    await connection.wait_closed()
                    if connection.close_code == 1000:
                        # A clean close after CloseStream: the service has sent
                        # every final for what it got, so all of it is done.
                        self.finals.acknowledged = max(self.finals.acknowledged,
                                                       timeline.stream_position)
                        self._on_final(None, self.finals.acknowledged)
                        self.buffer.acknowledge(self.finals.acknowledged)
                    return
                await self._audio.wait()
                continue
            piece = self.buffer.read(cursor, min(MAX_FRAME_BYTES, unsent_bytes))
            seconds = samples_to_seconds(piece.samples)
            delay = pacer.delay_before(time.monotonic(), seconds)
            if delay > 0:
                await asyncio.sleep(delay)
            await connection.send(piece.data)
            self._last_sent = self._last_audio_sent = time.monotonic()
            self.stats.sent_samples += piece.samples
            pacer.sent(seconds)
            timeline.record_send(piece.start, piece.samples)
            cursor = piece.end
            self.buffer.mark_sent(cursor)

    async def _keep_alive(self, connection: ClientConnection) -> None:
        """Nothing sent for `vad.keepalive_s` (silence not sent, or a quiet
        microphone): services close a session that idles ~10 s, so say we are
        here. A task of its own that wakes once per interval, rather than a
        timeout around every wait for audio (a timer set and cancelled on each
        frame). It ends with the connection, and sends nothing once closing."""
        self._last_sent = time.monotonic()
        while not self._closing.is_set():
            quiet_for = time.monotonic() - self._last_sent
            if quiet_for < self.settings.vad.keepalive_s:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.vad.keepalive_s - quiet_for):
                        await connection.wait_closed()
                        return
                continue
            await connection.send(self.settings.vad.keepalive_message)
            self._last_sent = time.monotonic()

    def _sendable(self, cursor: int) -> tuple[int, int, bool]:
        """(new cursor, end of what may be sent now, whether that end is final).

        Without gating everything captured may be sent. With it, settled
        silence is skipped (it still counts in stream time) and only speech
        (with its pre-roll and hang-over) goes out; the end of an utterance is
        sent even when shorter than a frame."""
        if self.gate is None:
            return cursor, self.buffer.head, False
        span = self.gate.next_sendable(cursor)
        skip_to = self.gate.silence_until() if span is None else span[0]
        if skip_to > cursor:
            cursor = skip_to
            self.buffer.mark_sent(cursor)  # skipped, not lost
        if span is None:
            return cursor, cursor, False
        end = min(span[1], self.buffer.head)
        finished = span[1] < self.gate.judged  # the utterance (and hang-over) is over
        return cursor, end, finished

    async def _receive(self, connection: ClientConnection, timeline: SessionTimeline) -> None:
        """Read frames until the connection ends; raises if the service ended it.

        Every frame goes through `parse_frame`, which turns anything not
        well-formed (or timed outside the audio sent) into a MalformedFrame
        value: nothing the service sends can raise out of here, and only a
        frame that passed the gate reaches the de-duplication point."""
        async for message in connection:
            if not self.settings.mqtt.partials and looks_partial(message):
                continue  # the most frequent frame, and nobody wants it: skip the parse
            frame = parse_frame(message, timeline.sent_samples)
            if isinstance(frame, TranscriptMessage):
                if not frame.is_partial:
                    self._final(frame, timeline)
                elif self._on_partial is not None:
                    self._on_partial(frame.transcript,
                                     *timeline.place(frame.start_time, frame.end_time))
            elif isinstance(frame, MalformedFrame):
                self._malformed(frame)
            else:
                self._other(frame)
        if not self._closing.is_set():
            # A clean close we did not ask for (idle timeout, server restart):
            # the sender may be waiting for audio, so end the session here.
            raise SttTransientError(
                f"closed by the service: code {connection.close_code} {connection.close_reason}"
            )

    def _final(self, message: TranscriptMessage, timeline: SessionTimeline) -> None:
        final = self.finals.accept(place_final(message, timeline))
        # Committed (the final with the point it moves to) before any of its
        # audio is released: a crash in between re-sends, never loses.
        self._on_final(final, self.finals.acknowledged)
        self.buffer.acknowledge(self.finals.acknowledged)
        if self.gate is not None:
            self.gate.forget_before(self.finals.acknowledged)
        if final is not None:
            self.stats.finals += 1

    def _malformed(self, frame: MalformedFrame) -> None:
        self.stats.malformed_frames += 1
        count = self.stats.malformed_frames
        if count <= 3 or count % 100 == 0:  # rate-limited: a bad peer must not flood
            log.warning("stt.malformed_frame count=%d reason=%s frame=%s",
                        count, loggable(frame.reason), frame.excerpt)
            self._on_change()  # and the state says so

    def _other(self, frame: OtherMessage) -> None:
        if frame.type == "error":
            message = frame.body.get("message", frame.body)
            log.warning("stt.service_error message=%s", loggable(message))
        else:
            log.debug("stt.message type=%s", loggable(frame.type))

    # -- reconnect policy ------------------------------------------------------

    def _backoff(self, state: RetryCallState) -> float:
        self._failures += 1
        return retry_delay(state.outcome.exception() if state.outcome else None, self._failures)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _report_failure(self, state: RetryCallState) -> None:
        self.buffer.go_offline()  # also when no session was ever up
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        self.stats.last_error = f"stt: {error}"
        cause = _cause(error)
        self.stats.reconnect_causes[cause] = self.stats.reconnect_causes.get(cause, 0) + 1
        if isinstance(error, SttAuthError):
            self.stats.state = "auth_failed"
            log.error("stt.auth_failed retry_in=%.0fs error=%s", delay, loggable(error))
        elif isinstance(error, SttRejectedError):
            self.stats.state = "rejected"
            log.error("stt.rejected retry_in=%.0fs error=%s", delay, loggable(error))
        elif self.stats.sessions == 0:
            # Never connected yet (service down at boot, a wrong URL): not a
            # lost connection, and the log and the state say so.
            self.stats.state = "connecting"
            log.warning("stt.connect_failed retry_in=%.2fs error=%s", delay, loggable(error))
        else:
            self.stats.state = "disconnected"
            log.warning("stt.disconnected retry_in=%.2fs error=%s", delay, loggable(error))
        self._on_change()


def request_headers(settings: Settings) -> dict[str, str]:
    """The handshake's extra headers: the API key, when there is one."""
    return {"x-api-key": settings.api_key} if settings.api_key else {}


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """What wss:// connections verify against: `ca_file` when set, else the
    system's CAs. Raises OSError or ssl.SSLError for a bad file."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def _read_in_small_buffers(connection: ClientConnection) -> None:
    """CPython's asyncio reads each arrival with `recv(256 KiB)` (and, over
    TLS, `SSLObject.read(256 KiB)`): allocating that much for a few hundred
    bytes of JSON costs 19 us a read here against 3 us for 16 KiB, on every
    partial transcript. What the service sends is small, and a bigger frame
    just takes a few reads. `max_size` is the transports' own attribute for
    this; where it is missing we leave it be."""
    transport = connection.transport
    for reader in (transport, getattr(transport, "_ssl_protocol", None)):
        if isinstance(getattr(reader, "max_size", None), int):
            reader.max_size = RECV_BYTES  # type: ignore[union-attr]


def _cause(error: BaseException | None) -> str:
    if isinstance(error, SttAuthError):
        return "auth"
    if isinstance(error, SttRejectedError):
        return "rejected"
    if isinstance(error, SttRateLimited):
        return "rate_limited"
    return "network"


def _lost_connection(error: BaseException) -> SttError:
    if isinstance(error, SttError):
        return error
    assert isinstance(error, ConnectionClosed)
    code = error.rcvd.code if error.rcvd else 1006
    reason = error.rcvd.reason if error.rcvd else "no close frame"
    return SttTransientError(f"connection lost: code {code} {reason}".strip())


