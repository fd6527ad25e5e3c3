"""The API key as a systemd credential: scripts/install writes it root-only,
edged.service loads it with LoadCredential=, edged reads it from
$CREDENTIALS_DIRECTORY (or, outside systemd, from the unit's source file)
and uses it without any key in the configuration. Never shown anywhere."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edged.config import CREDENTIALS
from tests.conftest import API_KEY, Stack
from tests.support.broker import Subscriber
from tests.support.daemon import Daemon
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_config import EX_CONFIG, edged, write

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edged.service"
INSTALL = ROOT / "scripts" / "install"
LIBRARY = ROOT / "scripts" / "lib" / "credentials.sh"


def credentials(directory: Path, **secrets: str) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    for name, value in secrets.items():
        path = directory / name
        path.write_text(value)
        path.chmod(0o600)
    return directory


def lines_of(stdout: str) -> dict[str, str]:
    return {line.split(" = ")[0]: line for line in stdout.splitlines() if " = " in line}


# -- edged reads $CREDENTIALS_DIRECTORY -----------------------------------------------


def test_check_config_shows_the_credential_as_the_source(tmp_path: Path) -> None:
    directory = credentials(tmp_path / "run-credentials", stt_api_key=API_KEY + "\n",
                            mqtt_password="broker-PASS-77\n")
    config = write(tmp_path / "edged.toml", '[mqtt]\nusername = "pi"\n')
    result = edged("check-config", "--config", str(config),
                   env={"CREDENTIALS_DIRECTORY": str(directory)})
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    assert lines["stt.api_key"].startswith('stt.api_key = "********" ')
    assert lines["stt.api_key"].endswith("# systemd credential stt_api_key")
    assert lines["mqtt.password"].endswith("# systemd credential mqtt_password")
    assert "no API key" not in result.stderr
    for secret in (API_KEY, "broker-PASS-77"):
        assert secret not in result.stdout + result.stderr


def test_the_credential_ranks_under_the_environment_and_over_the_files(tmp_path: Path) -> None:
    directory = credentials(tmp_path / "run-credentials", stt_api_key=API_KEY)
    key_file = write(tmp_path / "file_key", "from-a-file")
    key_file.chmod(0o600)
    config = write(tmp_path / "edged.toml", f'[stt]\napi_key_file = "{key_file}"\n')
    env = {"CREDENTIALS_DIRECTORY": str(directory)}

    over_files = edged("check-config", "--config", str(config), env=env)
    assert over_files.returncode == 0, over_files.stderr
    lines = lines_of(over_files.stdout)
    assert lines["stt.api_key"].endswith("# systemd credential stt_api_key")
    assert "(not used: stt.api_key comes from systemd credential stt_api_key)" in lines[
        "stt.api_key_file"]

    under_env = edged("check-config", "--config", str(config),
                      env={**env, "EDGED_STT__API_KEY": "from-the-environment"})
    assert under_env.returncode == 0, under_env.stderr
    assert lines_of(under_env.stdout)["stt.api_key"].endswith(
        "# environment variable EDGED_STT__API_KEY")


def test_a_blank_credential_is_none(tmp_path: Path) -> None:
    """The unit's SetCredential= default (a newline) when no file was installed."""
    directory = credentials(tmp_path / "run-credentials", stt_api_key="\n", mqtt_password="\n")
    config = write(tmp_path / "edged.toml", "")
    result = edged("check-config", "--config", str(config),
                   env={"CREDENTIALS_DIRECTORY": str(directory)})
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    assert lines["stt.api_key"].startswith("stt.api_key = null ")
    assert lines["mqtt.password"].startswith("mqtt.password = null ")
    assert "no API key is set" in result.stderr


def test_the_daemon_uses_the_credential_and_never_shows_it(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, tmp_path: Path
) -> None:
    """No key in the configuration or the environment: a wrong one in the
    file, the right one as the credential. The STT double takes only the
    right one."""
    directory = credentials(tmp_path / "run-credentials", stt_api_key=API_KEY + "\n")
    config = stack.config(stt={"api_key": "wrong-key-in-the-file"})
    env = {"CREDENTIALS_DIRECTORY": str(directory), "EDGED_LOG_LEVEL": "debug"}

    check = edged("check-config", "--config", str(config), env=env)
    assert check.returncode == 0, check.stderr
    assert lines_of(check.stdout)["stt.api_key"].endswith("# systemd credential stt_api_key")

    daemon = Daemon(stack.home, config, env=env)
    stack.daemons.append(daemon)
    daemon.start()
    daemon.wait_for_log("stt.connected")
    audio, _ = script([["alpha", "bravo"]])
    mic.play(audio)
    final = subscriber.next("edged/testpi/transcript", timeout=30).json()
    assert daemon.stop() == 0

    assert [word["text"] for word in final["words"]] == ["alpha", "bravo"]
    assert stt.sessions[-1].api_key == API_KEY
    assert "stt.no_api_key" not in daemon.log
    published = "\n".join(message.payload.decode() for message in subscriber.seen)
    for output in (check.stdout + check.stderr, daemon.log, published):
        assert API_KEY not in output


# -- outside systemd: the unit's source files ---------------------------------------------


