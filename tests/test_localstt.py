"""Tests for the local PocketSphinx STT server, with real synthesised speech."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from edged.localstt import serve
from edged.localstt.recognizer import StreamingRecognizer, Utterance, _clean_word
from tests.support.speech import BYTES_PER_SAMPLE, SAMPLE_RATE, silence, speak

SENTENCE = "turn on the kitchen light"
CHUNK_BYTES = 3200  # 100 ms
API_KEY = "test-key"
TIMEOUT_S = 30.0

_T = TypeVar("_T")


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion (pytest-asyncio is not used here)."""
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


@pytest.fixture(scope="module")
def sentence_pcm() -> bytes:
    return speak(SENTENCE)


def chunks(pcm: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [pcm[start : start + size] for start in range(0, len(pcm), size)]


def recognise(pcm: bytes, chunk_size: int = CHUNK_BYTES) -> list[Utterance]:
    recognizer = StreamingRecognizer()
    utterances: list[Utterance] = []
    for chunk in chunks(pcm, chunk_size):
        utterances.extend(recognizer.feed(chunk))
    return utterances + recognizer.flush()


def duration(pcm: bytes) -> float:
    return len(pcm) / (SAMPLE_RATE * BYTES_PER_SAMPLE)


def recognised_words(texts: list[str]) -> set[str]:
    return set(" ".join(texts).split()) & set(SENTENCE.split())


# --- recogniser ---------------------------------------------------------------


def test_recognizer_transcribes_speech_with_sensible_times(sentence_pcm: bytes) -> None:
    utterances = recognise(sentence_pcm)

    assert utterances
    assert all(utterance.text for utterance in utterances)
    # PocketSphinx on synthetic speech is far from perfect, but the sentence
    # must be recognisably there.
    assert len(recognised_words([u.text for u in utterances])) >= 2, utterances
    words = [word for utterance in utterances for word in utterance.words]
    assert [word.text for word in words] == " ".join(u.text for u in utterances).split()
    for word in words:
        assert 0.0 <= word.start_time < word.end_time <= duration(sentence_pcm)
    for previous, current in itertools.pairwise(words):
        assert previous.end_time <= current.start_time
    for utterance in utterances:
        assert utterance.start_time == utterance.words[0].start_time
        assert utterance.end_time == utterance.words[-1].end_time
    # The speech starts after 0.5 s of silence, which the times must reflect.
    assert words[0].start_time >= 0.4


def test_recognizer_result_does_not_depend_on_chunking(sentence_pcm: bytes) -> None:
    # Odd sizes split frames and even samples; buffering must hide that.
    assert recognise(sentence_pcm, 1001) == recognise(sentence_pcm, CHUNK_BYTES)


def test_recognizer_keeps_stream_time_across_flush_and_restarts_on_reset(
    sentence_pcm: bytes,
) -> None:
    recognizer = StreamingRecognizer()
    first = recognizer.feed(sentence_pcm) + recognizer.flush()
    second = recognizer.feed(sentence_pcm) + recognizer.flush()
    assert first
    assert second
    # Same audio again, one sentence later on the stream clock.
    assert second[0].start_time == pytest.approx(
        first[0].start_time + duration(sentence_pcm), abs=0.2
    )

    recognizer.reset()
    again = recognizer.feed(sentence_pcm) + recognizer.flush()
    assert again
    assert again[0].start_time < duration(sentence_pcm)


def test_recognizer_flush_finishes_the_utterance_in_progress() -> None:
    # No trailing silence and an odd byte count: the endpointer never sees
    # the end of the speech, so only flush() can finish it.
    pcm = speak(SENTENCE, tail_silence_s=0.0) + b"\x00"
    recognizer = StreamingRecognizer()
    assert recognizer.feed(pcm) == []
    assert recognizer.partial()
    utterances = recognizer.flush()
    assert len(utterances) == 1
    assert len(recognised_words([utterances[0].text])) >= 2
    assert utterances[0].end_time <= duration(pcm)
    assert recognizer.partial() is None


def test_recognizer_ignores_silence() -> None:
    recognizer = StreamingRecognizer()
    assert recognizer.feed(silence(2.0)) == []
    assert recognizer.partial() is None
    assert recognizer.flush() == []
    assert recognizer.audio_seconds == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("word", "word"),
        ("read(2)", "read"),
        ("<s>", None),
        ("</s>", None),
        ("<sil>", None),
        ("[NOISE]", None),
        ("++BREATH++", None),
    ],
)
def test_clean_word(raw: str, expected: str | None) -> None:
    assert _clean_word(raw) == expected


