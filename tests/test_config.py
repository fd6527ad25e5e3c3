"""Configuration: layering, validation with exit 78, secrets kept secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EX_CONFIG = 78
SECRET = "sk-live-TOPSECRET-4242"


def edged(*args: str, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    return subprocess.run(
        [sys.executable, "-m", "edged", *args], env={**clean, **(env or {})},
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "key", "words"),
    [
        ("[audio]\nchunk_ms = \"fast\"\n", "audio.chunk_ms", "valid integer"),
        ("[audio]\nchunk_ms = 5\n", "audio.chunk_ms", "greater than or equal to 20"),
        ("[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal to 65535"),
        ("[mqtt]\nprot = 1883\n", "mqtt.prot", "unknown key"),
        ("[mqqt]\nport = 1883\n", "mqqt", "unknown section"),
        ("[stt]\nurl = \"https://example.com\"\n", "stt.url", "ws:// or wss://"),
        ("[mqtt]\nbase_topic = \"home/#\"\n", "mqtt.base_topic", "pattern"),
        ("[devices.\"pi\"]\nmqtt.prot = 1\n", "mqtt.prot", "unknown key"),
        ("[audio]\ngain_db = 40.0\n", "audio.gain_db", "less than or equal to 30"),
        ("[audio]\nlevel_interval_s = 0.5\n", "audio.level_interval_s",
         "greater than or equal to 1"),
        # TOML spells inf and nan; no setting means them, nor can a JSON answer carry them.
        ("[stt.params]\nboost = inf\n", "stt.params.boost", "got inf"),
        ("[stt]\nclose_timeout_s = nan\n", "stt.close_timeout_s", "finite number"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_values_exit_78_naming_key_and_file(
    tmp_path: Path, content: str, key: str, words: str, command: str
) -> None:
    config = write(tmp_path / "edged.toml", content)
    result = edged(command, "--config", str(config), "--device-id", "pi")
    assert result.returncode == EX_CONFIG
    assert f"{key} (from {config}" in result.stderr
    assert words in result.stderr


def test_not_toml_exits_78_naming_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", "[stt\nurl = \n")
    result = edged("run", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert str(config) in result.stderr
    assert "not valid TOML" in result.stderr


def test_missing_named_file_exits_78(tmp_path: Path) -> None:
    result = edged("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == EX_CONFIG
    assert "nope.toml" in result.stderr
    assert "No such file" in result.stderr


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    result = edged("check-config", "--config", str(write(tmp_path / "e.toml", "")),
                   env={"EDGED_MQTT__PORT": "many"})
    assert result.returncode == EX_CONFIG
    assert "mqtt.port (from environment variable EDGED_MQTT__PORT)" in result.stderr
    unknown = edged("check-config", "--config", str(tmp_path / "e.toml"),
                    env={"EDGED_STT__APIKEY": "x"})
    assert unknown.returncode == EX_CONFIG
    assert "stt.apikey" in unknown.stderr


def test_layers_environment_over_device_section_over_files(tmp_path: Path) -> None:
    base = write(tmp_path / "10-fleet.toml", (
        "[mqtt]\nhost = \"broker.fleet\"\nport = 1883\nbase_topic = \"fleet\"\n"
        "[stt.params]\nlanguage = \"en\"\n"
        "[devices.\"kitchen\"]\naudio.device = \"plughw:1,0\"\nmqtt.port = 8883\n"
        "[devices.\"garage\"]\naudio.device = \"plughw:2,0\"\n"
    ))
    local = write(tmp_path / "20-local.toml", "[mqtt]\nhost = \"broker.local\"\n")
    result = edged("check-config", "--config", str(base), "--config", str(local),
                   "--device-id", "kitchen", env={"EDGED_MQTT__BASE_TOPIC": "house"})
    assert result.returncode == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert '"broker.local"' in lines["mqtt.host"]
    assert str(local) in lines["mqtt.host"]
    assert "8883" in lines["mqtt.port"]
    assert '[devices."kitchen"]' in lines["mqtt.port"]
    assert '"plughw:1,0"' in lines["audio.device"]
    assert '"house"' in lines["mqtt.base_topic"]
    assert "EDGED_MQTT__BASE_TOPIC" in lines["mqtt.base_topic"]
    assert '"language": "en"' in lines["stt.params"]
    assert "command line" in lines["device.id"]
    assert "# default" in lines["buffer.max_seconds"]


def test_api_key_is_masked_everywhere_in_check_config(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", f"[stt]\napi_key = \"{SECRET}\"\n")
    result = edged("check-config", "--config", str(config))
    assert result.returncode == 0
    assert SECRET not in result.stdout + result.stderr
    assert "stt.api_key = \"********\"" in result.stdout


def test_api_key_file_is_read_and_must_not_be_world_readable(tmp_path: Path) -> None:
    secret = write(tmp_path / "key", SECRET + "\n")
    secret.chmod(0o644)
    config = write(tmp_path / "edged.toml", f"[stt]\napi_key_file = \"{secret}\"\n")
    refused = edged("check-config", "--config", str(config))
    assert refused.returncode == EX_CONFIG
    assert "stt.api_key_file" in refused.stderr
    assert "readable by every user" in refused.stderr
    secret.chmod(0o600)
    accepted = edged("check-config", "--config", str(config))
    assert accepted.returncode == 0, accepted.stderr
    assert SECRET not in accepted.stdout + accepted.stderr
    assert f"via {config}" in accepted.stdout


def test_bad_secret_value_is_not_echoed(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", "[stt]\napi_key = 12345\n")
    result = edged("check-config", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert "stt.api_key" in result.stderr
    assert "12345" not in result.stderr


def test_default_files_are_edged_toml_then_conf_d_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "edged.toml", "[mqtt]\nhost = \"main\"\nport = 1000\n")
    write(tmp_path / "conf.d" / "20-site.toml", "[mqtt]\nport = 2000\n")
    write(tmp_path / "conf.d" / "10-fleet.toml", "[mqtt]\nport = 1500\nbase_topic = \"fleet\"\n")
    write(tmp_path / "conf.d" / "README", "not a config file")
    result = edged("check-config", env={"CONFIGURATION_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert '"main"' in lines["mqtt.host"]
    assert "2000" in lines["mqtt.port"]
    assert "20-site.toml" in lines["mqtt.port"]
    assert '"fleet"' in lines["mqtt.base_topic"]


def test_missing_default_files_are_skipped(tmp_path: Path) -> None:
    result = edged("check-config", env={"CONFIGURATION_DIRECTORY": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr
