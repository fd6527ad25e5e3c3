"""The router.audio streaming protocol, without I/O.

Everything here is plain computation so it can be tested without sockets, as
python-websockets keeps its protocol core apart from its asyncio adapters:

- `listen_url` builds the endpoint URL from configuration;
- `parse_frame` is the one gate for what the service sends: a well-formed
  message placed in the audio sent, or a `MalformedFrame` value, never an
  exception; `looks_partial` lets partials be skipped unparsed;
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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from edged.config import SAMPLE_RATE
from edged.untrusted import loggable

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
# Frames from the service: one gate
#
# Everything the service sends goes through `parse_frame`, and what it lets
# through is safe for the rest of the daemon: of bounded size and depth,
# finite, with the right types, and with times in the audio this session has
# sent. Anything else becomes a `MalformedFrame` value (counted, logged,
# skipped): one frame must never raise out of the session (a crash loss of
# the audio in memory, and a crash loop if the service repeats it), nor move
# the de-duplication point past finals still to come.

# A text frame of more characters than this is malformed, checked before it
# is parsed. A final of a minute of speech with per-word times is about
# 30 KB; this leaves eight times that, and still turns away in one comparison
# what would otherwise be parsed and validated (the connection itself takes
# up to 1 MiB, a limit for a whole message of any kind).
MAX_TEXT_FRAME_CHARS = 256 * 1024
# Arrays and objects nested deeper than this make a frame malformed. The
# deepest message a provider sends is about 6 levels (Deepgram's raw
# results); json.loads recurses once per level and raises RecursionError on
# a few thousand, so depth is measured without parsing (`_nesting`).
MAX_NESTING = 32
# A final may end a little after the audio sent: the receiver can see a
# final before the sender has noted the frame (up to 250 ms) it answers, and
# services round or pad times. Within this much it is placed at the end of
# what was sent; beyond it the frame is malformed rather than clamped, since
# a clamped final would move the de-duplication point over audio not yet
# transcribed and swallow the finals that cover it.
TIME_TOLERANCE_S = 1.0

_EXCERPT = 120  # characters of a malformed frame kept for the log


def _unicode(text: str) -> str:
    """JSON can carry lone surrogates (a `\\ud800` escape); such text cannot be
    encoded as UTF-8, so the MQTT payload of a final carrying it would fail."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


_Text = Annotated[str, AfterValidator(_unicode)]
# Session seconds: never negative, never NaN or infinite.
_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Message(BaseModel):
    # Strict: "1.5" is not a time, 1 is not a bool, a dict is not a list.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class WireWord(_Message):
    text: _Text
    start_time: _Seconds
    end_time: _Seconds
    speaker: int | _Text | None = None

    @model_validator(mode="after")
    def _ordered(self) -> WireWord:
        if self.end_time < self.start_time:
            raise ValueError("end_time before start_time")
        return self


class TranscriptMessage(_Message):
    """A transcript frame; times are seconds since the session started."""

    type: Literal["transcript"]
    provider: _Text | None = None
    transcript: _Text
    start_time: _Seconds
    end_time: _Seconds
    is_partial: bool = False
    words: list[WireWord] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ordered(self) -> TranscriptMessage:
        if self.end_time < self.start_time:
            raise ValueError("end_time before start_time")
        return self

    @property
    def latest_time(self) -> float:
        """The latest time the message names (ends are never before starts)."""
        return max([self.end_time, *(word.end_time for word in self.words)])


@dataclass(frozen=True)
class OtherMessage:
    """Valid JSON of a type we do not act on (metadata, errors, ...)."""

    type: str
    body: Mapping[str, object]


@dataclass(frozen=True)
class MalformedFrame:
    """A frame we could not understand or would not believe; counted and skipped."""

    reason: str
    excerpt: str  # escaped and cut: ready for a log line


Frame = TranscriptMessage | OtherMessage | MalformedFrame


def parse_frame(text: str | bytes, sent_samples: int) -> Frame:
    """Parse one frame from the service, in a session that has sent
    `sent_samples` of audio so far. Never raises: anything not well-formed
    becomes a `MalformedFrame`."""
    if isinstance(text, bytes):
        # The service speaks JSON in text frames; binary is for our audio.
        return MalformedFrame(f"binary frame of {len(text)} bytes", loggable(text, _EXCERPT))
    if len(text) > MAX_TEXT_FRAME_CHARS:
        return _malformed(f"{len(text)} characters, over {MAX_TEXT_FRAME_CHARS}", text)
    if _nesting(text) > MAX_NESTING:
        return _malformed(f"nested deeper than {MAX_NESTING}", text)
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:
        # RecursionError cannot come after the depth check; it is caught all
        # the same, since whatever the service sends must never escape.
        return _malformed(f"not JSON: {error}", text)
    if not isinstance(body, dict):
        return _malformed("not a JSON object", text)
    kind = body.get("type")
    if not isinstance(kind, str):
        return _malformed("no type, or not a string", text)
    if kind != "transcript":
        return OtherMessage(kind, body)
    try:
        message = TranscriptMessage.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "frame"
        return _malformed(f"bad transcript: {where}: {first['msg']}", text)
    if sent_samples <= 0:
        return _malformed("transcript before any audio was sent", text)
    limit_s = samples_to_seconds(sent_samples) + TIME_TOLERANCE_S
    if message.latest_time > limit_s:
        return _malformed(
            f"bad transcript: time {message.latest_time:.6g}s is past the audio sent "
            f"({samples_to_seconds(sent_samples):.3f}s)", text)
    return message


