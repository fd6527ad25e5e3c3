"""A test double of router.audio's streaming API, over real WebSockets.

It speaks the real protocol (path, query, x-api-key, binary audio in, JSON
transcripts out with session-relative times, CloseStream) and recognises the
tone language of `tonespeech`, so its transcripts carry true times. Faults
are injected on demand: abrupt drops, refused connects, malformed or scripted
frames, and connections that go silent while TCP stays up (`freeze_connections`).

It runs its own event loop in a thread, so tests drive it from plain code
while the daemon under test runs as a separate process.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.support.tonespeech import HeardWord, ToneRecognizer


@dataclass
class SessionRecord:
    query: dict[str, list[str]]
    api_key: str | None
    opened_at: float = 0.0  # time.monotonic() of the handshake
    bytes_received: int = 0
    audio: bytearray = field(default_factory=bytearray)  # with keep_audio: every byte, in order
    frame_sizes: list[int] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)  # time.monotonic() of each frame
    finals_sent: int = 0
    finals_on_close: int = 0  # of finals_sent: those the CloseStream flushed out
    close_stream_received: bool = False
    keepalives: int = 0
    closed_idle: bool = False


@dataclass
class Faults:
    """What the next connections should suffer. Tests change these at will."""

    # HTTP status to refuse the next N handshakes with (e.g. 503, 429, 401).
    refuse_status: int | None = None
    refuse_count: int = 0
    retry_after: str | None = None
    # Drop a session abruptly (no close frame) after this many audio bytes.
    drop_after_bytes: list[int] = field(default_factory=list)
    # Close a session cleanly (code 1000) after this many audio bytes, unasked.
    close_after_bytes: list[int] = field(default_factory=list)
    # Close a session that receives nothing (no audio, no KeepAlive) this long,
    # as Deepgram does (1011, NET-0001).
    idle_timeout_s: float | None = None
    # Send a malformed frame after each final.
    malformed_after_final: bool = False
    # Send these frames (text or binary), once, after the next audio frame
    # received: whatever a broken or hostile service might say.
    scripted_frames: list[str | bytes] = field(default_factory=list)
    # Answer every audio frame with this many extra finals of one synthetic
    # word, in equal consecutive slices of the frame's time (meant for silence:
    # they would overlap the tone language's own finals).
    finals_per_frame: int = 0


class SttDouble:
    def __init__(self, api_key: str | None = "test-key-123", host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None):
        self.api_key = api_key
        self.host = host
        self.tls = tls
        self.port = 0
        self.faults = Faults()
        # Keep what each session received (`SessionRecord.audio`): off, as a
        # benchmark streams hours of audio through the double.
        self.keep_audio = False
        self.sessions: list[SessionRecord] = []
        self.refused = 0
        self.refused_at: list[float] = []  # time.monotonic() of every refused handshake
        self.finals_sent_at: list[float] = []  # time.monotonic() of every final sent
        self._frozen: list[asyncio.Transport] = []
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host}:{self.port}/v1/listen"

    def start(self) -> SttDouble:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(10)
        return self

    async def _start(self) -> int:
        self._server = await serve(
            self._handle, self.host, 0, process_request=self._check_request, compression=None,
            ssl=self.tls,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            for transport in self._frozen:  # they would not answer a closing handshake
                transport.abort()
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def abort_connections(self) -> None:
        """Drop every open session without a close frame, as a dead network does."""
        async def abort() -> None:
            assert self._server is not None
            for connection in list(self._server.connections):
                connection.transport.abort()

        asyncio.run_coroutine_threadsafe(abort(), self._loop).result(5)

    def freeze_connections(self) -> None:
        """Every open session goes silent with its TCP connection still up, as
        behind a NAT that lost its mapping: nothing is read any more (so no
        ping is answered), nothing is sent. New connections work as usual."""
        async def freeze() -> None:
            assert self._server is not None
            for connection in list(self._server.connections):
                connection.transport.pause_reading()
                self._frozen.append(connection.transport)

        asyncio.run_coroutine_threadsafe(freeze(), self._loop).result(5)

    # -- handshake -------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        if parts.path != "/v1/listen":
            return _response(HTTPStatus.NOT_FOUND, "no such endpoint")
        if self.faults.refuse_count > 0 and self.faults.refuse_status:
            self.faults.refuse_count -= 1
            self.refused += 1
            self.refused_at.append(time.monotonic())
            headers = {"Retry-After": self.faults.retry_after} if self.faults.retry_after else {}
            return _response(HTTPStatus(self.faults.refuse_status), "refused by test", headers)
        # The service takes the key in the query too.
        api_key = request.headers.get("x-api-key") or query.get("api_key", [None])[0]
        if self.api_key is not None and api_key != self.api_key:
            self.refused += 1
            self.refused_at.append(time.monotonic())
            return _response(HTTPStatus.UNAUTHORIZED, "invalid API key")
        if query.get("encoding") != ["pcm_s16le"] or query.get("sample_rate") != ["16000"]:
            return _response(HTTPStatus.BAD_REQUEST, "unsupported audio format")
        self.sessions.append(SessionRecord(query, api_key, opened_at=time.monotonic()))
        return None

    # -- a session -------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        record = self.sessions[-1]
        provider = record.query.get("provider", ["test"])[0]
        recognizer = ToneRecognizer()
        drop_at = self.faults.drop_after_bytes.pop(0) if self.faults.drop_after_bytes else None
        close_at = self.faults.close_after_bytes.pop(0) if self.faults.close_after_bytes else None
        await connection.send(json.dumps({"type": "Metadata", "request_id": "test"}))
        while True:
            try:
                message = await asyncio.wait_for(connection.recv(), self.faults.idle_timeout_s)
            except TimeoutError:
                record.closed_idle = True
                await connection.close(1011, "NET-0001: no audio received")
                return
            except ConnectionClosed:
                return
            if isinstance(message, bytes):
                if not message:
                    raise AssertionError("client sent an empty audio frame")
                record.bytes_received += len(message)
                if self.keep_audio:
                    record.audio += message
                record.frame_sizes.append(len(message))
                scripted, self.faults.scripted_frames = self.faults.scripted_frames, []
                for frame in scripted:
                    await connection.send(frame)
                record.frame_times.append(time.monotonic())
                for utterance in recognizer.feed(message):
                    await self._send_final(connection, record, provider, utterance)
                slices = self.faults.finals_per_frame
                for index in range(slices):
                    start = (record.bytes_received - len(message)) / 32000
                    size = len(message) / 32000 / slices
                    word = HeardWord("lorem", start + index * size, start + (index + 1) * size)
                    await self._send_final(connection, record, provider, [word])
                if recognizer.partial:
                    await connection.send(_transcript(provider, recognizer.partial, partial=True))
                if drop_at is not None and record.bytes_received >= drop_at:
                    connection.transport.abort()  # no close frame: a dead network
                    return
                if close_at is not None and record.bytes_received >= close_at:
                    await connection.close(1000, "idle")
                    return
            elif json.loads(message).get("type") == "KeepAlive":
                record.keepalives += 1
            elif json.loads(message).get("type") == "CloseStream":
                record.close_stream_received = True
                for utterance in recognizer.flush():
                    await self._send_final(connection, record, provider, utterance)
                    record.finals_on_close += 1
                await connection.close()
                return

    async def _send_final(self, connection: ServerConnection, record: SessionRecord,
                          provider: str, words: list[HeardWord]) -> None:
        await connection.send(_transcript(provider, words, partial=False))
        self.finals_sent_at.append(time.monotonic())
        record.finals_sent += 1
        if self.faults.malformed_after_final:
            await connection.send('{"type": "transcript", "transcript": 42')  # truncated


def _transcript(provider: str, words: list[HeardWord], *, partial: bool) -> str:
    return json.dumps({
        "type": "transcript",
        "provider": provider,
        "transcript": " ".join(word.text for word in words).capitalize() + ".",
        "start_time": round(words[0].start, 4),
        "end_time": round(words[-1].end, 4),
        "is_partial": partial,
        "words": [
            {"text": w.text, "start_time": round(w.start, 4), "end_time": round(w.end, 4),
             "speaker": None}
            for w in words
        ],
    })


def _response(status: HTTPStatus, body: str, headers: dict[str, str] | None = None) -> Response:
    all_headers = Headers({"Content-Type": "text/plain", **(headers or {})})
    return Response(status.value, status.phrase, all_headers, body.encode())
