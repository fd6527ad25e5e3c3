"""Each configuration source stands on its own: environment values read like
file values, and a bad value in a file is an error even where a higher
source overrides it (the next device may lack the override)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from edged.config import load_config
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.tonespeech import script
from tests.test_config import EX_CONFIG, edged, write
from tests.test_end_to_end import assert_matches_truth


def lines_of(stdout: str) -> dict[str, str]:
    return {line.split(" = ")[0]: line for line in stdout.splitlines()}


def test_environment_values_read_like_file_values(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", "")
    env = {"EDGED_MQTT__QOS": "2", "EDGED_MQTT__PORT": "8883", "EDGED_MQTT__TLS": "true",
           "EDGED_STT__REPLAY_SPEED": "1.5", "EDGED_DEVICE__ID": "007",
           "EDGED_STT__API_KEY": "12345", "EDGED_MQTT__PROTOCOL": "5",
           "EDGED_STT__PARAMS__LANGUAGE": "de"}
    result = edged("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    assert "mqtt.qos = 2 " in lines["mqtt.qos"]
    assert "EDGED_MQTT__QOS" in lines["mqtt.qos"]
    assert 'device.id = "007" ' in lines["device.id"], "a string key keeps the string"
    assert 'mqtt.protocol = "5" ' in lines["mqtt.protocol"]

    settings = load_config([config], environ=env).settings
    assert (settings.mqtt.qos, settings.mqtt.port, settings.mqtt.tls) == (2, 8883, True)
    assert settings.stt.replay_speed == 1.5
    assert settings.device.id == "007"
    assert settings.api_key == "12345", "a key of digits stays the key"
    assert settings.stt.params == {"language": "de"}


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("EDGED_MQTT__QOS", "3", "Input should be 0, 1 or 2 (got 3)"),
        ("EDGED_MQTT__PORT", "many", "(got 'many')"),
        ("EDGED_DEVICE__ID", "-1", "String should match pattern"),
    ],
)
def test_bad_environment_value_names_the_variable_and_the_value_as_read(
    tmp_path: Path, variable: str, value: str, shown: str
) -> None:
    config = write(tmp_path / "edged.toml", "")
    result = edged("check-config", "--config", str(config), env={variable: value})
    assert result.returncode == EX_CONFIG
    assert f"(from environment variable {variable})" in result.stderr
    assert shown in result.stderr


@pytest.mark.parametrize(
    ("override", "env", "args"),
    [
        ("environment variable", {"EDGED_MQTT__PORT": "1883"}, []),
        ("flag", {}, ["--mqtt-port", "1883"]),
        ("device section", {}, ["--device-id", "kitchen"]),
        ("later file", {}, ["--config", "LATER"]),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_file_value_is_an_error_where_a_higher_source_overrides_it(
    tmp_path: Path, command: str, override: str, env: dict[str, str], args: list[str]
) -> None:
    config = write(tmp_path / "edged.toml", (
        '[mqtt]\nport = "not a port"\n[devices."kitchen"]\nmqtt.port = 1883\n'
    ))
    later = write(tmp_path / "later.toml", "[mqtt]\nport = 1883\n")
    args = [str(later) if arg == "LATER" else arg for arg in args]
    result = edged(command, "--config", str(config), *args, env=env)
    assert result.returncode == EX_CONFIG, (override, result.stderr)
    assert f"mqtt.port (from {config}): " in result.stderr
    assert "(got 'not a port')" in result.stderr


def test_bad_value_in_another_devices_section_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "fleet.toml", (
        '[devices."kitchen"]\naudio.device = "plughw:1,0"\n'
        '[devices."garage"]\naudio.chunk_ms = 5\n'
    ))
    result = edged("check-config", "--config", str(config), "--device-id", "kitchen")
    assert result.returncode == EX_CONFIG
    assert f'audio.chunk_ms (from {config} [devices."garage"]): ' in result.stderr


def test_bad_environment_value_is_an_error_where_a_flag_overrides_it(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", "")
    result = edged("check-config", "--config", str(config), "--mqtt-port", "1883",
                   env={"EDGED_MQTT__PORT": "many"})
    assert result.returncode == EX_CONFIG
    assert "mqtt.port (from environment variable EDGED_MQTT__PORT)" in result.stderr


def test_a_pair_may_be_split_across_sources(tmp_path: Path) -> None:
    """Rules across keys apply to the merged configuration, not to each source."""
    config = write(tmp_path / "edged.toml", '[mqtt]\ncert_file = "/etc/edged/client.crt"\n')
    split = edged("check-config", "--config", str(config),
                  env={"EDGED_MQTT__KEY_FILE": "/etc/edged/client.key"})
    assert split.returncode == 0, split.stderr
    half = edged("check-config", "--config", str(config))
    assert half.returncode == EX_CONFIG
    assert "cert_file and key_file go together" in half.stderr


def test_reload_refuses_a_file_whose_bad_value_the_environment_overrides(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    port = str(stack.broker.port)
    daemon = stack.daemon(env={"EDGED_MQTT__PORT": port})
    daemon.wait_for_log("stt.connected")
    config = stack.config(mqtt={"port": "not a port"})
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("config.reload_refused")
    assert f"mqtt.port (from {config}): " in daemon.log
    audio, truth = script([["golf"]])
    offset = mic.play(audio)
    final = subscriber.next("edged/testpi/transcript", timeout=20).json()
    assert_matches_truth([final], truth, offset)
    assert daemon.process is not None
    assert daemon.process.poll() is None
