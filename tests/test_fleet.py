"""`edged fleet` without a broker: parsing hostile payloads, the trouble order, the table."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edged.fleet.model import (
    MAX_DEVICES,
    MAX_PAYLOAD,
    MUTED,
    Device,
    Fleet,
    as_json,
    ordered,
    trouble,
)
from edged.fleet.table import age_text, render

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
HEALTHY = {"status": "streaming", "version": "0.2.0", "reconnects": 1, "outbox_depth": 0,
           "microphone": "ok", "storage": "ok", "muted": False,
           "last_transcript_at": "2026-03-01T11:58:00.000Z"}


def fleet_of(devices: dict[str, dict[str, Any]]) -> Fleet:
    """A fleet fed retained messages: per device its `state` (a dict, or raw bytes),
    `availability` and `audio`."""
    fleet = Fleet("edged")
    for name, parts in devices.items():
        for kind, value in parts.items():
            payload = value if isinstance(value, bytes) else (
                value.encode() if isinstance(value, str) else json.dumps(value).encode())
            fleet.receive(f"edged/{name}/{kind}", payload)
    return fleet


def online(state: dict[str, Any] | bytes, **more: Any) -> dict[str, Any]:
    return {"availability": "online", "state": state, **more}


# -- the order ----------------------------------------------------------------------

ONE_OF_EACH = {
    "a-healthy": online(HEALTHY),
    "b-listening": online({**HEALTHY, "status": "listening"}),
    "c-muted": online({**HEALTHY, "status": "muted", "muted": True, "microphone": "absent"}),
    "d-reconnecting": online({**HEALTHY, "status": "reconnecting"}),
    "e-backlog": online({**HEALTHY, "outbox_depth": 12}),
    "f-storage": online({**HEALTHY, "storage": "full"}),
    "g-auth": online({**HEALTHY, "status": "auth_failed"}),
    "h-silent": online({**HEALTHY, "microphone": "silent"}),
    "i-stalled": online({**HEALTHY, "status": "microphone_stalled", "microphone": "stalled"}),
    "j-nomic": online({**HEALTHY, "status": "no_microphone", "microphone": "absent"}),
    "k-garbled": online(b"{not json"),
    "l-offline": {"availability": "offline", "state": HEALTHY},
}
WORST_FIRST = ["l-offline", "k-garbled", "j-nomic", "i-stalled", "h-silent", "g-auth",
               "f-storage", "e-backlog", "d-reconnecting", "c-muted", "a-healthy", "b-listening"]


def test_devices_in_trouble_come_first_the_worst_kind_first() -> None:
    names = list(ONE_OF_EACH)
    random.Random(7).shuffle(names)
    fleet = fleet_of({name: ONE_OF_EACH[name] for name in names})
    assert [device.id for device in ordered(list(fleet.devices.values()))] == WORST_FIRST


def test_each_trouble_says_why_and_healthy_says_nothing() -> None:
    fleet = fleet_of(ONE_OF_EACH)
    reasons = {name: trouble(device)[1] for name, device in fleet.devices.items()}
    assert reasons == {
        "a-healthy": None, "b-listening": None, "c-muted": None,
        "d-reconnecting": "reconnecting", "e-backlog": "12 queued",
        "f-storage": "storage full", "g-auth": "STT auth failed",
        "h-silent": "microphone silent", "i-stalled": "microphone stalled",
        "j-nomic": "no microphone", "k-garbled": "unreadable state", "l-offline": "offline",
    }


def test_a_muted_device_has_released_its_microphone_on_purpose() -> None:
    muted = fleet_of({"m": online({**HEALTHY, "status": "muted", "microphone": "absent",
                                   "muted": True})}).devices["m"]
    assert trouble(muted) == (MUTED, None), "muted is healthy, sorted before the rest"
    # Muted but its disk full: the disk is the news.
    full = fleet_of({"m": online({**HEALTHY, "status": "muted", "storage": "full"})}).devices["m"]
    assert trouble(full)[1] == "storage full"


def test_within_a_kind_devices_are_by_id() -> None:
    fleet = fleet_of({name: {"availability": "offline"} for name in ("c", "a", "b")})
    assert [device.id for device in ordered(list(fleet.devices.values()))] == ["a", "b", "c"]


def test_a_device_without_a_state_or_availability_is_not_called_healthy() -> None:
    fleet = fleet_of({"quiet": {"availability": "online"}, "ghost": {"state": HEALTHY}})
    assert trouble(fleet.devices["quiet"])[1] == "no state"
    assert trouble(fleet.devices["ghost"])[1] == "availability unknown"


# -- hostile payloads -----------------------------------------------------------------


@pytest.mark.parametrize(("payload", "problem"), [
    (b"not json", "state is not JSON"),
    (b"\xff\xfe{}", "state is not JSON"),
    (b"[1, 2]", "state is not a JSON object"),
    (b"[" * 50_000 + b"]" * 50_000, "state too large"),
    (b"[" * 30_000 + b"]" * 30_000, "state is not JSON"),  # nested past the stack
    (b'{"status": "' + b"x" * MAX_PAYLOAD + b'"}', "state too large"),
])
def test_an_unreadable_state_marks_its_device(payload: bytes, problem: str) -> None:
    device = fleet_of({"bad": online(payload)}).devices["bad"]
    assert device.problems["state"].startswith(problem)
    assert trouble(device)[1] == "unreadable state"
    assert device.status is None


def test_a_field_of_the_wrong_type_is_unknown_and_the_rest_is_kept() -> None:
    state = {**HEALTHY, "reconnects": "many", "outbox_depth": -1, "muted": "yes",
             "status": 3, "last_transcript_at": "yesterday"}
    device = fleet_of({"odd": online(state)}).devices["odd"]
    assert (device.reconnects, device.outbox_depth, device.muted, device.status) == (
        None, None, None, None)
    assert device.version == "0.2.0"
    assert device.storage == "ok"
    problems = device.problems["state"]
    for key in ("reconnects", "outbox_depth", "muted", "status", "last_transcript_at"):
        assert key in problems
    row = as_json([device], NOW)[0]
    assert row["error"] == problems
    assert row["trouble"] == "unreadable state"


def test_audio_and_availability_payloads_are_checked_too() -> None:
    fleet = fleet_of({
        "loud": online(HEALTHY, audio={"rms_dbfs": "loud", "clipping": 0}),
        "nan": online(HEALTHY, audio=b'{"rms_dbfs": NaN}'),
        "maybe": {"availability": "perhaps", "state": HEALTHY},
    })
    assert "rms_dbfs is not a number" in fleet.devices["loud"].problems["audio"]
    assert "rms_dbfs is not a number" in fleet.devices["nan"].problems["audio"]
    assert trouble(fleet.devices["loud"])[1] == "odd audio"
    assert trouble(fleet.devices["maybe"])[1] == "availability unknown"
    assert "neither online nor offline" in fleet.devices["maybe"].problems["availability"]


def test_numbers_and_times_out_of_any_range_are_marked_not_raised() -> None:
    fleet = fleet_of({
        "digits": online(HEALTHY, audio=b'{"rms_dbfs": ' + b"9" * 400 + b"}"),
        "year-one": online({**HEALTHY, "last_transcript_at": "0001-01-01T00:00:00+14:00"}),
    })
    assert "rms_dbfs is not a number" in fleet.devices["digits"].problems["audio"]
    assert fleet.devices["digits"].rms_dbfs is None
    year_one = fleet.devices["year-one"]
    assert "last_transcript_at is out of range" in year_one.problems["state"]
    assert year_one.last_transcript_at is None
    rows = {row["device"]: row for row in as_json(list(fleet.devices.values()), NOW)}
    json.dumps(rows)  # what `edged fleet --json` prints
    assert rows["year-one"]["trouble"] == "unreadable state"


def test_a_message_that_cannot_be_taken_marks_its_device() -> None:
    fleet = fleet_of({"x": online(HEALTHY)})
    fleet.failed("edged/x/audio", "not understood (OverflowError)")
    fleet.failed("edged/unknown/audio", "not understood (OverflowError)")  # no new device
    fleet.failed("elsewhere", "not understood (OverflowError)")
    assert fleet.devices["x"].problems == {"audio": "not understood (OverflowError)"}
    assert set(fleet.devices) == {"x"}


def test_a_fixed_payload_clears_its_problem() -> None:
    fleet = fleet_of({"x": online(b"garbage")})
    fleet.receive("edged/x/state", json.dumps(HEALTHY).encode())
    assert fleet.devices["x"].problems == {}
    assert trouble(fleet.devices["x"])[1] is None


def test_an_unprintable_device_id_is_marked() -> None:
    fleet = fleet_of({"evil\u202eid\u2028": online(HEALTHY)})
    (device,) = fleet.devices.values()
    assert device.problems == {"device": "device id has unprintable characters"}


def test_cleared_retained_messages_remove_the_device() -> None:
    fleet = fleet_of({"gone": online(HEALTHY, audio={"rms_dbfs": -40})})
    for kind in ("state", "availability"):
        fleet.receive(f"edged/gone/{kind}", b"")
        assert "gone" in fleet.devices
    fleet.receive("edged/gone/audio", b"")
    assert "gone" not in fleet.devices
    assert not fleet.receive("edged/never/state", b""), "clearing an unknown device adds none"


def test_other_topics_are_ignored_and_new_devices_reported() -> None:
    fleet = Fleet("home/edged")
    assert fleet.subscriptions == ["home/edged/+/state", "home/edged/+/availability",
                                   "home/edged/+/audio"]
    assert not fleet.receive("home/edged/a/transcript", b"{}")
    assert not fleet.receive("home/edged/a/b/state", b"{}")
    assert not fleet.receive("elsewhere/a/state", b"{}")
    assert fleet.receive("home/edged/a/state", b"{}")
    assert not fleet.receive("home/edged/a/availability", b"online")  # known already
    assert list(fleet.devices) == ["a"]


def test_the_number_of_devices_is_bounded() -> None:
    fleet = Fleet("edged")
    for number in range(MAX_DEVICES + 5):
        fleet.receive(f"edged/d{number}/availability", b"online")
    assert len(fleet.devices) == MAX_DEVICES
    assert fleet.overflow


# -- JSON ---------------------------------------------------------------------------


def test_json_rows_carry_every_field_and_the_age() -> None:
    fleet = fleet_of({"k": online(HEALTHY, audio={"rms_dbfs": -33.5, "peak_dbfs": -10.0,
                                                  "clipping": 0.001}),
                      "old": online({"status": "streaming"})})
    rows = {row["device"]: row for row in as_json(list(fleet.devices.values()), NOW)}
    assert rows["k"] == {
        "device": "k", "online": True, "status": "streaming", "muted": False, "trouble": None,
        "last_transcript_at": "2026-03-01T11:58:00.000Z", "last_transcript_age_s": 120.0,
        "reconnects": 1, "outbox_depth": 0, "level_dbfs": -33.5, "peak_dbfs": -10.0,
        "clipping": 0.001, "microphone": "ok", "storage": "ok", "version": "0.2.0",
        "error": None}
    # An older daemon: what it does not report is unknown, not false.
    assert rows["old"]["muted"] is None
    assert rows["old"]["level_dbfs"] is None


# -- the table ------------------------------------------------------------------------


def rendered(devices: dict[str, dict[str, Any]], width: int = 160) -> list[str]:
    fleet = fleet_of(devices)
    return render(list(fleet.devices.values()), NOW, width, title="edged fleet")


def column(lines: list[str], heading: str) -> int:
    header = next(line for line in lines if "DEVICE" in line)
    return header.index(heading)


def name_of(line: str) -> str | None:
    """The device a table row is for (after the one-character mark and a space)."""
    words = line[2:].split()
    return words[0] if line[:1] in ("!", " ") and line[1:2] == " " and line[2:3] != " " else None


def rows_of(lines: list[str]) -> dict[str, str]:
    return {name: line for line in lines if (name := name_of(line)) and name != "DEVICE"}


def test_the_table_shows_each_field_under_its_heading() -> None:
    lines = rendered({
        "kitchen": online(HEALTHY, audio={"rms_dbfs": -30.0, "peak_dbfs": -6.0,
                                          "clipping": 0.01}),
        "hall": {"availability": "offline", "state": {**HEALTHY, "reconnects": 7}},
        "attic": online({**HEALTHY, "status": "muted", "muted": True,
                         "last_transcript_at": None}),
    })
    assert "3 devices, 1 needs a look" in lines[0]
    rows = rows_of(lines)
    assert list(rows) == ["hall", "attic", "kitchen"]
    assert rows["hall"].startswith("!")
    assert rows["attic"].startswith(" "), "muted on purpose is no trouble"
    assert rows["kitchen"].startswith(" ")

    def cell(name: str, heading: str) -> str:
        return rows[name][column(lines, heading):].split()[0]

    assert cell("hall", "STATUS") == "offline"
    assert cell("hall", "RECONN") == "7"
    assert cell("kitchen", "LAST TEXT") == "2"
    assert "2 min" in rows["kitchen"]
    assert cell("attic", "LAST TEXT") == "never"
    assert cell("attic", "MUTED") == "yes"
    assert cell("kitchen", "MUTED") == "no"
    assert cell("kitchen", "VERSION") == "0.2.0"
    assert re.search(r"-30\.0 \[####\.\.\.\.\] CLIP", rows["kitchen"])
    assert cell("hall", "LEVEL dBFS") == "?"


def test_hostile_text_neither_reaches_the_terminal_nor_moves_the_columns() -> None:
    evil_state = {**HEALTHY, "status": "streaming\x1b[2J\x1b]0;owned\x07", "version": "\n" * 50}
    lines = rendered({
        "a\u202eevil\u2028id" + "x" * 300: online(evil_state),
        "plain": online(HEALTHY),
        "garbled": online(b"\x1b[31m{"),
    })
    text = "\n".join(lines)
    assert all(line.isprintable() for line in lines)
    assert "\\u202e" in text
    assert "\\x1b[2J" in text
    heading = column(lines, "STATUS")
    rows = rows_of(lines)
    assert set(rows) == {"plain", "garbled", next(name for name in rows if "evil" in name)}
    for name in ("plain", "garbled"):
        assert rows[name][heading - 1] == " "
        assert rows[name][heading] != " "
    garbled = lines.index(rows["garbled"])
    assert lines[garbled + 1].strip() == "! state is not JSON"


@pytest.mark.parametrize("width", [20, 40, 80, 200])
def test_no_line_is_wider_than_the_screen(width: int) -> None:
    lines = rendered({f"device-{n}" * 5: online(HEALTHY) for n in range(3)}, width)
    assert all(len(line) <= width for line in lines)


def test_an_empty_broker_says_so() -> None:
    assert "  (no edged has published here yet)" in rendered({})


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (59.9, "59 s"), (60, "1 min"), (3599, "59 min"), (7200, "2 h"),
    (86400 * 3 + 5, "3 d"),
])
def test_ages_are_short(seconds: float, text: str) -> None:
    assert age_text(seconds) == text


def test_a_clock_ahead_of_ours_is_no_negative_age() -> None:
    ahead = (NOW + timedelta(minutes=5)).isoformat()
    device = fleet_of({"a": online({**HEALTHY, "last_transcript_at": ahead})}).devices["a"]
    assert as_json([device], NOW)[0]["last_transcript_age_s"] == 0.0


def test_a_device_of_an_older_version_has_unknown_fields() -> None:
    device = Device("old", has_availability=True, online=True, has_state=True,
                    status="streaming")
    line = rows_of(render([device], NOW, 160, title="t"))["old"]
    assert line.split() == ["old", "streaming", "?", "?", "?", "?", "?", "?"]
