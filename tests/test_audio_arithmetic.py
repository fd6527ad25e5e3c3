"""Gain, clipping counts and the audio telemetry's schedule, without I/O."""

from __future__ import annotations

import json
import math
from array import array

import pytest

from edged.audio import pcm
from edged.audio.gain import Gain
from edged.audio.telemetry import AudioTelemetry, Context
from edged.monitor.level import FLOOR_DBFS, LevelMeter

EVERY_SAMPLE = array("h", range(-32768, 32768))
SECOND = 16_000


def samples(data: bytes) -> list[int]:
    values = array("h")
    values.frombytes(data)
    return values.tolist()


def sine(peak: int, seconds: float, frequency: float = 1000.0) -> bytes:
    return array("h", (round(peak * math.sin(2 * math.pi * frequency * n / SECOND))
                       for n in range(round(seconds * SECOND)))).tobytes()


def peak_for(dbfs: float) -> int:
    return min(round(32768 * 10 ** (dbfs / 20)), 32767)


# -- gain ---------------------------------------------------------------------


def test_zero_gain_passes_the_very_same_bytes() -> None:
    data = sine(1000, 0.25)
    assert Gain(0.0).apply(data) is data


@pytest.mark.parametrize("db", [-20.0, -6.0, -0.5, 0.5, 6.0, 12.0, 20.0, 30.0])
def test_gain_of_every_sample_value_saturates_at_the_rails(db: float) -> None:
    factor = 10 ** (db / 20)
    out = samples(Gain(db).apply(EVERY_SAMPLE.tobytes()))
    expected = [max(-32768, min(32767, math.floor(x * factor))) for x in EVERY_SAMPLE]
    assert out == expected
    assert out == sorted(out), "louder in, never quieter out: no wrap-around"
    assert all(y == 0 or (x < 0) == (y < 0) for x, y in zip(EVERY_SAMPLE, out, strict=True)), \
        "no sign flips"


def test_plus_20_db_is_ten_times_and_stops_exactly_at_the_rails() -> None:
    out = samples(Gain(20.0).apply(array("h", [1, -1, 3276, 3277, -3276, -3277, 32767,
                                                -32768]).tobytes()))
    assert out == [10, -10, 32760, 32767, -32760, -32768, 32767, -32768]


def test_a_stray_odd_byte_passes_through() -> None:
    out = Gain(6.0).apply(array("h", [100, -100]).tobytes() + b"\x07")
    assert len(out) == 5
    assert out[-1:] == b"\x07"
    assert samples(out[:4]) == [199, -200]


# -- clipping -------------------------------------------------------------------


def test_clipped_samples_are_those_within_one_lsb_of_a_rail_for_every_value() -> None:
    for value in EVERY_SAMPLE:
        one = array("h", [value]).tobytes()
        assert pcm.clipped(one) == (1 if value >= 32766 or value <= -32767 else 0), value
    assert pcm.clipped(EVERY_SAMPLE.tobytes()) == 4


def test_level_meter_reports_the_share_of_clipped_samples() -> None:
    meter = LevelMeter()
    quiet = array("h", [1000] * (SECOND - 4) + [32767, -32768, 32766, -32767])
    meter.feed(quiet.tobytes())
    assert meter.snapshot().clipped_share == pytest.approx(4 / SECOND)
    meter.feed(array("h", [32767, -32768] * 800).tobytes())  # a full-scale square
    level = meter.snapshot()
    assert level.clipped_share == 1.0
    assert level.clipping
    meter.feed(sine(peak_for(-20), 0.5))
    assert meter.snapshot().clipped_share == 0.0


def test_level_meter_resolves_a_quiet_room_below_one_lsb_of_rms() -> None:
    meter = LevelMeter()
    meter.feed(array("h", [1, -2, 2, -1] * 4000).tobytes())  # rms = sqrt(2.5) = 1.58
    assert meter.snapshot().rms_dbfs == pytest.approx(20 * math.log10(math.sqrt(2.5) / 32768),
                                                      abs=0.01)


# -- the telemetry schedule ---------------------------------------------------------


def context(microphone: str = "ok", gain_db: float = 0.0, connection: int = 1) -> Context:
    return Context(microphone, gain_db, connection)


def feed_seconds(telemetry: AudioTelemetry, pcm_second: bytes, seconds: int) -> list[bool]:
    """Feed `seconds` of audio in 250 ms hand-offs; what feed said each time."""
    quarter = len(pcm_second) // 4
    return [telemetry.feed(pcm_second[i * quarter:(i + 1) * quarter])
            for _ in range(seconds) for i in range(4)]


