"""The sans-I/O protocol core: URLs, frames, time mapping, de-duplication, pacing."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.stt.protocol import (
    Final,
    FinalFilter,
    MalformedFrame,
    OtherMessage,
    ReplayPacer,
    SessionTimeline,
    TranscriptMessage,
    Word,
    listen_url,
    parse_frame,
    place_final,
)

EXAMPLE = (
    '{"type":"transcript","provider":"deepgram","transcript":"Hello, how are you?",'
    '"start_time":0.0,"end_time":0.95,"is_partial":false,"words":[{"text":"hello",'
    '"start_time":0.0,"end_time":0.42,"speaker":null}]}'
)


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_url_carries_provider_format_and_extra_params() -> None:
    url = listen_url("wss://api.router.audio/v1/listen", "deepgram",
                     {"language": "de", "smart_format": True, "tier": 2})
    assert url.startswith("wss://api.router.audio/v1/listen?")
    assert query(url) == {
        "provider": ["deepgram"], "encoding": ["pcm_s16le"], "sample_rate": ["16000"],
        "language": ["de"], "smart_format": ["true"], "tier": ["2"],
    }


def test_url_keeps_existing_query_but_audio_format_is_always_ours() -> None:
    url = listen_url("ws://host:8080/v1/listen?region=eu&sample_rate=8000", "whisper",
                     {"encoding": "opus"})
    assert query(url)["region"] == ["eu"]
    assert query(url)["sample_rate"] == ["16000"]
    assert query(url)["encoding"] == ["pcm_s16le"]
    assert query(url)["provider"] == ["whisper"]
    assert urlsplit(url).netloc == "host:8080"


def test_parses_the_documented_transcript() -> None:
    frame = parse_frame(EXAMPLE)
    assert isinstance(frame, TranscriptMessage)
    assert frame.transcript == "Hello, how are you?"
    assert not frame.is_partial
    assert frame.words[0].text == "hello"
    assert frame.words[0].end_time == 0.42


def test_unknown_fields_and_types_are_tolerated() -> None:
    frame = parse_frame(EXAMPLE.replace('"type"', '"confidence":0.9,"type"'))
    assert isinstance(frame, TranscriptMessage)
    other = parse_frame('{"type":"Metadata","request_id":"x"}')
    assert isinstance(other, OtherMessage)
    assert other.type == "Metadata"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"type": "transcript", "transcript": 42',  # truncated
        "[1, 2, 3]",
        '{"type":"transcript","transcript":"x","start_time":"soon","end_time":1}',
        '{"type":"transcript","transcript":"x","start_time":2.0,"end_time":1.0}',
        '{"type":"transcript","transcript":"x","start_time":-1,"end_time":1.0}',
        b"\xff\xfe",
    ],
)
def test_malformed_frames_become_values_not_exceptions(text: str | bytes) -> None:
    assert isinstance(parse_frame(text), MalformedFrame)


@given(st.one_of(st.text(), st.binary()))
def test_parse_frame_never_raises(text: str | bytes) -> None:
    parse_frame(text)


def test_session_time_maps_to_stream_time_from_the_first_byte_sent() -> None:
    timeline = SessionTimeline()
    timeline.record_send(stream_sample=48_000, samples=16_000)  # session began at 3.0 s
    timeline.record_send(stream_sample=64_000, samples=16_000)
    assert timeline.to_stream(0.0) == 48_000
    assert timeline.to_stream(1.5) == 72_000
    assert timeline.to_stream(99.0) == 80_000  # clamped to what was sent


def test_a_gap_in_what_was_sent_makes_the_map_piecewise() -> None:
    timeline = SessionTimeline()
    timeline.record_send(0, 16_000)  # 0..1 s sent
    timeline.record_send(80_000, 16_000)  # 1..4 s skipped, 5..6 s sent
    assert timeline.to_stream(0.5) == 8_000
    assert timeline.to_stream(1.25) == 84_000


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 8_000)), min_size=1))
def test_time_map_is_monotonic_and_lands_in_sent_audio(runs: list[tuple[int, int]]) -> None:
    timeline = SessionTimeline()
    stream = 0
    sent: list[tuple[int, int]] = []
    for gap, samples in runs:
        stream += gap
        timeline.record_send(stream, samples)
        sent.append((stream, stream + samples))
        stream += samples
    previous = -1
    for tenth_ms in range(0, timeline.sent_samples * 10 // 16 + 1, 37):
        mapped = timeline.to_stream(tenth_ms / 10_000)
        assert mapped >= previous
        assert any(start <= mapped <= end for start, end in sent)
        previous = mapped


def final(start: int, end: int, *words: tuple[str, int, int], text: str = "x") -> Final:
    return Final(text, start, end, tuple(Word(t, s, e, None) for t, s, e in words), "p")


def test_final_already_delivered_is_dropped_but_the_same_words_later_are_not() -> None:
    filter_ = FinalFilter()
    assert filter_.accept(final(0, 100, ("yes", 0, 100), text="yes")) is not None
    assert filter_.accept(final(0, 100, ("yes", 0, 100), text="yes")) is None  # replayed
    assert filter_.accept(final(150, 250, ("yes", 150, 250), text="yes")) is not None


def test_straddling_final_loses_only_the_words_already_delivered() -> None:
    filter_ = FinalFilter(acknowledged=100)
    kept = filter_.accept(final(50, 300, ("turn", 50, 90), ("on", 110, 200), ("light", 210, 300),
                                text="Turn on light."))
    assert kept is not None
    assert [w.text for w in kept.words] == ["on", "light"]
    assert kept.text == "on light"
    assert kept.start == 110
    assert filter_.acknowledged == 300


def test_empty_final_acknowledges_silence_without_publishing() -> None:
    filter_ = FinalFilter()
    assert filter_.accept(final(0, 32_000, text="")) is None
    assert filter_.acknowledged == 32_000


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000))))
def test_accepted_finals_never_overlap_and_only_move_forward(spans: list[tuple[int, int]]) -> None:
    filter_ = FinalFilter()
    last_end = 0
    for a, b in spans:
        start, end = min(a, b), max(a, b)
        kept = filter_.accept(final(start, end, ("w", start, end)))
        if kept is not None:
            assert kept.end > last_end
            last_end = kept.end
        assert filter_.acknowledged == max(last_end, filter_.acknowledged)


def test_place_final_uses_the_session_timeline() -> None:
    timeline = SessionTimeline()
    timeline.record_send(160_000, 32_000)  # this session started at stream 10.0 s
    message = parse_frame(EXAMPLE)
    assert isinstance(message, TranscriptMessage)
    placed = place_final(message, timeline)
    assert placed.start == 160_000
    assert placed.end == 160_000 + round(0.95 * 16_000)
    assert placed.words[0].end == 160_000 + round(0.42 * 16_000)


def test_pacer_lets_live_audio_through_and_holds_a_backlog_to_the_speed() -> None:
    pacer = ReplayPacer(speed=1.25, burst_seconds=0.5)
    now, sent = 0.0, 0.0
    while sent < 60.0:  # a 60 s backlog, 250 ms frames
        now += pacer.delay_before(now, 0.25)
        pacer.sent(0.25)
        sent += 0.25
    assert now == pytest.approx((60.0 - 0.5) / 1.25, abs=0.25)
    live = ReplayPacer(speed=1.25)
    for tick in range(100):  # 100 ms frames arriving in real time
        assert live.delay_before(tick * 0.1, 0.1) == 0.0
        live.sent(0.1)
