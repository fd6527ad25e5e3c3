"""The router.audio streaming protocol, without I/O.

Everything here is plain computation so it can be tested without sockets, as
python-websockets keeps its protocol core apart from its asyncio adapters:

- `listen_url` builds the endpoint URL from configuration;
- `parse_frame` turns a text frame into a typed message, never raising;
- `SessionTimeline` maps session time (restarting at 0 on every connection)
  to stream time (samples captured since the daemon started);
- `FinalFilter` drops what an earlier session already delivered;
- `ReplayPacer` keeps a backlog from being sent faster than the provider takes it.

Stream positions are counted in samples (ints) to stay exact; seconds appear
only at the edges (frames in, payloads out).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edged.config import SAMPLE_RATE

ENCODING = "pcm_s16le"


def listen_url(
    base_url: str, provider: str, params: Mapping[str, str | int | float | bool]
) -> str:
    """The URL to connect to; identical on every reconnect.

    Query parameters already in `base_url` are kept; `params` from config
    override them; provider, encoding and sample rate are always ours because
    the audio we send is always 16 kHz s16le.
    """
    parts = urlsplit(base_url)
    query: dict[str, str] = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({key: _query_value(value) for key, value in params.items()})
    query.update({"provider": provider, "encoding": ENCODING, "sample_rate": str(SAMPLE_RATE)})
    return urlunsplit(parts._replace(query=urlencode(query)))


def _query_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------
# Frames from the service


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class WireWord(_Message):
    text: str
    start_time: float = Field(ge=0)
    end_time: float = Field(ge=0)
    speaker: int | str | None = None


class TranscriptMessage(_Message):
    """A transcript frame; times are seconds since the session started."""

    type: Literal["transcript"]
    provider: str | None = None
    transcript: str
    start_time: float = Field(ge=0)
    end_time: float = Field(ge=0)
    is_partial: bool = False
    words: list[WireWord] = Field(default_factory=list)


@dataclass(frozen=True)
class OtherMessage:
    """Valid JSON of a type we do not act on (metadata, errors, ...)."""

    type: str
    body: Mapping[str, object]


@dataclass(frozen=True)
class MalformedFrame:
    """A frame we could not understand; counted and skipped."""

    reason: str
    excerpt: str


Frame = TranscriptMessage | OtherMessage | MalformedFrame

_EXCERPT = 120


def parse_frame(text: str | bytes) -> Frame:
    """Parse one text frame. Never raises: bad input becomes `MalformedFrame`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return MalformedFrame("not UTF-8", repr(text[:_EXCERPT]))
    try:
        body = json.loads(text)
    except ValueError as error:
        return MalformedFrame(f"not JSON: {error}", text[:_EXCERPT])
    if not isinstance(body, dict):
        return MalformedFrame("not a JSON object", text[:_EXCERPT])
    kind = body.get("type")
    if kind != "transcript":
        return OtherMessage(str(kind), body)
    try:
        message = TranscriptMessage.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return MalformedFrame(f"bad transcript: {where}: {first['msg']}", text[:_EXCERPT])
    if message.end_time < message.start_time:
        return MalformedFrame("bad transcript: end_time before start_time", text[:_EXCERPT])
    return message


# ---------------------------------------------------------------------------
# Time


def seconds_to_samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def samples_to_seconds(samples: int) -> float:
    return samples / SAMPLE_RATE


@dataclass
class SessionTimeline:
    """Where each stretch of a session's audio sits in stream time.

    A session's time starts at 0 with its first byte. Audio is sent in runs
    of contiguous stream time; when a later feature skips audio (silence not
    sent), a new run starts and the map becomes piecewise. Audio not sent
    still counts in stream time.
    """

    _session_starts: list[int] = field(default_factory=list)  # samples, session time
    _stream_starts: list[int] = field(default_factory=list)  # samples, stream time
    sent_samples: int = 0  # session time of the next byte to send

    def record_send(self, stream_sample: int, samples: int) -> None:
        """Note that `samples` of audio starting at `stream_sample` were sent."""
        if samples <= 0:
            return
        if not self._stream_starts or stream_sample != self.stream_position:
            self._session_starts.append(self.sent_samples)
            self._stream_starts.append(stream_sample)
        self.sent_samples += samples

    @property
    def stream_position(self) -> int:
        """Stream time just after the last sample sent (the end of the last run)."""
        if not self._stream_starts:
            return 0
        return self._stream_starts[-1] + self.sent_samples - self._session_starts[-1]

    @property
    def stream_start(self) -> int | None:
        return self._stream_starts[0] if self._stream_starts else None

    def to_stream(self, session_seconds: float) -> int:
        """Stream sample of a session time; times past the audio sent are clamped."""
        if not self._stream_starts:
            raise ValueError("no audio has been sent in this session")
        position = min(max(seconds_to_samples(session_seconds), 0), self.sent_samples)
        run = max(bisect.bisect_right(self._session_starts, position) - 1, 0)
        return self._stream_starts[run] + position - self._session_starts[run]


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # stream samples
    end: int
    speaker: int | str | None


@dataclass(frozen=True)
class Final:
    """A final transcript placed in stream time."""

    text: str
    start: int  # stream samples
    end: int
    words: tuple[Word, ...]
    provider: str | None


def place_final(message: TranscriptMessage, timeline: SessionTimeline) -> Final:
    words = tuple(
        Word(
            word.text,
            timeline.to_stream(word.start_time),
            timeline.to_stream(word.end_time),
            word.speaker,
        )
        for word in message.words
    )
    return Final(
        text=message.transcript,
        start=timeline.to_stream(message.start_time),
        end=timeline.to_stream(message.end_time),
        words=words,
        provider=message.provider,
    )


@dataclass
class FinalFilter:
    """De-duplication by stream time, never by text.

    After a reconnect, audio is re-sent from the end of the last final, so a
    new session can transcribe again what an old one already delivered. A
    final that ends at or before the end of the last accepted final is a
    duplicate; one that straddles it loses the words already delivered.
    Empty finals (silence) are not published but still move the mark: the
    audio they cover is acknowledged.
    """

    acknowledged: int = 0  # stream sample up to which audio has been transcribed

    def accept(self, final: Final) -> Final | None:
        """The part of `final` to publish, or None."""
        if final.end <= self.acknowledged:
            return None
        kept = final
        if final.start < self.acknowledged and final.words:
            words = tuple(word for word in final.words if word.end > self.acknowledged)
            if len(words) != len(final.words):
                if not words:
                    self.acknowledged = final.end
                    return None
                kept = replace(
                    final,
                    words=words,
                    start=words[0].start,
                    text=" ".join(word.text for word in words),
                )
        self.acknowledged = final.end
        return kept if kept.text.strip() else None


@dataclass
class ReplayPacer:
    """Caps sending at `speed` seconds of audio per wall-clock second.

    Providers take audio only a little faster than real time, so a backlog is
    drained at `speed`; live audio, arriving at 1x, is never held back. A
    small allowance (`burst_seconds`) lets the first frames of a session go
    at once.
    """

    speed: float
    burst_seconds: float = 0.5
    _started_at: float | None = None
    _sent_seconds: float = 0.0

    def delay_before(self, now: float, frame_seconds: float) -> float:
        """Seconds to wait before sending a frame of `frame_seconds`."""
        if self._started_at is None:
            self._started_at = now
        allowed = (now - self._started_at) * self.speed + self.burst_seconds
        excess = self._sent_seconds + frame_seconds - allowed
        return max(excess / self.speed, 0.0)

    def sent(self, frame_seconds: float) -> None:
        self._sent_seconds += frame_seconds