QUIET = sine(peak_for(-60), 1.0)
LOUD = sine(peak_for(-20), 1.0)


def started(interval_s: float = 10.0, change_db: float = 6.0) -> AudioTelemetry:
    """A telemetry that reported quiet audio at t=100."""
    telemetry = AudioTelemetry(interval_s, change_db, now=99.0)
    feed_seconds(telemetry, QUIET, 1)
    assert telemetry.due(context(), 100.0), "the first report is due at once"
    telemetry.report(context(), 100.0)
    return telemetry


def test_reports_come_on_the_interval_while_the_level_holds() -> None:
    telemetry = started()
    assert not any(feed_seconds(telemetry, QUIET, 9))
    assert not telemetry.due(context(), 109.9)
    assert telemetry.due_in(105.0) == pytest.approx(5.0)
    assert telemetry.due(context(), 110.0)
    report = json.loads(telemetry.report(context(), 110.0))
    assert report["interval_s"] == 10.0
    assert report["rms_dbfs"] == pytest.approx(-63.0, abs=0.1)
    assert report["peak_dbfs"] == pytest.approx(-60.0, abs=0.15)  # a peak of 33: -59.94
    assert report["clipping"] == 0.0
    assert (report["microphone"], report["gain_db"]) == ("ok", 0.0)


def test_a_level_change_reports_early_but_after_a_whole_second_of_it() -> None:
    telemetry = started()
    said = feed_seconds(telemetry, LOUD, 1)
    assert said == [False, False, False, True], "judged on a second of audio, not a hand-off"
    assert telemetry.due(context(), 101.0)
    report = json.loads(telemetry.report(context(), 101.0))
    assert report["rms_dbfs"] == pytest.approx(-23.0, abs=0.1)
    assert report["interval_s"] == 1.0


def test_a_room_going_quiet_is_seen_within_a_second_even_after_a_loud_window() -> None:
    telemetry = started()
    feed_seconds(telemetry, LOUD, 1)
    telemetry.report(context(), 101.0)
    assert not any(feed_seconds(telemetry, LOUD, 8))
    assert feed_seconds(telemetry, QUIET, 1)[-1], "the last second moved, whatever the window"
    first = json.loads(telemetry.report(context(), 110.0))
    assert first["rms_dbfs"] > -30, "the window was loud for most of its time"
    assert feed_seconds(telemetry, QUIET, 1)[-1], "so the next second reports again"
    assert json.loads(telemetry.report(context(), 111.0))["rms_dbfs"] == pytest.approx(
        -63.0, abs=0.1)


def test_small_changes_wait_for_the_interval() -> None:
    telemetry = started()
    five_db_up = sine(peak_for(-55), 1.0)
    assert not any(feed_seconds(telemetry, five_db_up, 3))
    assert not telemetry.due(context(), 103.0)


def test_level_changes_are_reported_at_most_once_a_second() -> None:
    telemetry = started()
    assert feed_seconds(telemetry, LOUD, 2)[-1]  # two seconds of audio in a burst
    assert not telemetry.due(context(), 100.4), "within a second of the last report"
    assert telemetry.due_in(100.4) == pytest.approx(0.6)
    assert telemetry.due(context(), 101.0)


def test_no_change_threshold_means_the_interval_only() -> None:
    telemetry = started(change_db=0.0)
    assert not any(feed_seconds(telemetry, LOUD, 3))
    assert not telemetry.due(context(), 103.0)


@pytest.mark.parametrize("changed", [context(microphone="silent"), context(gain_db=12.0),
                                     context(connection=2)])
def test_the_microphone_the_gain_or_a_new_connection_report_at_once(changed: Context) -> None:
    telemetry = started()
    assert not telemetry.due(context(), 100.1)
    assert telemetry.due(changed, 100.1)


def test_no_audio_reports_no_level() -> None:
    telemetry = AudioTelemetry(10.0, 6.0, now=0.0)
    report = json.loads(telemetry.report(context(microphone="absent"), 10.0))
    assert report == {"rms_dbfs": None, "peak_dbfs": None, "clipping": None,
                      "microphone": "absent", "gain_db": 0.0, "interval_s": 10.0}


def test_digital_silence_is_the_floor_not_no_level() -> None:
    telemetry = AudioTelemetry(10.0, 6.0, now=0.0)
    feed_seconds(telemetry, bytes(2 * SECOND), 2)
    report = json.loads(telemetry.report(context(microphone="silent"), 2.0))
    assert (report["rms_dbfs"], report["peak_dbfs"], report["clipping"]) == (
        FLOOR_DBFS, FLOOR_DBFS, 0.0)
