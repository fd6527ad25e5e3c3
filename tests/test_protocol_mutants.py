"""The protocol core, edge cases found by mutation testing (docs/testing.md):
what a URL keeps, what a bad frame says (reason and excerpt: the
`stt.malformed_frame` log line), where the gate's limits lie, what the
partial fast path skips, where words land, which words a straddling final
keeps, and how a backlog is paced."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from edged.config import SAMPLE_RATE
from edged.stt.protocol import (
    MAX_TEXT_FRAME_CHARS,
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
    samples_to_seconds,
    seconds_to_samples,
)

SECOND = SAMPLE_RATE  # samples in a second of audio sent


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_url_keeps_blank_parameters_of_the_configured_url() -> None:
    url = listen_url("wss://host/v1/listen?token=&region=eu", "deepgram", {})
    assert query(url)["token"] == [""]
    assert query(url)["region"] == ["eu"]


def test_url_spells_false_as_false() -> None:
    url = listen_url("wss://host/v1/listen", "deepgram", {"punctuate": False, "diarize": True})
    assert query(url)["punctuate"] == ["false"]
    assert query(url)["diarize"] == ["true"]


def test_a_binary_frame_from_the_service_is_malformed_not_parsed() -> None:
    # The service sends text frames; a binary one is refused by the gate.
    body = {"type": "transcript", "transcript": "grüße", "start_time": 0.0, "end_time": 1.0}
    frame = parse_frame(json.dumps(body, ensure_ascii=False).encode(), 16_000)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason.startswith("binary frame")


def transcript(start: float = 0.5, end: float = 1.0, **extra: object) -> str:
    return json.dumps({"type": "transcript", "transcript": "hi", "start_time": start,
                       "end_time": end, **extra}, separators=(",", ":"))


def nested_objects(depth: int) -> str:
    """An error message whose outermost object holds `depth - 1` more."""
    return ('{"type":"error","x":' + '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)
            + ',"y":[]}')


TOO_LONG = '{"type":"error","message":"' + "x" * MAX_TEXT_FRAME_CHARS + '"}'


# What the `stt.malformed_frame` log line says for each refusal: the reason,
# and the start of the frame as it came (escaped and cut to 120 characters).
@pytest.mark.parametrize(
    ("text", "sent", "reason"),
    [
        (TOO_LONG, SECOND, f"{len(TOO_LONG)} characters, over {MAX_TEXT_FRAME_CHARS}"),
        (nested_objects(33), SECOND, "nested deeper than 32"),
        ("[" + "x" * 300, SECOND, "not JSON: Expecting value: line 1 column 2 (char 1)"),
        ("[" + ",".join(["1"] * 100) + "]", SECOND, "not a JSON object"),
        ('{"message":"quota exceeded"}', SECOND, "no type, or not a string"),
        ('{"type":["transcript"]}', SECOND, "no type, or not a string"),
        (transcript(2.0, 1.0), SECOND,
         "bad transcript: frame: Value error, end_time before start_time"),
        (transcript(0.0, 0.5), 0, "transcript before any audio was sent"),
        (transcript(0.5, 5001.0), 10 * SECOND,
         "bad transcript: time 5001s is past the audio sent (10.000s)"),
    ],
    ids=["too long", "too deep", "not JSON", "not an object", "no type", "type not a string",
         "end before start", "before any audio", "past the audio sent"],
)
def test_a_malformed_frame_says_why_and_shows_how_it_began(
    text: str, sent: int, reason: str
) -> None:
    frame = parse_frame(text, sent)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason == reason
    cut = len(text) - 120
    assert frame.excerpt == (text if cut <= 0 else f"{text[:120]}...[{cut} more chars]")


@pytest.mark.parametrize("body", [b'{"type":"transcript"}', b'{"message":"' + b"x" * 300 + b'"}'],
                         ids=["short", "long"])
def test_a_binary_frame_is_shown_as_the_bytes_it_held(body: bytes) -> None:
    frame = parse_frame(body, SECOND)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason == f"binary frame of {len(body)} bytes"
    shown = repr(body)  # b'{"type": ...}' as Python writes bytes
    cut = len(shown) - 120
    assert frame.excerpt == (shown if cut <= 0 else f"{shown[:120]}...[{cut} more chars]")


def test_a_frame_of_exactly_the_size_limit_is_parsed() -> None:
    fits = '{"type":"error","message":"' + "x" * (MAX_TEXT_FRAME_CHARS - 29) + '"}'
    assert len(fits) == MAX_TEXT_FRAME_CHARS
    assert isinstance(parse_frame(fits, SECOND), OtherMessage)
    assert isinstance(parse_frame(fits[:-2] + 'x"}', SECOND), MalformedFrame)


def test_a_frame_nested_exactly_to_the_limit_is_parsed() -> None:
    assert isinstance(parse_frame(nested_objects(32), SECOND), OtherMessage)
    assert isinstance(parse_frame(nested_objects(33), SECOND), MalformedFrame)


def test_a_frame_whose_brackets_are_all_inside_a_string_is_judged_not_crashed_on() -> None:
    frame = parse_frame(json.dumps("[{" * 40), SECOND)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason == "not a JSON object"


@pytest.mark.parametrize(("number", "reason"), [
    ("NaN", "NaN is not a number"),
    ("-Infinity", "-Infinity is not a number"),
    ("1e400", "number out of range: 1e400"),
    # Only the first 20 characters of a long number reach the log line.
    ("1" + "0" * 400 + ".5", "number out of range: 1" + "0" * 19),
], ids=["NaN", "-Infinity", "1e400", "a long number"])
def test_a_number_that_is_not_finite_is_refused_in_any_message(number: str, reason: str) -> None:
    # Not only in a transcript, where the times are checked: what passes the
    # gate is finite, whatever its type.
    frame = parse_frame('{"type":"error","message":"quota","retry_in":' + number + "}", SECOND)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason == f"not JSON: {reason}"


def test_a_lone_surrogate_is_refused_saying_so() -> None:
    frame = parse_frame(transcript(words=[{"text": "a\ud800", "start_time": 0.5,
                                           "end_time": 1.0}]), SECOND)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason == ("bad transcript: words.0.text: Value error, "
                            "not valid Unicode (a lone surrogate)")


def test_a_transcript_after_a_single_sample_of_audio_is_believed() -> None:
    assert isinstance(parse_frame(transcript(0.0, 0.5), 1), TranscriptMessage)


def test_a_partial_of_exactly_the_size_limit_is_skipped_unparsed() -> None:
    partial = transcript(is_partial=True)
    padded = partial[:-1] + ',"pad":"' + "x" * (MAX_TEXT_FRAME_CHARS - len(partial) - 9) + '"}'
    assert len(padded) == MAX_TEXT_FRAME_CHARS
    assert looks_partial(padded)
    assert not looks_partial(padded[:-2] + 'x"}')


def test_a_partial_whose_flag_comes_after_its_words_is_skipped_unparsed() -> None:
    words = [{"text": "hi", "start_time": 0.5, "end_time": 1.0}]
    text = transcript(words=words, is_partial=True)
    assert text.index('"is_partial"') > text.index("]")
    assert looks_partial(text)
    assert looks_partial(transcript(words=words, meta={"a": [1]}, is_partial=True))


@pytest.mark.parametrize("text", [
    '{"type":"error","message":"quota","is_partial":null}',
    transcript(is_partial=None),
], ids=["error", "transcript"])
def test_a_flag_that_is_not_true_is_not_skipped_as_a_partial(text: str) -> None:
    # The error must be logged, the bad transcript counted as malformed.
    assert not looks_partial(text)


def test_a_bad_field_is_named_by_its_path_in_the_frame() -> None:
    text = json.dumps({"type": "transcript", "transcript": "hi", "start_time": 0.0,
                       "end_time": 1.0, "words": [{"text": "hi", "start_time": -1.0,
                                                   "end_time": 0.5}]})
    frame = parse_frame(text, 16_000)
    assert isinstance(frame, MalformedFrame)
    assert "words.0.start_time" in frame.reason


def test_a_message_of_another_type_keeps_its_body() -> None:
    frame = parse_frame('{"type":"error","message":"quota exceeded","code":7}', 160_000)
    assert isinstance(frame, OtherMessage)
    assert frame.type == "error"
    assert frame.body == {"type": "error", "message": "quota exceeded", "code": 7}


def test_a_zero_length_transcript_is_valid() -> None:
    frame = parse_frame('{"type":"transcript","transcript":"","start_time":1.5,"end_time":1.5}',
                        160_000)
    assert isinstance(frame, TranscriptMessage)


def test_samples_and_seconds_convert_both_ways() -> None:
    assert samples_to_seconds(24_000) == 1.5
    assert seconds_to_samples(samples_to_seconds(12_345)) == 12_345


def test_sending_nothing_does_not_start_the_session_timeline() -> None:
    timeline = SessionTimeline()
    timeline.record_send(48_000, 0)
    assert timeline.stream_start is None
    assert timeline.stream_position == 0
    timeline.record_send(64_000, 16_000)
    assert timeline.stream_start == 64_000
    assert timeline.to_stream(0.0) == 64_000


def test_every_word_is_placed_in_stream_time_with_its_text_and_speaker() -> None:
    timeline = SessionTimeline()
    timeline.record_send(160_000, 32_000)
    frame = parse_frame(json.dumps({
        "type": "transcript", "provider": "deepgram", "transcript": "Hello there.",
        "start_time": 0.25, "end_time": 1.0,
        "words": [{"text": "hello", "start_time": 0.25, "end_time": 0.5, "speaker": 1},
                  {"text": "there", "start_time": 0.5, "end_time": 1.0, "speaker": "B"}],
    }), timeline.sent_samples)
    assert isinstance(frame, TranscriptMessage)
    placed = place_final(frame, timeline)
    assert placed == Final(
        text="Hello there.", start=164_000, end=176_000, provider="deepgram",
        words=(Word("hello", 164_000, 168_000, 1), Word("there", 168_000, 176_000, "B")),
    )


def final(start: int, end: int, *words: tuple[str, int, int]) -> Final:
    return Final(" ".join(w[0] for w in words), start, end,
                 tuple(Word(t, s, e, None) for t, s, e in words), "p")


def test_a_final_starting_at_the_acknowledged_point_is_published_whole() -> None:
    filter_ = FinalFilter(acknowledged=100)
    whole = final(100, 300, ("uh", 100, 100), ("yes", 100, 300))
    assert filter_.accept(whole) == whole


def test_a_final_after_the_acknowledged_point_is_published_as_the_service_sent_it() -> None:
    filter_ = FinalFilter(acknowledged=100)
    # A word placed before its final's start (clamped times): still this final's.
    odd = final(200, 300, ("so", 50, 90), ("yes", 200, 300))
    assert filter_.accept(odd) == odd


def test_a_word_ending_exactly_at_the_acknowledged_point_is_not_repeated() -> None:
    filter_ = FinalFilter(acknowledged=100)
    kept = filter_.accept(final(50, 300, ("turn", 50, 100), ("on", 100, 300)))
    assert kept is not None
    assert [w.text for w in kept.words] == ["on"]


def test_a_replayed_final_whose_words_were_all_delivered_still_moves_the_mark() -> None:
    filter_ = FinalFilter(acknowledged=100)
    assert filter_.accept(final(50, 150, ("turn", 50, 90), ("on", 95, 100))) is None
    assert filter_.acknowledged == 150
    assert filter_.accept(final(150, 200, ("off", 150, 200))) is not None


def test_one_second_of_backlog_at_double_speed_waits_half_a_second() -> None:
    pacer = ReplayPacer(speed=2.0, burst_seconds=0.0)
    assert pacer.delay_before(0.0, 1.0) == 0.5


def test_pacing_does_not_depend_on_the_clock_origin() -> None:
    pacer = ReplayPacer(speed=1.25, burst_seconds=0.5)
    now = 5_000.0  # a monotonic clock is far from zero
    start, sent = now, 0.0
    while sent < 60.0:
        now += pacer.delay_before(now, 0.25)
        pacer.sent(0.25)
        sent += 0.25
    assert now - start == pytest.approx((60.0 - 0.5) / 1.25, abs=0.25)