def _malformed(reason: str, text: str) -> MalformedFrame:
    return MalformedFrame(reason, loggable(text, _EXCERPT))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")  # NaN, Infinity, -Infinity


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400 is "valid" JSON that Python reads as inf
        raise ValueError(f"number out of range: {literal[:20]}")
    return value


# A JSON string, or the start of one that never ends: always matches at a
# quote and never backtracks, so stripping strings is linear in the frame.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in `text` (a bound, for text that is
    not JSON), without recursion: brackets outside strings, counted."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return 0  # cannot nest deeper than it has openings: the usual frame
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


# A printable ASCII character written as an escape: no encoder does that
# for the letters of a key, so a frame with one is parsed, not looked at.
_ASCII_ESCAPE = re.compile(r"\\u00[2-7]", re.IGNORECASE)
_PARTIAL_KEY = '"is_partial"'


def looks_partial(text: str | bytes) -> bool:
    """True for a frame whose top-level `is_partial` is true, seen without
    parsing it: partials are the most frequent frame, and when nobody wants
    them they are skipped unparsed.

    It may only skip: when true, the frame is a partial or no valid JSON at
    all, never a final. So the key must be the last `"is_partial"` in the
    frame (JSON's last duplicate wins), spelt plainly, a key (after `{` or
    `,`) of the outermost object (depth 1 outside strings), with the literal
    `true`. Anything in doubt is false, and the frame goes through the gate.
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_FRAME_CHARS:
        return False
    at = text.rfind(_PARTIAL_KEY)
    if at < 0:
        return False
    before = text[:at].rstrip()
    value = text[at + len(_PARTIAL_KEY):].lstrip()
    if not (before.endswith(("{", ",")) and value.startswith(":")):
        return False
    value = value[1:].lstrip()
    if not (value.startswith("true") and value[4:].lstrip()[:1] in (",", "}")):
        return False
    if _ASCII_ESCAPE.search(text):
        return False
    skeleton = _STRING.sub("", before)
    depth = (skeleton.count("{") + skeleton.count("[")
             - skeleton.count("}") - skeleton.count("]"))
    return depth == 1


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
        """Stream sample of a session time, as the start of what follows it.

        A time up to TIME_TOLERANCE_S past the audio sent is placed at its
        end; a time further on, negative or not finite raises ValueError
        (`parse_frame` turns such frames away, so this is for other callers).
        """
        position = self._position(session_seconds)
        run = max(bisect.bisect_right(self._session_starts, position) - 1, 0)
        return self._stream_starts[run] + position - self._session_starts[run]

    def end_to_stream(self, session_seconds: float) -> int:
        """Stream sample of a session time, as the end of what precedes it.

        The same as `to_stream` except where one run of sent audio meets the
        next: what ends there ends with the first run, not at the start of
        the next one (the audio between them was not sent: dropped, or
        silence skipped). Otherwise a word ending where the audio sent
        stopped would be placed past the gap, or not, depending on whether
        the next run had been sent by the time its final came.
        """
        position = self._position(session_seconds)
        run = max(bisect.bisect_left(self._session_starts, position) - 1, 0)
        return self._stream_starts[run] + position - self._session_starts[run]

    def _position(self, session_seconds: float) -> int:
        """Session sample of a session time, checked as `to_stream` says."""
        if not self._stream_starts:
            raise ValueError("no audio has been sent in this session")
        if not 0 <= session_seconds <= samples_to_seconds(self.sent_samples) + TIME_TOLERANCE_S:
            raise ValueError(f"session time {session_seconds!r}s is outside the audio sent")
        return min(seconds_to_samples(session_seconds), self.sent_samples)

    def place(self, start_seconds: float, end_seconds: float) -> tuple[int, int]:
        """Stream (start, end) of a span of session time. A span of no
        length where two runs meet is placed at the start of the second:
        the end is never before the start."""
        start = self.to_stream(start_seconds)
        return start, max(self.end_to_stream(end_seconds), start)


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
        Word(word.text, *timeline.place(word.start_time, word.end_time), word.speaker)
        for word in message.words
    )
    start, end = timeline.place(message.start_time, message.end_time)
    return Final(
        text=message.transcript,
        start=start,
        end=end,
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
