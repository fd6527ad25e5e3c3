"""The privacy mute, end to end: a real mosquitto, the STT double that counts
what it receives, a FIFO microphone whose writer sees whether anybody reads,
real daemons, a real notify socket, real full and read-only state dirs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import pytest

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.notify import NotifySocket
from tests.support.storage import fill, read_only, tmpfs
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.support.waiting import assert_quiet, wait_until
from tests.test_control import ask, until_answering
from tests.test_end_to_end import assert_captured_at, assert_no_late_transcripts
from tests.test_storage_faults import wait_for_state

STATE = "edged/testpi/state"
MUTE = "edged/testpi/mute"
MUTE_SET = "edged/testpi/mute/set"
TRANSCRIPT = "edged/testpi/transcript"
SWITCH_CONFIG = "homeassistant/switch/edged_testpi/mute/config"
CONTROL = {"enabled": True}
WATCHDOG_USEC = 2_000_000  # a ping every second


def command(stack: Stack, payload: bytes | str, retain: bool = False) -> None:
    publish.single(MUTE_SET, payload, qos=1, retain=retain, hostname="127.0.0.1",
                   port=stack.broker.port)


def is_muted(state: dict[str, Any]) -> bool:
    return bool(state["muted"] and state["status"] == "muted" and not state["microphone_open"]
                and not state["stt_connected"] and state["stt_state"] == "closed")


def is_streaming(state: dict[str, Any]) -> bool:
    return (not state["muted"] and state["status"] == "streaming"
            and state["microphone"] == "ok")


def received(stt: SttDouble) -> int:
    return sum(session.bytes_received for session in stt.sessions)


def spooled(stack: Stack) -> list[Path]:
    return list((stack.home / "state").glob("spool/*.spool"))


def spooled_bytes(stack: Stack) -> int:
    return sum(path.stat().st_size for path in spooled(stack))


def mute_states(subscriber: Subscriber, since: int = 0) -> list[bytes]:
    """What the retained mute topic said, in order, so far (from seen[since])."""
    subscriber.pending()
    return [m.payload for m in subscriber.seen[since:] if m.topic == MUTE]


def flag(stack: Stack) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((stack.home / "state" / "mute.json").read_bytes())
    return loaded


def assert_nothing_heard_while_muted(stack: Stack, stt: SttDouble, mic: FifoMic,
                                     for_s: float = 1.5) -> None:
    """Speech into a muted microphone: nobody reads the FIFO, the STT double
    gets not one byte and no connection, nothing is spooled (a backlog from
    before the mute, if any, stays as it was)."""
    wait_until(lambda: not mic.reader_attached, "the microphone to be released", timeout=5)
    before, sessions, on_disk = received(stt), len(stt.sessions), spooled_bytes(stack)
    audio, _ = script([["golf", "hotel"]])
    mic.play(audio)
    assert_quiet(lambda: (received(stt) == before and len(stt.sessions) == sessions
                          and not mic.reader_attached and not mic.idle
                          and spooled_bytes(stack) == on_disk),
                 for_s, "no audio may be read, sent or spooled while muted")
    mic.drop_queued()  # said to a closed microphone: gone, not heard after the unmute


def test_mute_over_mqtt_releases_the_microphone_and_the_session_and_unmute_goes_on(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    stack.daemon(control=CONTROL)
    assert subscriber.next(MUTE, timeout=20).payload == b"OFF"
    audio, _ = script([["alpha", "bravo"]])
    mic.play(audio)
    first = subscriber.next(TRANSCRIPT, timeout=20).json()
    assert first["text"] == "Alpha bravo."

    command(stack, b" on\n")  # any case, whitespace trimmed
    muted = wait_for_state(subscriber, is_muted)
    assert muted["microphone"] == "muted"
    assert mute_states(subscriber)[-1] == b"ON"
    assert stt.sessions[0].close_stream_received, "the session was closed cleanly"
    assert flag(stack)["muted"] is True
    assert_nothing_heard_while_muted(stack, stt, mic)

    command(stack, b"OFF")
    unmuted = wait_for_state(subscriber, is_streaming)
    assert unmuted["reconnects"] == 0, "an unmute is not a reconnect"
    assert mute_states(subscriber)[-2:] == [b"ON", b"OFF"]
    assert flag(stack)["muted"] is False
    audio, truth = script([["charlie", "delta"]])
    offset = mic.play(audio)
    after = subscriber.next(TRANSCRIPT, timeout=20).json()

    assert after["text"] == "Charlie delta."
    # Stamped with when it was said, not with the time the mute began.
    assert_captured_at([after], truth, offset, mic)
    assert after["seq"] == first["seq"] + 1, "the outbox goes on: nothing lost, nothing twice"
    assert after["stream_id"] == first["stream_id"]
    assert after["start"] > first["end"], "stream time goes on across the mute"
    assert len(stt.sessions) == 2
    assert stt.sessions[1].finals_sent == 1, "nothing from before the mute was sent again"
    assert_no_late_transcripts(subscriber)
    assert not spooled(stack)


def test_the_mute_request_verb_mutes_a_device_or_the_whole_fleet(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """The `mute` request of fleet control: the same mute as the command topic,
    answered with the state it left, to one device or to every device."""
    stack.daemon(control=CONTROL)
    until_answering(subscriber, "testpi")
    assert ask(subscriber, "testpi", "mute", {})["data"] == {"muted": False}

    answer = ask(subscriber, "testpi", "mute", {"state": "ON"}, fleet=True)
    assert answer["status"] == "ok"
    assert answer["data"] == {"muted": True}
    wait_for_state(subscriber, is_muted)
    assert flag(stack)["muted"] is True
    assert_nothing_heard_while_muted(stack, stt, mic)

    refused = ask(subscriber, "testpi", "mute", {"state": "maybe"})
    assert refused["status"] == "error"
    assert ask(subscriber, "testpi", "mute", {})["data"] == {"muted": True}, "still muted"

    assert ask(subscriber, "testpi", "mute", {"state": False})["data"] == {"muted": False}
    wait_for_state(subscriber, is_streaming)
    assert mute_states(subscriber)[-2:] == [b"ON", b"OFF"]


def test_a_mute_taken_back_at_once_leaves_the_daemon_listening(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """ON and OFF in one go (one read of the broker's stream, handled before
    the mute is carried out): the session the mute closed is followed by a
    new one, not by a daemon that reconnects forever."""
    stack.daemon(control=CONTROL)
    wait_for_state(subscriber, lambda s: is_streaming(s) and s["stt_connected"])
    publish.multiple([{"topic": MUTE_SET, "payload": word, "qos": 1}
                      for _ in range(5) for word in (b"ON", b"OFF")],
                     hostname="127.0.0.1", port=stack.broker.port)
    wait_until(lambda: len(stt.sessions) >= 2, "the mute to close the first session")
    wait_for_state(subscriber, lambda s: is_streaming(s) and s["stt_connected"])
    audio, _ = script([["hotel", "echo"]])
    mic.play(audio)
    assert subscriber.next(TRANSCRIPT, timeout=20).json()["text"] == "Hotel echo."
    assert flag(stack)["muted"] is False


def test_a_mute_in_an_stt_outage_stops_the_retries_and_the_unmute_sends_the_backlog_once(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon(control=CONTROL)
    daemon.wait_for_log("stt.connected")
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 10_000
    stt.abort_connections()
    audio, _ = script([["alpha", "bravo"]])
    mic.play(audio)  # said before the mute, while the service is away: a backlog
    mic.wait_idle()
    wait_until(lambda: stt.refused >= 1, "a refused reconnect")
    command(stack, b"ON")
    wait_for_state(subscriber, is_muted)
    refused = stt.refused
    assert_nothing_heard_while_muted(stack, stt, mic, for_s=2.0)
    assert stt.refused == refused, "no reconnect loop while muted"

    stt.faults.refuse_count = 0
    command(stack, b"OFF")
    backlog = subscriber.next(TRANSCRIPT, timeout=20).json()
    assert backlog["text"] == "Alpha bravo.", "said before the mute: sent after it, once"
    audio, _ = script([["charlie"]])
    mic.play(audio)
    after = subscriber.next(TRANSCRIPT, timeout=20).json()
    assert after["text"] == "Charlie."
    assert after["seq"] == backlog["seq"] + 1
    assert_no_late_transcripts(subscriber)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    socket = NotifySocket(tmp_path / "notify.sock")
    yield socket
    socket.close()


def test_a_mute_survives_a_restart_a_reload_and_feeds_the_watchdog(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, notify: NotifySocket
) -> None:
    first = stack.daemon(control=CONTROL)
    first.wait_for_log("stt.connected")
    command(stack, b"ON")
    wait_for_state(subscriber, is_muted)
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    sessions = len(stt.sessions)
    subscriber.pending()
    since = len(subscriber.seen)  # what the second daemon says

    daemon = stack.daemon(control=CONTROL, env={"NOTIFY_SOCKET": str(notify.path),
                                                "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    _, ready = notify.wait_for_fields("READY", "1")
    assert ready["STATUS"].startswith("muted;"), ready
    pings = notify.wait_for_pings(4)
    assert max(b - a for a, b in itertools.pairwise(pings)) <= 1.5, pings
    state = wait_for_state(subscriber, lambda s: s["muted"])
    assert state["status"] == "muted"
    assert state["microphone"] == "muted"
    assert mute_states(subscriber, since) == [b"ON"]
    assert "microphone.stalled" not in daemon.log
    assert "microphone.silent" not in daemon.log
    assert not mic.reader_attached, "a muted daemon never opens the microphone"
    assert_nothing_heard_while_muted(stack, stt, mic, for_s=1.0)

    stack.config(control=CONTROL, audio={"silent_after_s": 30})  # a new microphone setup
    asked_at = time.monotonic()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded")
    reloaded = notify.wait_for_fields("READY", "1", after=asked_at)[1]
    assert reloaded["STATUS"].startswith("muted;")
    assert_nothing_heard_while_muted(stack, stt, mic, for_s=1.0)
    assert len(stt.sessions) == sessions, "no STT connection while muted"

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0, "a stop while muted is a clean stop"


def test_mute_commands_must_be_live_well_formed_and_allowed(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    command(stack, b"ON", retain=True)  # left at the broker by some automation
    daemon = stack.daemon(control=CONTROL)
    daemon.wait_for_log("control.mute_ignored reason=retained")
    # Five: the log lets through five warnings of a kind a minute (a flood
    # of bad commands cannot flood the journal).
    hostile = [b"maybe", b"\xff\xfe", b"\x1b[31mON\nfake line", b"O N", b""]
    for payload in hostile:
        command(stack, payload)
    wait_until(lambda: daemon.log.count("control.mute_refused") == len(hostile),
               "each bad command to be refused")
    assert "\x1b" not in daemon.log
    assert "\nfake line" not in daemon.log
    assert "\\x1b[31mON\\nfake line" in daemon.log
    command(stack, b"off")  # unmuted already: nothing to do, said so
    daemon.wait_for_log("privacy.unmuted source=mqtt unchanged=true")
    assert "privacy.muted" not in daemon.log
    assert not (stack.home / "state" / "mute.json").exists(), "never muted, nothing written"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0

    stack.daemon()  # control off (the default): the topic is not even listened to
    stack.daemons[-1].wait_for_log("stt.connected")
    command(stack, b"ON")
    subscriber.sync()
    assert_quiet(lambda: "privacy.muted" not in stack.daemons[-1].log, 1.0,
                 "no mute without control")
    audio, _ = script([["echo"]])
    mic.play(audio)
    assert subscriber.next(TRANSCRIPT, timeout=20).json()["text"] == "Echo."


def test_the_home_assistant_switch_follows_control_and_reloads(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    daemon = stack.daemon(control=CONTROL)
    daemon.wait_for_log("mqtt.discovery_announced")
    ha = Subscriber(stack.broker.port, "homeassistant/#")
    try:
        config = json.loads(ha.next(SWITCH_CONFIG, timeout=10).payload)
    finally:
        ha.close()
    assert config["command_topic"] == MUTE_SET
    assert config["state_topic"] == MUTE
    assert (config["payload_on"], config["payload_off"]) == ("ON", "OFF")
    assert config["icon"] == "mdi:microphone-off"
    assert config["availability_topic"] == "edged/testpi/availability"
    assert config["unique_id"] == "edged_testpi_mute"
    assert config["retain"] is False

    # A new MQTT client after a reload: the command subscription follows it.
    stack.config(control=CONTROL, mqtt={"keepalive_s": 45})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reloaded")
    subscriber.next(MUTE, payload=b"OFF", timeout=10)  # the new client says it again
    command(stack, b"ON")
    wait_for_state(subscriber, is_muted)

    # Control turned off: the switch goes from Home Assistant, the topic is deaf.
    stack.config()
    ha = Subscriber(stack.broker.port, "homeassistant/#")
    daemon.signal(signal.SIGHUP)
    try:
        removed = ha.next(SWITCH_CONFIG, payload=b"", timeout=10)
        assert removed.payload == b""
    finally:
        ha.close()
    late = Subscriber(stack.broker.port, "homeassistant/#")
    try:
        late.sync()
        assert SWITCH_CONFIG not in {m.topic for m in late.pending()}
    finally:
        late.close()
    command(stack, b"OFF")
    subscriber.sync()
    assert_quiet(lambda: "privacy.unmuted" not in daemon.log, 1.0, "no unmute without control")
    assert flag(stack)["muted"] is True, "the mute stays: control off does not unmute"


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_failing_state_dir_still_mutes_and_says_why(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, fault: str
) -> None:
    with tmpfs(stack.home / "state", size_kb=4096) as state:
        daemon = stack.daemon(control=CONTROL, env={"EDGED_STATE_RETRY_S": "1"})
        daemon.wait_for_log("stt.connected")
        with read_only(state) if fault == "read_only" else filled(state):
            command(stack, b"ON")
            muted = wait_for_state(subscriber, lambda s: is_muted(s) and s["storage"] != "ok")
            assert muted["storage"] == fault
            daemon.wait_for_log("storage.degraded store=mute")
            assert_nothing_heard_while_muted(stack, stt, mic, for_s=1.0)
        # The disk is back: the flag is written, the condition clears.
        wait_for_state(subscriber, lambda s: s["muted"] and s["storage"] == "ok")
        assert flag(stack)["muted"] is True
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0


@contextlib.contextmanager
def filled(path: Path) -> Iterator[Path]:
    """The filesystem of `path` full to the brim, emptied again on leaving."""
    filler = fill(path)
    try:
        yield filler
    finally:
        filler.unlink()


@pytest.mark.parametrize("damage", ["garbage", "directory", "fifo"])
def test_a_flag_that_cannot_be_believed_means_muted(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, damage: str
) -> None:
    state = stack.home / "state"
    state.mkdir()
    if damage == "garbage":
        (state / "mute.json").write_bytes(b'{"muted": fal\x00\xff')
    elif damage == "directory":
        (state / "mute.json").mkdir()
    else:  # a plain open would block the daemon's start for good
        os.mkfifo(state / "mute.json")
    daemon = stack.daemon(control=CONTROL)
    muted = wait_for_state(subscriber, lambda s: s["muted"])
    assert muted["status"] == "muted"
    if damage == "directory":
        daemon.wait_for_log("control.mute_flag_unreadable")
        assert muted["storage"] == "unwritable", muted
    else:
        daemon.wait_for_log("control.mute_flag_damaged")
        assert list(state.glob("mute.json.damaged-*")), "quarantined, not deleted"
        assert flag(stack)["muted"] is True, "written again, clean"
    assert not mic.reader_attached
    assert not stt.sessions, "never connected"
    command(stack, b"OFF")  # the user decides
    if damage == "directory":
        daemon.wait_for_log("privacy.unmuted source=mqtt")  # memory: the disk refused
    else:
        wait_for_state(subscriber, is_streaming)
        audio, _ = script([["foxtrot"]])
        mic.play(audio)
        assert subscriber.next(TRANSCRIPT, timeout=20).json()["text"] == "Foxtrot."


def test_a_stop_with_a_reload_and_a_mute_in_flight_is_clean_and_keeps_the_mute(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    """SIGTERM right behind a reload (a new MQTT client) and a mute: the daemon
    exits 0 with nothing restarted behind the shutdown, and a mute it answered
    is on disk for the next start."""
    stack.config(control=CONTROL, mqtt={"keepalive_s": 45})  # the reload makes a new client
    daemon = stack.daemon(control=CONTROL)
    until_answering(subscriber, "testpi")
    subscriber.client.publish("edged/testpi/request/reload", b'{"transaction": "r"}', qos=1)
    subscriber.client.publish("edged/testpi/request/mute", b'{"state": "ON"}', qos=1)
    daemon.wait_for_log("control.request verb=reload")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    answers = [m.json() for m in subscriber.pending() if m.topic == "edged/testpi/response/mute"]
    if answers and answers[-1]["data"] == {"muted": True}:
        assert flag(stack)["muted"] is True, "a mute answered is a mute kept"
