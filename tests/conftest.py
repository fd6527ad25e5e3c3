"""Fixtures with real parts: mosquitto, the STT double over WebSockets, a FIFO mic."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Mosquitto, Subscriber
from tests.support.daemon import Daemon, write_config
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble

API_KEY = "test-key-123"


def pytest_configure(config: pytest.Config) -> None:
    missing = [tool for tool in ("mosquitto", "espeak-ng", "sox") if not shutil.which(tool)
               and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        raise pytest.UsageError(f"missing tools {missing}: run scripts/test, which installs them")


@pytest.fixture(autouse=True)
def _no_installed_credentials(tmp_path_factory: pytest.TempPathFactory,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd edged reads the installed credentials
    (/etc/edged/credentials); a test never sees the key of a machine where
    edged is installed. Tests of credentials set CREDENTIALS_DIRECTORY."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path_factory.mktemp("credentials")))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def stt() -> Iterator[SttDouble]:
    server = SttDouble(api_key=API_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def subscriber(broker: Mosquitto) -> Iterator[Subscriber]:
    client = Subscriber(broker.port, "edged/#")
    yield client
    client.close()


class Stack:
    """edged wired to the broker, the STT double and the FIFO mic."""

    def __init__(self, home: Path, broker: Mosquitto, stt_url: str):
        self.home = home
        self.broker = broker
        self.stt_url = stt_url
        self.daemons: list[Daemon] = []
        self.mics: list[FifoMic] = []

    def microphone(self, name: str = "testmic") -> FifoMic:
        """A FIFO-fed ALSA device `name` in the daemon's HOME."""
        mic = FifoMic(self.home, speed=1.0, name=name)
        self.mics.append(mic)
        return mic

    def config(self, **overrides: dict[str, Any]) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "device": {"id": "testpi"},
            "audio": {"device": "testmic", "chunk_ms": 100},
            "stt": {"url": self.stt_url, "provider": "deepgram", "close_timeout_s": 5.0},
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return write_config(self.home / "edged.toml", sections,
                            top={"state_dir": str(self.home / "state")})

    def daemon(self, env: dict[str, str] | None = None, wrap: list[str] | None = None,
               api_key: str | None = API_KEY, **overrides: dict[str, Any]) -> Daemon:
        """Start `edged run`; `api_key=None` leaves the key to the configuration."""
        for earlier in self.daemons:  # one at a time: each its own part of the log
            assert earlier.exited(), "start a daemon only once the one before has exited"
        key = {"EDGED_STT__API_KEY": api_key} if api_key is not None else {}
        daemon = Daemon(self.home, self.config(**overrides), env={**key, **(env or {})},
                        wrap=wrap)
        self.daemons.append(daemon)
        return daemon.start()

    def stop(self) -> list[str]:
        """Stop everything; what each daemon did that its test did not expect."""
        problems = []
        # Daemons stop before microphones: a FIFO whose writer is gone makes
        # alsa-lib's file plugin return stale periods as fast as it can.
        for number, daemon in enumerate(self.daemons, 1):
            daemon.stop()
            print(f"--- edged log, daemon {number} ({daemon.log_path}) ---\n{daemon.log}")
            problems += [f"daemon {number} {problem}" for problem in daemon.problems()]
        for mic in self.mics:
            mic.stop()
        return problems


@contextlib.contextmanager
def honest_stack(home: Path, broker: Mosquitto, stt_url: str) -> Iterator[Stack]:
    """A device's stack that must end honestly: every daemon with the expected
    exit status, nothing alarming in its log."""
    home.mkdir(exist_ok=True)
    setup = Stack(home, broker, stt_url)
    yield setup
    problems = setup.stop()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def stack(home: Path, broker: Mosquitto, stt: SttDouble) -> Iterator[Stack]:
    with honest_stack(home, broker, stt.url) as setup:
        yield setup


@pytest.fixture
def mic(stack: Stack) -> FifoMic:
    return stack.microphone()