def test_outside_systemd_the_installed_credential_is_read(tmp_path: Path) -> None:
    """`sudo edged check-config` in a shell sees the key the service gets."""
    directory = credentials(tmp_path / "credentials", stt_api_key=API_KEY)
    env = {"CONFIGURATION_DIRECTORY": str(tmp_path), "CREDENTIALS_DIRECTORY": ""}
    result = edged("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert lines_of(result.stdout)["stt.api_key"].endswith(
        f"# systemd credential stt_api_key at {directory}/stt_api_key")
    assert API_KEY not in result.stdout + result.stderr

    (directory / "stt_api_key").chmod(0o644)
    refused = edged("check-config", env=env)
    assert refused.returncode == EX_CONFIG
    assert (f"stt.api_key (from systemd credential stt_api_key at {directory}/stt_api_key): "
            "") in refused.stderr
    assert "readable by every user" in refused.stderr
    assert API_KEY not in refused.stdout + refused.stderr


# -- the unit and scripts/install agree ---------------------------------------------------


def test_the_unit_loads_each_credential_from_where_install_writes_it() -> None:
    unit = UNIT.read_text()
    loaded = dict(re.findall(r"^LoadCredential=([^:\n]+):(\S+)$", unit, re.MULTILINE))
    defaults = re.findall(r"^SetCredential=([^:\n]+):(.*)$", unit, re.MULTILINE)
    library = LIBRARY.read_text()
    directory = re.search(r"CREDENTIALS=\$\{CREDENTIALS:-(\S+)\}", library)
    assert directory, "scripts/lib/credentials.sh names its directory"
    assert "CREDENTIALS=/etc/edged/credentials" in INSTALL.read_text()
    assert loaded == {name: f"{directory.group(1)}/{name}" for name in CREDENTIALS.values()}
    # A blank default for each: systemd 252 fails a start on a missing file otherwise.
    assert sorted(defaults) == sorted((name, r"\n") for name in CREDENTIALS.values())
    install = INSTALL.read_text()
    for name in CREDENTIALS.values():
        assert f"install_credential {name} " in install


def test_the_unit_parses_without_warnings() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # Verify the unit as written; only the program it starts is swapped for
    # one that exists here.
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"edged-verify-{os.getpid()}"
    copy.mkdir(exist_ok=True)
    try:
        unit = re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text(),
                      flags=re.MULTILINE)
        (copy / "edged.service").write_text(unit)
        result = subprocess.run([analyze, "verify", str(copy / "edged.service")],
                                capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(copy)
    assert "Credential" not in result.stdout + result.stderr, result.stderr
    assert "Invalid syntax" not in result.stderr, result.stderr


def test_install_help_works_for_anyone() -> None:
    result = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for option in ("--api-key-file", "--api-key-stdin", "--mqtt-password-file",
                   "--mqtt-password-stdin", "--no-start", "--uninstall", "--purge"):
        assert option in result.stdout
    assert "/etc/edged/credentials/stt_api_key" in result.stdout
    unknown = subprocess.run([str(INSTALL), "--api-key"], capture_output=True, text=True,
                             timeout=30)
    assert unknown.returncode == 2
    assert "unknown option --api-key" in unknown.stderr
    missing = subprocess.run([str(INSTALL), "--api-key-file"], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2
    assert "--api-key-file needs a file name" in missing.stderr


def library(script: str, directory: Path, stdin: str = "",
            *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash with scripts/lib/credentials.sh, as scripts/install does."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f'source "{LIBRARY}"\n{script}', "install", *args],
        env={**os.environ, "CREDENTIALS": str(directory)}, input=stdin,
        capture_output=True, text=True, timeout=30,
    )


def test_install_writes_a_root_only_credential_and_never_shows_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("scripts/install runs as root (it chowns to root)")
    directory = tmp_path / "credentials"
    key_file = write(tmp_path / "key.txt", f"  {API_KEY}  \n\n")
    from_file = 'read_secret "API key" "$1"; install_credential stt_api_key "API key" "$SECRET"'
    from_stdin = 'read_secret "API key" -; install_credential stt_api_key "API key" "$SECRET"'

    first = library(from_file, directory, "", str(key_file))
    assert first.returncode == 0, first.stderr
    assert f"API key: {directory}/stt_api_key installed" in first.stdout
    target = directory / "stt_api_key"
    assert target.read_text() == API_KEY + "\n", "surrounding whitespace stripped"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (target.stat().st_uid, target.stat().st_gid) == (0, 0)

    again = library(from_stdin, directory, API_KEY + "\n")
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout

    replaced = library(from_stdin, directory, "sk-new-key-42\n")
    assert replaced.returncode == 0, replaced.stderr
    assert f"API key: {directory}/stt_api_key replaced" in replaced.stdout
    assert target.read_text() == "sk-new-key-42\n"
    assert [path.name for path in directory.iterdir()] == ["stt_api_key"], "no temporary left"

    empty = library(from_stdin, directory, "  \n")
    assert empty.returncode == 2
    assert "the API key from standard input is empty" in empty.stderr
    assert target.read_text() == "sk-new-key-42\n", "a refused key changes nothing"

    for result in (first, again, replaced, empty):
        for secret in (API_KEY, "sk-new-key-42"):
            assert secret not in result.stdout + result.stderr


def test_install_refuses_two_secrets_from_one_pipe_before_anything_else() -> None:
    result = subprocess.run([str(INSTALL), "--api-key-stdin", "--mqtt-password-stdin"],
                            input="a\nb\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "only one of --api-key-stdin and --mqtt-password-stdin" in result.stderr
