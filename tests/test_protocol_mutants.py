"""The protocol core, edge cases found by mutation testing (docs/testing.md):
what a URL keeps, what a bad frame says, where words land, which words a
straddling final keeps, and how a backlog is paced."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

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
    samples_to_seconds,
    seconds_to_samples,
)


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


LONG = "x" * 300


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"\xff" + LONG.encode(), "binary frame"),
        ("[" + LONG, "not JSON: "),
        ("[" + ",".join(["1"] * 100) + "]", "not a JSON object"),
        ('{"type":"transcript","transcript":"x","start_time":2.0,"end_time":1.0,"pad":"'
         + LONG + '"}', "bad transcript: "),
    ],
)
def test_a_malformed_frame_says_why_and_shows_how_it_began(text: str | bytes, reason: str) -> None:
    frame = parse_frame(text, 16_000)
    assert isinstance(frame, MalformedFrame)
    assert frame.reason.startswith(reason)
    assert 0 < len(frame.excerpt) <= 160, "an excerpt, escaped and cut, not the frame"
    assert "\n" not in frame.excerpt


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
