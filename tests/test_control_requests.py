"""Fleet control's sans-I/O core: hostile request payloads get an error
response (never an exception), `config` sets are planned by the config
file's rules, the remote layer's file is read as hostile."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edged.config import load_config
from edged.control import layer
from edged.control.changes import differences, plan
from edged.control.requests import (
    HealthCheck,
    Mute,
    Reload,
    Request,
    Response,
    SetConfig,
    ShowConfig,
    parse,
    parse_number,
    verb_of,
)
from edged.control.verdict import judge

ALLOWED = ["audio.silent_after_s", "mqtt.partials", "buffer", "log_level"]
SOURCE = "remote (test)"


def answer(verb: str, payload: bytes) -> Response:
    decided = parse(verb, payload)
    assert isinstance(decided, Response), f"expected an error response, got {decided}"
    assert decided.status == "error"
    body = json.loads(decided.payload())  # always valid JSON, whatever came in
    assert body["status"] == "error"
    assert body["error"] == decided.error
    return decided


@pytest.mark.parametrize(("payload", "effect"), [
    (b"", HealthCheck()), (b"  \n", HealthCheck()), (b"{}", HealthCheck()),
    (b'{"transaction": "t1"}', HealthCheck()),
])
def test_a_verb_without_arguments_takes_an_empty_payload_or_an_object(
        payload: bytes, effect: object) -> None:
    decided = parse("health_check", payload)
    assert isinstance(decided, Request)
    assert decided.effect == effect


def test_config_is_a_get_without_options_and_a_set_with_them() -> None:
    get = parse("config", b"")
    assert isinstance(get, Request)
    assert get.effect == ShowConfig()
    options = {"audio": {"silent_after_s": 5}}
    put = parse("config", json.dumps({"options": options, "transaction": 7}).encode())
    assert isinstance(put, Request)
    assert put.effect == SetConfig(options)
    assert put.transaction == 7
    assert parse("reload", b"{}") == Request("reload", Reload())


@pytest.mark.parametrize(("payload", "why"), [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"health"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),  # beyond the interpreter's recursion limit
    (b'{"a":' * 50 + b"1" + b"}" * 50, "nested more than"),
    (b'{"x": 1e999}', "too large"),
    (b'{"x": NaN}', "not valid JSON"),
    (b"9" * 5000, "not valid JSON"),  # more digits than int() takes
    (b'{"bogus": 1}', 'unknown field "bogus"'),
])
def test_hostile_payloads_get_an_error_response(payload: bytes, why: str) -> None:
    response = answer("health_check", payload)
    assert why in (response.error or "")


@pytest.mark.parametrize("transaction", [
    {"a": 1}, [1], True, "x" * 1000, 2**70,
])
def test_a_transaction_of_an_odd_type_is_refused_not_echoed(transaction: Any) -> None:
    response = answer("reload", json.dumps({"transaction": transaction}).encode())
    assert "transaction" in (response.error or "")
    assert "transaction" not in json.loads(response.payload())


@pytest.mark.parametrize("transaction", ["abc", 12, -3, 1.5, ""])
def test_a_transaction_is_echoed_on_success_and_on_error(transaction: Any) -> None:
    ok = parse("health_check", json.dumps({"transaction": transaction}).encode())
    assert isinstance(ok, Request)
    assert json.loads(ok.ok({"x": 1}).payload())["transaction"] == transaction
    error = answer("nope", json.dumps({"transaction": transaction}).encode())
    assert json.loads(error.payload())["transaction"] == transaction
    assert 'unknown verb "nope"' in (error.error or "")
    assert "health_check" in (error.error or "")  # names the known verbs


@pytest.mark.parametrize("options", [b'{"options": 5}', b'{"options": []}',
                                     b'{"options": {}}', b'{"options": null}'])
def test_config_options_must_be_a_non_empty_object(options: bytes) -> None:
    assert "options" in (answer("config", options).error or "")


def test_only_one_topic_level_of_plain_characters_is_a_verb() -> None:
    prefixes = ("edged/pi/request/", "edged/_fleet/request/")
    assert verb_of("edged/pi/request/config", prefixes) == "config"
    assert verb_of("edged/_fleet/request/reload", prefixes) == "reload"
    assert verb_of("edged/pi/request/Config", prefixes) is None
    assert verb_of("edged/pi/request/" + "a" * 40, prefixes) is None
    assert verb_of("edged/pi/request/\u202econfig", prefixes) is None
    assert verb_of("edged/other/request/config", prefixes) is None


# -- config set plans -----------------------------------------------------------


def test_nested_and_dotted_keys_set_the_layer_and_null_removes_a_key() -> None:
    stored = {"mqtt.partials": True, "buffer.max_seconds": 60}
    planned = plan({"audio": {"silent_after_s": 5}, "buffer.max_seconds": None}, stored,
                   ALLOWED, SOURCE)
    assert planned.refused == []
    assert planned.layer == {"mqtt.partials": True, "audio.silent_after_s": 5}
    assert planned.document == {"mqtt": {"partials": True}, "audio": {"silent_after_s": 5}}


def test_refused_keys_are_named_with_their_reasons_and_nothing_changes() -> None:
    stored = {"mqtt.partials": True}
    planned = plan({"audio": {"silent_after_s": -1, "device": "hw:1"},
                    "control.enabled": True, "stt": {"api_key": "x"},
                    "state_dir": "/tmp", "mqtt.partials": False}, stored, ALLOWED, SOURCE)
    reasons = {item.key: item.reason for item in planned.refused}
    assert reasons == {
        "audio.device": "not allowed (not in control.allowed_keys)",
        "control.enabled": "never settable remotely",
        "stt.api_key": "never settable remotely",
        "state_dir": "never settable remotely",
        "audio.silent_after_s": "invalid: Input should be greater than or equal to 0 (got -1)",
    }
    assert planned.layer == stored


def test_values_are_validated_as_a_config_file_would_be() -> None:
    planned = plan({"audio.silent_after_s": -1, "log_level": "loud", "buffer.bogus": 1},
                   {}, ALLOWED, SOURCE)
    reasons = {item.key: item.reason for item in planned.refused}
    assert reasons["audio.silent_after_s"].startswith(
        "invalid: Input should be greater than or equal to 0")
    assert "(got -1)" in reasons["audio.silent_after_s"]
    assert reasons["log_level"].startswith("invalid: Input should be 'debug'")
    assert reasons["buffer.bogus"] == "invalid: unknown key"


def test_a_whole_section_in_allowed_keys_allows_its_keys_but_never_control() -> None:
    planned = plan({"buffer": {"max_seconds": 30, "spool_max_mb": 10}}, {}, ["buffer", "control"],
                   SOURCE)
    assert planned.refused == []
    planned = plan({"control": {"allowed_keys": ["stt"]}}, {}, ["buffer", "control"], SOURCE)
    assert [item.reason for item in planned.refused] == ["never settable remotely"]


def test_a_key_given_twice_or_malformed_is_refused() -> None:
    planned = plan({"mqtt": {"partials": True}, "mqtt.partials": False, "a..b": 1, "": 2},
                   {}, ALLOWED, SOURCE)
    reasons = {item.key: item.reason for item in planned.refused}
    assert reasons == {"mqtt.partials": "given twice", "a..b": "not a key", "": "not a key"}


def test_an_allowed_key_that_does_not_exist_is_refused_as_unknown_not_an_error(
        tmp_path: Path) -> None:
    # Allowed keys are not checked against the model (the default names
    # audio.gain_db before every version has it); setting one is refused.
    planned = plan({"audio.made_up": 6}, {}, ["audio.made_up"], SOURCE)
    assert [item.as_dict() for item in planned.refused] == [
        {"key": "audio.made_up", "reason": "invalid: unknown key"}]
    config = _layer_config(tmp_path)
    with config.open("a") as file:
        file.write('[control]\nallowed_keys = ["audio.made_up", "nonsense"]\n')
    assert load_config([config], environ={}).settings.control.allowed_keys[0] == "audio.made_up"


def test_differences_name_key_old_new_and_source() -> None:
    before = [("a.b", 1, "default"), ("a.c", "x", "file")]
    after = [("a.b", 2, "remote"), ("a.c", "x", "file")]
    assert differences(before, after) == [
        {"key": "a.b", "old": 1, "new": 2, "source": "remote"}]


# -- the layer's file -------------------------------------------------------------


def _layer_config(tmp_path: Path) -> Path:
    config = tmp_path / "edged.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[device]\nid = "pi"\n')
    (tmp_path / "state").mkdir()
    return config


def test_the_layer_sits_between_the_files_and_the_environment(tmp_path: Path) -> None:
    config = _layer_config(tmp_path)
    with config.open("a") as file:
        file.write("[audio]\nsilent_after_s = 30\n[mqtt]\npartials = false\n")
    layer.write(layer.path_in(tmp_path / "state"),
                {"audio": {"silent_after_s": 5}, "mqtt": {"partials": True}})
    loaded = load_config([config], environ={"EDGED_MQTT__PARTIALS": "false"})
    assert loaded.settings.audio.silent_after_s == 5
    assert loaded.source_of("audio.silent_after_s") == \
        f"remote ({tmp_path / 'state' / 'remote-config.json'})"
    assert loaded.settings.mqtt.partials is False  # the environment wins
    layer.write(layer.path_in(tmp_path / "state"), {})
    assert not layer.path_in(tmp_path / "state").exists()  # an empty layer is no file


@pytest.mark.parametrize("content", [
    b"\x00\x01garbage", b"[1]", b'{"audio": {"silent_after_s": "loud"}}',
    b'{"control": {"enabled": true}}', b'{"stt": {"api_key": "stolen"}}',
    b"{" * 5000, b" " * (layer.MAX_BYTES + 1),
])
def test_a_damaged_layer_is_left_out_with_a_reason(tmp_path: Path, content: bytes) -> None:
    config = _layer_config(tmp_path)
    layer.path_in(tmp_path / "state").write_bytes(content)
    loaded = load_config([config], environ={})
    assert loaded.remote is not None
    assert loaded.remote.damaged
    assert loaded.settings.audio.silent_after_s == 60.0
    assert "stolen" not in loaded.remote.damaged


def test_a_fifo_or_a_symlink_is_not_a_layer_and_does_not_block(tmp_path: Path) -> None:
    config = _layer_config(tmp_path)
    path = layer.path_in(tmp_path / "state")
    os.mkfifo(path)
    loaded = load_config([config], environ={})
    assert loaded.remote is not None
    assert loaded.remote.damaged == "not a regular file"
    path.unlink()
    (tmp_path / "elsewhere.json").write_text('{"mqtt": {"partials": true}}')
    path.symlink_to(tmp_path / "elsewhere.json")
    loaded = load_config([config], environ={})
    assert loaded.remote is not None
    assert loaded.remote.damaged == "not a regular file"


def test_a_key_no_longer_allowed_is_ignored_not_applied(tmp_path: Path) -> None:
    config = _layer_config(tmp_path)
    with config.open("a") as file:
        file.write('[control]\nallowed_keys = ["log_level"]\n')
    layer.write(layer.path_in(tmp_path / "state"), {"mqtt": {"partials": True}})
    loaded = load_config([config], environ={})
    assert loaded.settings.mqtt.partials is False
    assert loaded.remote is not None
    assert loaded.remote.ignored == ["mqtt.partials"]


# -- the verdict -------------------------------------------------------------------------


def test_the_verdict_names_each_problem() -> None:
    good = {"status": "streaming", "microphone": "ok", "storage": "ok"}
    assert judge(good) == (True, "ok")
    assert judge({**good, "status": "muted"}) == (True, "ok")
    healthy, verdict = judge({**good, "status": "reconnecting", "last_error": "stt: timeout",
                              "microphone": "silent", "storage": "full",
                              "storage_error": "outbox: No space left on device"})
    assert not healthy
    assert verdict == ("status reconnecting (stt: timeout); microphone silent; "
                       "storage full: outbox: No space left on device")


@pytest.mark.parametrize(("payload", "parsed"), [
    (b"6", 6.0), (b" -3.5\n", -3.5), (b"1e1", 10.0),
    (b"", "not a number"), (b"loud", "not a number"), (b"\xff\xfe", "not a number"),
    (b"nan", "not a finite number"), (b"-inf", "not a finite number"),
    (b"1" * 33, "too long for a number"),
])
def test_a_number_command_is_a_bare_finite_number(payload: bytes, parsed: float | str) -> None:
    assert parse_number(payload) == parsed


@pytest.mark.parametrize(("payload", "muted"), [
    (b"", None), (b"{}", None), (b'{"state": "ON"}', True), (b'{"state": " off "}', False),
    (b'{"state": true}', True), (b'{"state": false, "transaction": 7}', False),
])
def test_the_mute_verb_asks_or_sets(payload: bytes, muted: bool | None) -> None:
    request = parse("mute", payload)
    assert isinstance(request, Request)
    assert request.effect == Mute(muted)


@pytest.mark.parametrize("payload", [
    b'{"state": "maybe"}', b'{"state": 1}', b'{"state": null}', b'{"mute": "ON"}',
])
def test_a_mute_request_that_says_neither_on_nor_off_is_refused(payload: bytes) -> None:
    response = parse("mute", payload)
    assert isinstance(response, Response)
    assert response.status == "error"
    assert response.error


@pytest.mark.parametrize("key", [
    "stt.url", "stt.ca_file", "mqtt.host", "mqtt.port", "mqtt.tls", "mqtt.username",
    "mqtt.client_id", "mqtt.base_topic", "mqtt.cert_file", "device.id", "metrics.host",
])
def test_where_the_secrets_and_audio_go_is_never_settable_even_with_its_section_allowed(
        key: str) -> None:
    """An operator allowing `stt` (to tune stt.params) or `mqtt` must not let a
    request send the API key, the broker password or the audio elsewhere, nor
    let a device take another's name at the broker."""
    value: object = {"mqtt.port": 1884, "mqtt.tls": True}.get(key, "elsewhere.example")
    planned = plan({key: value}, {}, ["stt", "mqtt", "device", "metrics"], SOURCE)
    assert [(item.key, item.reason) for item in planned.refused] == [
        (key, "never settable remotely")]
    allowed = plan({"stt.replay_speed": 2.0, "mqtt.partials": True}, {},
                   ["stt", "mqtt"], SOURCE)
    assert allowed.refused == []
