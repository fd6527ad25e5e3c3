"""The sans-I/O protocol core: URLs, frames, time mapping, de-duplication, pacing."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.config import SAMPLE_RATE
from edged.stt.protocol import (
    MAX_TEXT_FRAME_CHARS,
    TIME_TOLERANCE_S,
    Final,
    FinalFilter,
    MalformedFrame,
    OtherMessage,
    ReplayPacer,
    SessionTimeline,
    TranscriptMessage,
    Word,
    listen_url,
    looks_partial,
    parse_frame,
    place_final,
)

SENT = 10 * SAMPLE_RATE  # the session has sent 10 s of audio
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
    frame = parse_frame(EXAMPLE, SENT)
    assert isinstance(frame, TranscriptMessage)
    assert frame.transcript == "Hello, how are you?"
    assert not frame.is_partial
    assert frame.words[0].text == "hello"
    assert frame.words[0].end_time == 0.42


def test_unknown_fields_and_types_are_tolerated() -> None:
    frame = parse_frame(EXAMPLE.replace('"type"', '"confidence":0.9,"type"'), SENT)
    assert isinstance(frame, TranscriptMessage)
    other = parse_frame('{"type":"Metadata","request_id":"x"}', SENT)
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
    assert isinstance(parse_frame(text, SENT), MalformedFrame)


@given(st.one_of(st.text(), st.binary()))
def test_parse_frame_never_raises(text: str | bytes) -> None:
    parse_frame(text, SENT)


def transcript(start: object = 0.5, end: object = 1.0, *, text: object = "hello",
               partial: object = False, words: object = None, **extra: object) -> str:
    """A transcript frame as the service would write it; any field may be bent."""
    if words is None:
        words = [{"text": "hello", "start_time": start, "end_time": end, "speaker": None}]
    body = {"type": "transcript", "provider": "deepgram", "transcript": text,
            "start_time": start, "end_time": end, "is_partial": partial, "words": words, **extra}
    return json.dumps(body)


def test_a_100000_deep_array_is_malformed_not_a_recursion_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    frame = parse_frame(deep, SENT)
    assert isinstance(frame, MalformedFrame)
    assert "nested deeper" in frame.reason
    # Inside an otherwise good final, in a field nobody reads, just the same.
    hidden = transcript()[:-1] + ', "extra": ' + '{"a":' * 5_000 + "1" + "}" * 5_000 + "}"
    assert isinstance(parse_frame(hidden, SENT), MalformedFrame)


def test_nesting_is_counted_outside_strings_only() -> None:
    brackets = "[" * 200 + "{" * 200
    frame = parse_frame(transcript(text=brackets), SENT)
    assert isinstance(frame, TranscriptMessage)
    assert frame.transcript == brackets


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400", "-1e400"])
@pytest.mark.parametrize("field", ["end_time", "word end_time"])
def test_numbers_that_are_not_finite_are_malformed(number: str, field: str) -> None:
    good = transcript(start=0.5, end=0.75)
    text = (good.replace('"end_time": 0.75,', f'"end_time": {number},', 1) if field == "end_time"
            else good.replace('"end_time": 0.75, "speaker"', f'"end_time": {number}, "speaker"'))
    assert text != good
    assert isinstance(parse_frame(text, SENT), MalformedFrame)


@pytest.mark.parametrize(("start", "end"), [
    (0.5, 1e306),  # seconds_to_samples would overflow
    (1e306, 1e306),
    (5_000.0, 5_001.0),  # far ahead of the 10 s sent
    (9.0, 10.0 + TIME_TOLERANCE_S + 0.01),  # just past the tolerance
    (0.5, 10**400),  # an integer no float can hold
])
def test_times_past_the_audio_sent_are_malformed_not_clamped(start: float, end: float) -> None:
    frame = parse_frame(transcript(start, end), SENT)
    assert isinstance(frame, MalformedFrame)


def test_times_within_the_tolerance_are_placed_at_the_end_of_the_audio_sent() -> None:
    timeline = SessionTimeline()
    timeline.record_send(0, SENT)
    message = parse_frame(transcript(9.5, 10.0 + TIME_TOLERANCE_S), SENT)
    assert isinstance(message, TranscriptMessage)
    assert place_final(message, timeline).end == SENT


def test_a_final_far_ahead_does_not_swallow_the_next_valid_final() -> None:
    timeline = SessionTimeline()
    timeline.record_send(0, SENT)
    finals = FinalFilter()
    received = [transcript(1.0, 2.0, text="one"), transcript(4_990.0, 5_000.0, text="ahead"),
                transcript(3.0, 4.0, text="two")]
    published = []
    for text in received:
        frame = parse_frame(text, SENT)
        if isinstance(frame, TranscriptMessage):
            kept = finals.accept(place_final(frame, timeline))
            if kept is not None:
                published.append(kept.text)
    assert published == ["one", "two"]
    assert finals.acknowledged == 4 * SAMPLE_RATE


@pytest.mark.parametrize("text", [
    transcript(start="1.0"),  # a number in a string is not a time
    transcript(start=True),
    transcript(start=None),
    transcript(start=[0.5]),
    transcript(start=-0.5),
    transcript(start=2.0, end=1.0),
    transcript(text=42),
    transcript(text=None),
    transcript(text={"a": 1}),
    transcript(partial="false"),
    transcript(partial=0),
    transcript(words={"text": "a"}),
    transcript(words="hello"),
    transcript(words=[{"text": "a", "start_time": 0.5, "end_time": 0.4}]),
    transcript(words=[{"text": "a", "start_time": 0.5, "end_time": 1.0, "speaker": 1.5}]),
    transcript(words=[{"text": 7, "start_time": 0.5, "end_time": 1.0}]),
    transcript(words=[{"start_time": 0.5, "end_time": 1.0}]),
    transcript(text="a\ud800b"),  # a lone surrogate: no MQTT payload could carry it
    transcript(provider=["deepgram"]),
    '{"type": 42, "transcript": "x"}',
    '{"transcript": "x", "start_time": 0, "end_time": 1}',
    '"transcript"',
    "null",
    "",
])
def test_wrong_types_and_shapes_are_malformed(text: str) -> None:
    assert isinstance(parse_frame(text, SENT), MalformedFrame)


def test_binary_frames_are_malformed_whatever_they_hold() -> None:
    assert isinstance(parse_frame(EXAMPLE.encode(), SENT), MalformedFrame)


def test_a_transcript_before_any_audio_was_sent_is_malformed() -> None:
    frame = parse_frame(EXAMPLE, 0)
    assert isinstance(frame, MalformedFrame)
    assert "before any audio" in frame.reason


def test_a_900_kb_message_is_refused_before_it_is_parsed() -> None:
    huge = json.dumps({"type": "error", "message": "x" * 900_000})
    frame = parse_frame(huge, SENT)
    assert isinstance(frame, MalformedFrame)
    assert str(MAX_TEXT_FRAME_CHARS) in frame.reason
    assert len(frame.excerpt) < 200
    fits = json.dumps({"type": "error", "message": "x" * (MAX_TEXT_FRAME_CHARS - 100)})
    assert isinstance(parse_frame(fits, SENT), OtherMessage)


def test_the_excerpt_of_a_malformed_frame_is_one_escaped_line() -> None:
    frame = parse_frame('{"type": "transcript",\n"x": "\x1b[31m', SENT)
    assert isinstance(frame, MalformedFrame)
    assert "\n" not in frame.excerpt
    assert frame.excerpt.isprintable()
    assert "\\n" in frame.excerpt


def test_an_error_message_with_a_newline_is_a_message_like_any_other() -> None:
    # The gate keeps it (it is well-formed); the session escapes it when logging.
    forged = json.dumps({"type": "error",
                         "message": "boom\n2026-01-01 00:00:00 ERROR edged forged"})
    frame = parse_frame(forged, SENT)
    assert isinstance(frame, OtherMessage)
    assert frame.type == "error"


# -- the partial fast path: it may skip, never hide a final ----------------------


@pytest.mark.parametrize("text", [
    transcript(partial=True),
    transcript(partial=True).replace(": ", ":").replace(", ", ","),
    '{"type":"transcript","transcript":"hi","start_time":0,"end_time":1,"words":[],'
    '"is_partial" : true }',
    '{"is_partial":true,"type":"transcript","transcript":"[laughs] {x}","start_time":0,'
    '"end_time":1}',
])
def test_partials_are_recognised_without_parsing(text: str) -> None:
    assert looks_partial(text)


@pytest.mark.parametrize("text", [
    EXAMPLE,
    transcript(partial=False),
    # A final whose words carry a field of that name: the key is not top-level.
    transcript(words=[{"text": "hello", "start_time": 0.5, "end_time": 1.0,
                       "is_partial": True}]),
    transcript(meta={"is_partial": True}),
    # Brackets in text must not fool the depth count.
    transcript(text="]}", words=[{"text": "]}", "start_time": 0.5, "end_time": 1.0,
                                  "is_partial": True}]),
    # The last duplicate wins in JSON.
    transcript(partial=True)[:-1] + ', "is_partial": false}',
    # A key spelt with escapes reads as is_partial once parsed.
    transcript(partial=True)[:-1] + ', "is\\u005fpartial": false}',
    # The name inside a string value.
    transcript(text='"is_partial": true}'),
    transcript(partial=True).encode(),
])
def test_finals_are_never_taken_for_partials(text: str | bytes) -> None:
    assert not looks_partial(text)


# Well-formed frames rich in what could make a look without parsing wrong:
# is_partial keys at every depth (in words, in other fields), spelt with
# escapes, duplicated, brackets and quotes inside strings, odd whitespace.
_SPACE = st.sampled_from(["", " ", "\n", "\t "])
_PARTIAL_KEYS = st.sampled_from(['"is_partial"', '"is\\u005fpartial"'])
_BOOLS = st.sampled_from(["true", "false"])
_LEAVES = st.sampled_from(["true", "false", "0.5", "null", '"]}"', '"{\\"is_partial\\":true"',
                           '"\\\\"', '"is_partial"'])


def _join(pairs: list[tuple[str, str]], space: str) -> str:
    return "{" + ",".join(f"{space}{key}{space}:{space}{value}" for key, value in pairs) + "}"


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    keys = st.sampled_from(['"is_partial"', '"x"'])
    return st.one_of(
        st.builds(_join, st.lists(st.tuples(keys, children), max_size=3), _SPACE),
        st.builds(lambda items: "[" + ",".join(items) + "]", st.lists(children, max_size=3)),
    )


_ANY = st.recursive(_LEAVES, _containers, max_leaves=6)
_TEXTS = st.sampled_from(['"w"', '"]}"', '"[["', '"}, \\"is_partial\\": true"'])
# Fields nobody reads; one name ends in an escaped quote and "is_partial".
_IGNORED = st.tuples(st.sampled_from(['"x"', '"meta"', '"x\\"is_partial"']), _ANY)


@st.composite
def _word(draw: st.DrawFn, space: str) -> str:
    fields = [('"text"', draw(_TEXTS)), ('"start_time"', "0.5"), ('"end_time"', "1.0")]
    odd = draw(st.lists(st.one_of(_IGNORED, st.tuples(st.just('"is_partial"'), _ANY)),
                        max_size=2))
    return _join(draw(st.permutations(fields + odd)), space)


@settings(max_examples=500)
@given(_SPACE, st.data())
def test_a_frame_that_looks_partial_never_parses_as_a_final(
    space: str, data: st.DataObject
) -> None:
    words = data.draw(st.lists(_word(space), max_size=3))
    fields = [('"type"', '"transcript"'), ('"transcript"', data.draw(_TEXTS)),
              ('"start_time"', "0.5"),
              ('"end_time"', "1.0"), ('"words"', "[" + ",".join(words) + "]")]
    extra = data.draw(st.lists(st.one_of(_IGNORED, st.tuples(_PARTIAL_KEYS, _BOOLS)),
                               max_size=4))
    text = _join(data.draw(st.permutations(fields + extra)), space)
    frame = parse_frame(text, SENT)
    assert isinstance(frame, TranscriptMessage), (text, frame)  # the grammar is well-formed
    if looks_partial(text):
        assert frame.is_partial, text


def test_session_time_maps_to_stream_time_from_the_first_byte_sent() -> None:
    timeline = SessionTimeline()
    timeline.record_send(stream_sample=48_000, samples=16_000)  # session began at 3.0 s
    timeline.record_send(stream_sample=64_000, samples=16_000)
    assert timeline.to_stream(0.0) == 48_000
    assert timeline.to_stream(1.5) == 72_000
    assert timeline.to_stream(2.5) == 80_000  # a little past what was sent: its end
    with pytest.raises(ValueError, match="outside the audio sent"):
        timeline.to_stream(2.0 + TIME_TOLERANCE_S + 0.01)  # further: no place to put it


def test_a_gap_in_what_was_sent_makes_the_map_piecewise() -> None:
    timeline = SessionTimeline()
    timeline.record_send(0, 16_000)  # 0..1 s sent
    timeline.record_send(80_000, 16_000)  # 1..4 s skipped, 5..6 s sent
    assert timeline.to_stream(0.5) == 8_000
    assert timeline.to_stream(1.25) == 84_000


def test_a_word_ending_where_the_audio_sent_stops_ends_there_not_after_the_gap() -> None:
    # 0..1 s sent; 1..5 s not (dropped, or silence skipped); then 5..6 s.
    timeline = SessionTimeline()
    timeline.record_send(0, 16_000)
    frame = parse_frame(transcript(0.5, 1.0), 16_000)
    assert isinstance(frame, TranscriptMessage)
    before = place_final(frame, timeline)  # the final came before the next run was sent
    timeline.record_send(80_000, 16_000)
    after = place_final(frame, timeline)  # ... or after
    assert before == after
    assert (after.start, after.end) == (8_000, 16_000)
    assert (after.words[0].start, after.words[0].end) == (8_000, 16_000)
    # What starts there starts with the next run; a span of no length there
    # is placed at that start, never ending before it begins.
    assert timeline.place(1.0, 1.5) == (80_000, 88_000)
    assert timeline.place(1.0, 1.0) == (80_000, 80_000)
    assert timeline.place(0.0, 0.0) == (0, 0)


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
    boundaries = {start for start, _ in sent} - {end for _, end in sent}
    previous = -1
    for tenth_ms in range(0, timeline.sent_samples * 10 // 16 + 1, 37):
        mapped = timeline.to_stream(tenth_ms / 10_000)
        assert mapped >= previous
        assert any(start <= mapped < end for start, end in sent) or mapped == stream
        # As an end: the same, except where a run begins after a gap, which
        # ends the run before it instead.
        end = timeline.end_to_stream(tenth_ms / 10_000)
        assert any(start < end <= stop for start, stop in sent) or end == sent[0][0]
        assert end == mapped or (mapped in boundaries and end < mapped)
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
    message = parse_frame(EXAMPLE, SENT)
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