# --- server -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_server(api_key: str | None = None) -> AsyncIterator[int]:
    """Run the server on a free port of 127.0.0.1 and yield that port."""
    ports: list[int] = []
    started = asyncio.Event()
    task = asyncio.create_task(
        serve("127.0.0.1", 0, api_key=api_key, started=started, on_listening=ports.append)
    )
    try:
        await asyncio.wait_for(started.wait(), TIMEOUT_S)
        yield ports[0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def listen_url(
    port: int, query: str = "provider=deepgram&encoding=pcm_s16le&sample_rate=16000"
) -> str:
    return f"ws://127.0.0.1:{port}/v1/listen?{query}"


async def stream_and_close(ws: ClientConnection, pcm: bytes) -> list[dict[str, Any]]:
    """Send audio as 100 ms frames, then CloseStream; return messages until the close."""
    for chunk in chunks(pcm):
        await ws.send(chunk)
    await ws.send(json.dumps({"type": "CloseStream"}))
    return [json.loads(message) async for message in ws]


async def handshake_status(url: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(InvalidStatus) as excinfo:
        async with connect(url, additional_headers=headers):
            pass
    return excinfo.value.response.status_code


def test_server_streams_finals_and_closes_normally(sentence_pcm: bytes) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        async with (
            running_server(API_KEY) as port,
            connect(listen_url(port), additional_headers={"x-api-key": API_KEY}) as ws,
        ):
            messages = await stream_and_close(ws, sentence_pcm)
            return messages, ws.close_code

    messages, close_code = run(scenario())

    assert close_code == 1000
    finals = [m for m in messages if m["type"] == "transcript" and not m["is_partial"]]
    assert finals, messages
    for final in finals:
        assert final["provider"] == "deepgram"
        assert final["transcript"]
        assert 0.0 <= final["start_time"] < final["end_time"] <= duration(sentence_pcm)
        assert final["words"]
        assert all(word["speaker"] is None for word in final["words"])
        assert " ".join(word["text"] for word in final["words"]) == final["transcript"]
    assert len(recognised_words([final["transcript"] for final in finals])) >= 2


def test_server_rejects_wrong_or_missing_api_key() -> None:
    async def scenario() -> tuple[int, int]:
        async with running_server(API_KEY) as port:
            wrong = await handshake_status(listen_url(port), {"x-api-key": "nope"})
            missing = await handshake_status(listen_url(port))
            return wrong, missing

    assert run(scenario()) == (401, 401)


def test_server_rejects_unsupported_audio_format_and_unknown_path() -> None:
    async def scenario() -> tuple[int, int, int]:
        async with running_server() as port:
            rate = await handshake_status(listen_url(port, "sample_rate=8000"))
            encoding = await handshake_status(listen_url(port, "encoding=opus"))
            path = await handshake_status(f"ws://127.0.0.1:{port}/v2/listen")
            return rate, encoding, path

    assert run(scenario()) == (400, 400, 404)


def test_server_answers_bad_text_frames_with_errors_and_carries_on(
    sentence_pcm: bytes,
) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with running_server() as port, connect(listen_url(port, "")) as ws:
            errors = []
            for bad in ("not json", "[1, 2]", json.dumps({"type": "Bogus"})):
                await ws.send(bad)
                errors.append(json.loads(await ws.recv()))
            # Ignored silently: an empty frame and a KeepAlive.
            await ws.send(b"")
            await ws.send(json.dumps({"type": "KeepAlive"}))
            return errors, await stream_and_close(ws, sentence_pcm)

    errors, messages = run(scenario())

    assert [error["type"] for error in errors] == ["error"] * 3
    assert all(error["message"] for error in errors)
    finals = [m for m in messages if m["type"] == "transcript" and not m["is_partial"]]
    assert finals, messages
    assert finals[0]["provider"] == "pocketsphinx"
    assert all(m["type"] == "transcript" for m in messages)


def test_server_survives_a_client_leaving_without_close_stream(sentence_pcm: bytes) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with running_server() as port:
            async with connect(listen_url(port)) as ws:
                for chunk in chunks(sentence_pcm[: len(sentence_pcm) // 2]):
                    await ws.send(chunk)
            # The server carries on with the next client, clock restarted.
            async with connect(listen_url(port)) as ws:
                return await stream_and_close(ws, sentence_pcm)

    messages = run(scenario())

    finals = [m for m in messages if m["type"] == "transcript" and not m["is_partial"]]
    assert finals, messages
    assert finals[0]["start_time"] < duration(sentence_pcm)
