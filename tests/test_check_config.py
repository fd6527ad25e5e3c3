"""`edged check-config`: every problem listed, what `run` would refuse
refused, secrets this user cannot read named (the rest still checked), a
remote STT service without a key warned of. Real processes throughout, some
as the unprivileged user nobody."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.config import load_config, service_user_warnings
from tests.test_config import EX_CONFIG, edged, write

SECRET = "sk-live-CHECKCONFIG-0815"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edged ARGS` as the user nobody (no groups), from this worktree."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run edged as another user")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    # The credentials directory of the tests is root's; nobody gets none.
    clean["CREDENTIALS_DIRECTORY"] = "/nonexistent/credentials"
    return subprocess.run(
        [*NOBODY, sys.executable, "-m", "edged", *args],
        env={**clean, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may read (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="edged-check-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def lines_of(stdout: str) -> dict[str, str]:
    return {line.split(" = ")[0]: line for line in stdout.splitlines() if " = " in line}


def root_only(path: Path, text: str) -> Path:
    write(path, text)
    path.chmod(0o600)
    return path


# -- every problem, not the first ------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_file_with_three_bad_values_lists_all_three(tmp_path: Path, command: str) -> None:
    config = write(tmp_path / "edged.toml",
                   "[audio]\nchunk_ms = 5\n[mqtt]\nport = 70000\nqos = 3\n")
    result = edged(command, "--config", str(config))
    assert result.returncode == EX_CONFIG
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("edged: configuration error: ")]
    assert len(errors) == 3, result.stderr
    assert f"audio.chunk_ms (from {config}): " in errors[0]
    assert "(got 5)" in errors[0]
    assert f"mqtt.port (from {config}): " in errors[1]
    assert "(got 70000)" in errors[1]
    assert f"mqtt.qos (from {config}): " in errors[2]
    assert "(got 3)" in errors[2]
    assert "more problem" not in result.stderr


def test_problems_in_several_sources_are_all_listed(tmp_path: Path) -> None:
    key_file = write(tmp_path / "key", SECRET)
    key_file.chmod(0o644)
    config = write(tmp_path / "edged.toml", (
        f'[stt]\napi_key_file = "{key_file}"\n[mqtt]\nprot = 1\n'
        '[devices."garage"]\naudio.chunk_ms = 5\n'
    ))
    broken = write(tmp_path / "broken.toml", "[stt\n")
    result = edged("check-config", "--config", str(config), "--config", str(broken),
                   env={"EDGED_MQTT__QOS": "7"})
    assert result.returncode == EX_CONFIG
    for needed in (f"mqtt.prot (from {config}): unknown key",
                   f'audio.chunk_ms (from {config} [devices."garage"])',
                   f"{broken}: not valid TOML",
                   "mqtt.qos (from environment variable EDGED_MQTT__QOS)",
                   f"stt.api_key_file (from {config}): {key_file} is readable by every user"):
        assert needed in result.stderr, (needed, result.stderr)
    assert SECRET not in result.stderr


# -- what run would refuse ------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_a_state_dir_that_cannot_be_a_directory_exits_78(
    tmp_path: Path, command: str, where: str
) -> None:
    occupied = write(tmp_path / "occupied", "not a directory")
    state_dir = occupied if where == "is a file" else occupied / "state"
    config = write(tmp_path / "edged.toml", f'state_dir = "{state_dir}"\n')
    result = edged(command, "--config", str(config))
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"state_dir (from {config}): " in result.stderr
    assert f"{occupied} is a file" in result.stderr
    flag = edged(command, "--config", str(write(tmp_path / "empty.toml", "")),
                 "--state-dir", str(state_dir))
    assert flag.returncode == EX_CONFIG, flag.stderr
    assert "state_dir (from command line): " in flag.stderr


def test_a_state_dir_not_made_yet_is_fine(tmp_path: Path) -> None:
    result = edged("check-config", "--config", str(write(tmp_path / "edged.toml", "")),
                   "--state-dir", str(tmp_path / "not" / "yet"))
    assert result.returncode == 0, result.stderr


# -- a remote service without a key ------------------------------------------------------


@pytest.mark.parametrize(
    ("stt", "env", "warned"),
    [
        ('url = "wss://api.router.audio/v1/listen"', {}, True),
        ("", {}, True),  # the default URL
        ('url = "ws://192.168.1.20:8765/v1/listen"', {}, True),
        ('url = "ws://127.0.0.1:8765/v1/listen"', {}, False),
        ('url = "ws://127.8.0.1:8765/v1/listen"', {}, False),
        ('url = "ws://localhost:8765/v1/listen"', {}, False),
        ('url = "ws://[::1]:8765/v1/listen"', {}, False),
        ('url = "wss://api.router.audio/v1/listen?api_key=k-123"', {}, False),
        ('params = { token = "k-123" }', {}, False),
        ("", {"EDGED_STT__API_KEY": "k-123"}, False),
    ],
)
def test_a_service_on_another_machine_without_a_key_is_warned_of(
    tmp_path: Path, stt: str, env: dict[str, str], warned: bool
) -> None:
    config = write(tmp_path / "edged.toml", f"[stt]\n{stt}\n")
    result = edged("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    warning = "no API key is set" in result.stderr
    assert warning == warned, result.stderr
    if warned:
        assert "edged: warning: stt.url (from " in result.stderr
        assert "scripts/install --api-key-stdin" in result.stderr
        assert "configuration OK, with 1 warning" in result.stderr


def test_run_logs_no_api_key_only_for_a_service_on_another_machine(tmp_path: Path) -> None:
    """The warning is the daemon's too; a local server without a key is quiet."""
    for url, warned in (("ws://127.0.0.1:9/v1/listen", False),
                        ("ws://192.0.2.1:9/v1/listen", True)):
        config = write(tmp_path / "edged.toml", f'state_dir = "{tmp_path / "state"}"\n'
                       f'[stt]\nurl = "{url}"\n[audio]\ndevice = "nonexistent"\n'
                       '[mqtt]\nhost = "127.0.0.1"\nport = 9\n')
        process = subprocess.Popen(
            [sys.executable, "-m", "edged", "run", "--config", str(config)],
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGED_")},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = process.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            process.terminate()
            output, _ = process.communicate(timeout=20)
        assert ("stt.no_api_key" in output) == warned, output
        assert "edged.start" in output, output


# -- as a user who may not read the secrets ---------------------------------------------


def test_a_key_file_this_user_cannot_read_is_named_and_the_rest_is_checked(
    shared: Path
) -> None:
    key_file = root_only(shared / "api_key", SECRET + "\n")
    config = write(shared / "edged.toml", (
        f'[stt]\napi_key_file = "{key_file}"\n[mqtt]\nhost = "broker.lan"\nport = 8883\n'
    ))
    config.chmod(0o644)

    result = as_nobody("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    assert "broker.lan" in lines["mqtt.host"], "every other key is still printed"
    assert "8883" in lines["mqtt.port"]
    assert lines["stt.api_key"].startswith("stt.api_key = ? ")
    assert "this user cannot read it" in lines["stt.api_key"]
    assert (f"edged: warning: stt.api_key_file (from {config}): cannot read {key_file}: "
            "Permission denied (run as root or as the edged user)") in result.stderr
    assert "no API key is set" not in result.stderr, "there is a key, unread"
    assert "configuration OK as far as this user can read it" in result.stderr
    assert SECRET not in result.stdout + result.stderr

    # Other problems are still reported, beside what could not be read.
    write(config, f'[stt]\napi_key_file = "{key_file}"\n[mqtt]\nport = 70000\n')
    broken = as_nobody("check-config", "--config", str(config))
    assert broken.returncode == EX_CONFIG
    assert f"mqtt.port (from {config}): " in broken.stderr
    assert f"cannot read {key_file}" in broken.stderr

    # root reads it, and so would the daemon.
    assert edged("check-config", "--config", str(config)).returncode == EX_CONFIG
    write(config, f'[stt]\napi_key_file = "{key_file}"\n')
    as_root = edged("check-config", "--config", str(config))
    assert as_root.returncode == 0, as_root.stderr
    assert 'stt.api_key = "********"' in as_root.stdout
    assert "configuration OK\n" in as_root.stderr


def test_run_refuses_a_key_file_it_cannot_read(shared: Path) -> None:
    key_file = root_only(shared / "api_key", SECRET)
    config = write(shared / "edged.toml", f'[stt]\napi_key_file = "{key_file}"\n')
    config.chmod(0o644)
    result = as_nobody("run", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert (f"stt.api_key_file (from {config}): cannot read {key_file}: Permission denied "
            "(run as root or as the edged user)") in result.stderr


def test_installed_credentials_this_user_cannot_read_are_named(shared: Path) -> None:
    """Outside systemd edged reads the credentials edged.service loads:
    root's only, so another user is told to run as root."""
    credentials = shared / "credentials"
    credentials.mkdir(mode=0o700)
    root_only(credentials / "stt_api_key", SECRET)
    config = write(shared / "edged.toml", '[mqtt]\nhost = "broker.lan"\n')
    config.chmod(0o644)
    env = {"CONFIGURATION_DIRECTORY": str(shared), "CREDENTIALS_DIRECTORY": ""}

    result = as_nobody("check-config", env=env)
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    assert "broker.lan" in lines["mqtt.host"]
    assert lines["stt.api_key"].startswith("stt.api_key = ? ")
    assert f"systemd credential stt_api_key at {credentials}/stt_api_key" in lines["stt.api_key"]
    assert (f"edged: warning: stt.api_key (from systemd credential stt_api_key at "
            f"{credentials}/stt_api_key): cannot read it: Permission denied (run as root)"
            in result.stderr)
    assert "no API key is set" not in result.stderr
    assert SECRET not in result.stdout + result.stderr

    as_root = edged("check-config", env=env)
    assert as_root.returncode == 0, as_root.stderr
    assert 'stt.api_key = "********"' in as_root.stdout
    assert f"# systemd credential stt_api_key at {credentials}/stt_api_key" in as_root.stdout
    assert "warning" not in as_root.stderr
    assert SECRET not in as_root.stdout + as_root.stderr


def test_a_key_file_the_service_user_cannot_read_is_warned_of(tmp_path: Path) -> None:
    """root reads a root-only key file; the service's user would not."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own a file another user cannot read")
    key_file = root_only(tmp_path / "api_key", SECRET)
    config = write(tmp_path / "edged.toml", f'[stt]\napi_key_file = "{key_file}"\n')
    loaded = load_config([config], environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})
    warnings = service_user_warnings(loaded, user="nobody")
    assert len(warnings) == 1
    assert f"stt.api_key_file (from {config}): the nobody user" in warnings[0]
    assert "scripts/install --api-key-file" in warnings[0]
    os.chown(key_file, 65534, 65534)
    assert service_user_warnings(loaded, user="nobody") == []
    assert service_user_warnings(loaded, user="no-such-user-here") == []
