"""A router.audio-compatible streaming speech-to-text server backed by PocketSphinx.

It speaks the protocol of the design document ("The STT protocol" section):
``/v1/listen`` over WebSocket, binary frames of 16 kHz s16le mono audio in,
JSON transcripts out, ``{"type": "CloseStream"}`` to finish. It is meant for
demos and as a real-recognition peer in tests, not as a production service.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hmac
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websockets_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edged.localstt.recognizer import BYTES_PER_SAMPLE, SAMPLE_RATE, StreamingRecognizer, Utterance
from edged.untrusted import loggable

logger = logging.getLogger("edged.localstt")

LISTEN_PATH = "/v1/listen"
DEFAULT_PROVIDER = "pocketsphinx"
# Query parameters that must have this value if present: the recogniser
# understands nothing else.
REQUIRED_PARAMS = {"encoding": "pcm_s16le", "sample_rate": "16000"}
# Idle recognisers kept for later connections: each holds a loaded model
# (a few tens of MB), and loading one takes ~0.3 s.
MAX_IDLE_RECOGNIZERS = 4
# Audio chunks buffered per connection before the reader stops reading, which
# pushes back on the client through TCP (~1 min of 250 ms frames).
MAX_QUEUED_CHUNKS = 256
# Stream seconds between two partial transcripts: enough to show progress
# without sending a message per 30 ms frame.
PARTIAL_INTERVAL_S = 0.5
# Longest client-supplied string echoed back in messages.
MAX_ECHO_CHARS = 80

_T = TypeVar("_T")


class _Control(enum.Enum):
    FLUSH = enum.auto()  # CloseStream: finish up, send the last finals, close
    STOP = enum.auto()  # the client closed without CloseStream: just stop


class _RecognizerPool:
    """Idle recognisers, so a connection does not wait for a model to load.

    Used from the event loop thread only, so no locking.
    """

    def __init__(self, max_idle: int = MAX_IDLE_RECOGNIZERS) -> None:
        self._idle: list[StreamingRecognizer] = []
        self._max_idle = max_idle

    async def prewarm(self) -> None:
        self._idle.append(await asyncio.to_thread(StreamingRecognizer))

    async def acquire(self) -> StreamingRecognizer:
        if self._idle:
            return self._idle.pop()
        return await asyncio.to_thread(StreamingRecognizer)

    async def release(self, recognizer: StreamingRecognizer) -> None:
        # The decoder keeps its channel adaptation (see StreamingRecognizer),
        # which helps the next connection from the same kind of microphone.
        await asyncio.to_thread(recognizer.reset)
        if len(self._idle) < self._max_idle:
            self._idle.append(recognizer)


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def _key_matches(presented: list[str], api_key: str) -> bool:
    if len(presented) != 1:
        return False
    # Header values are str decoded with surrogateescape; compare as bytes
    # because compare_digest only accepts ASCII str.
    return hmac.compare_digest(
        presented[0].encode(errors="surrogateescape"), api_key.encode(errors="surrogateescape")
    )


def check_request(request: Request, api_key: str | None) -> tuple[HTTPStatus, str] | None:
    """Return the HTTP error for a handshake request, or None to accept it."""
    url = urlsplit(request.path)
    if url.path != LISTEN_PATH:
        return HTTPStatus.NOT_FOUND, f"Not found: this server only serves {LISTEN_PATH}\n"
    # Authentication comes before parameter checks so that unauthenticated
    # clients learn nothing about what the server accepts.
    if api_key is not None and not _key_matches(request.headers.get_all("x-api-key"), api_key):
        return HTTPStatus.UNAUTHORIZED, "Missing or invalid x-api-key header\n"
    query = parse_qs(url.query, keep_blank_values=True)
    for name, required in REQUIRED_PARAMS.items():
        for value in query.get(name, []):
            if value != required:
                body = f"Unsupported {name}={_truncate(value)!r}: only {name}={required} works\n"
                return HTTPStatus.BAD_REQUEST, body
    return None


def _provider(request: Request) -> str:
    values = parse_qs(urlsplit(request.path).query).get("provider")
    return _truncate(values[0]) if values else DEFAULT_PROVIDER


def transcript_message(provider: str, utterance: Utterance) -> dict[str, Any]:
    """The protocol's final transcript message for one utterance."""
    return {
        "type": "transcript",
        "provider": provider,
        "transcript": utterance.text,
        "start_time": utterance.start_time,
        "end_time": utterance.end_time,
        "is_partial": False,
        "words": [
            {
                "text": word.text,
                "start_time": word.start_time,
                "end_time": word.end_time,
                "speaker": None,
            }
            for word in utterance.words
        ],
    }


def _partial_message(provider: str, text: str, start: float, end: float) -> dict[str, Any]:
    return {
        "type": "transcript",
        "provider": provider,
        "transcript": text,
        "start_time": round(start, 3),
        "end_time": round(end, 3),
        "is_partial": True,
        "words": [],
    }


def _parse_control(message: str) -> str:
    """Return the type of a client text message; ValueError says what is wrong."""
    try:
        payload = json.loads(message)
    except ValueError:
        raise ValueError("text frames must be JSON") from None
    kind = payload.get("type") if isinstance(payload, dict) else None
    if not isinstance(kind, str):
        raise ValueError('text frames must be JSON objects with a string "type"')
    return kind


class _Session:
    """One client connection: a reader task feeding a recognition worker task.

    The queue between them keeps the audio in order while recognition runs in
    a thread, so the event loop keeps answering pings and other clients.
    """

    def __init__(
        self,
        connection: ServerConnection,
        recognizer: StreamingRecognizer,
        provider: str,
        send_partials: bool,
    ) -> None:
        self._connection = connection
        self._recognizer = recognizer
        self._provider = provider
        self._send_partials = send_partials
        self._queue: asyncio.Queue[bytes | _Control] = asyncio.Queue(MAX_QUEUED_CHUNKS)
        self._closing = False
        self._last_partial: tuple[str, float] | None = None
        self.bytes_received = 0
        # True while a thread is using the recogniser. If the worker is
        # cancelled meanwhile the thread carries on, so the recogniser must
        # not go back to the pool.
        self.recognizer_busy = False

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read())
                tasks.create_task(self._recognise())
        except* ConnectionClosed:
            pass  # the client went away: nobody left to send results to
        except* Exception:
            logger.exception("recognition failed for %s", self._connection.remote_address)
            await self._connection.close(1011, "internal error")

    async def _read(self) -> None:
        async for message in self._connection:
            if isinstance(message, bytes):
                await self._on_audio(message)
            else:
                await self._on_text(message)
        if not self._closing:
            # The client left without CloseStream: results for the audio still
            # queued could not be delivered, so drop it rather than decode it.
            while not self._queue.empty():
                self._queue.get_nowait()
            await self._queue.put(_Control.STOP)

    async def _on_audio(self, chunk: bytes) -> None:
        if not chunk:
            return  # the protocol forbids empty frames; harmless, so ignored
        if self._closing:
            logger.debug("ignoring audio after CloseStream")
            return
        self.bytes_received += len(chunk)
        await self._queue.put(chunk)

    async def _on_text(self, message: str) -> None:
        try:
            kind = _parse_control(message)
        except ValueError as error:
            await self._send_error(str(error))
            return
        if kind == "CloseStream":
            if not self._closing:
                self._closing = True
                await self._queue.put(_Control.FLUSH)
        elif kind != "KeepAlive":
            await self._send_error(f"unsupported message type {_truncate(kind)!r}")

    async def _recognise(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _Control.STOP:
                return
            if item is _Control.FLUSH:
                await self._send_finals(await self._in_thread(self._recognizer.flush))
                # Normal closure (1000): the client's cue that nothing more comes.
                await self._connection.close()
                return
            assert isinstance(item, bytes)
            utterances, partial = await self._in_thread(functools.partial(self._feed, item))
            await self._send_finals(utterances)
            if partial is not None:
                await self._maybe_send_partial(partial)

    def _feed(self, chunk: bytes) -> tuple[list[Utterance], str | None]:
        """Runs in a worker thread: recognise, and read the partial while there."""
        utterances = self._recognizer.feed(chunk)
        return utterances, self._recognizer.partial() if self._send_partials else None

    async def _in_thread(self, function: Callable[[], _T]) -> _T:
        self.recognizer_busy = True
        result = await asyncio.to_thread(function)
        self.recognizer_busy = False
        return result

    async def _send_finals(self, utterances: list[Utterance]) -> None:
        for utterance in utterances:
            await self._send(transcript_message(self._provider, utterance))
        if utterances:
            self._last_partial = None

    async def _maybe_send_partial(self, text: str) -> None:
        start = self._recognizer.utterance_start
        now = self._recognizer.audio_seconds
        if start is None:
            return
        if self._last_partial is not None:
            last_text, last_time = self._last_partial
            if text == last_text or now - last_time < PARTIAL_INTERVAL_S:
                return
        self._last_partial = (text, now)
        await self._send(_partial_message(self._provider, text, start, now))

    async def _send_error(self, message: str) -> None:
        await self._send({"type": "error", "message": message})

    async def _send(self, payload: dict[str, Any]) -> None:
        await self._connection.send(json.dumps(payload))


async def _handle(connection: ServerConnection, pool: _RecognizerPool, send_partials: bool) -> None:
    peer = connection.remote_address
    provider = _provider(connection.request) if connection.request else DEFAULT_PROVIDER
    logger.info("connection from %s opened (provider %s)", peer, loggable(provider))
    recognizer = await pool.acquire()
    session = _Session(connection, recognizer, provider, send_partials)
    try:
        await session.run()
    finally:
        seconds = session.bytes_received / (SAMPLE_RATE * BYTES_PER_SAMPLE)
        logger.info(
            "connection from %s closed (code %s) after %.1f s of audio",
            peer,
            connection.close_code,
            seconds,
        )
        if not session.recognizer_busy:
            await pool.release(recognizer)


async def serve(
    host: str,
    port: int,
    *,
    api_key: str | None = None,
    started: asyncio.Event | None = None,
    on_listening: Callable[[int], None] | None = None,
    send_partials: bool = True,
) -> None:
    """Serve ``/v1/listen`` on ``host``:``port`` until cancelled.

    One recogniser is loaded before listening, so the first client does not
    wait for the model. Once listening, ``on_listening`` is called with the
    bound port (the useful part when ``port`` is 0) and ``started`` is set.
    With ``port`` 0, give a single address as ``host``: a name that resolves
    to several addresses gets a different free port for each.
    If ``api_key`` is set, clients must present it in the ``x-api-key`` header.
    """
    if api_key == "":
        raise ValueError("api_key must be None (no authentication) or non-empty")
    pool = _RecognizerPool()
    await pool.prewarm()

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        error = check_request(request, api_key)
        if error is None:
            return None
        status, body = error
        logger.info("rejected %s: HTTP %d", connection.remote_address, status)
        return connection.respond(status, body)

    async def handler(connection: ServerConnection) -> None:
        await _handle(connection, pool, send_partials)

    async with websockets_serve(
        handler,
        host,
        port,
        process_request=process_request,
        # Compressing PCM gains little and costs CPU on small devices.
        compression=None,
    ) as server:
        bound_port: int = server.sockets[0].getsockname()[1]
        logger.info("listening on %s:%d%s", host, bound_port, LISTEN_PATH)
        if on_listening is not None:
            on_listening(bound_port)
        if started is not None:
            started.set()
        await asyncio.Future()  # until cancelled; leaving the block closes the server
