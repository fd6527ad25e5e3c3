"""Secrets by shape: a key wherever it is put never leaves edged in clear.

The key goes in each place a user may put it (the query of stt.url, the
password of its user info, stt.params under a credential name, the
environment, a key file); a real daemon at log level debug talks to the STT
double with it, and every output is searched for it: check-config, the log,
the retained state, the monitor socket, the metrics, the discovery configs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from websockets.sync.server import ServerConnection, serve

from tests.conftest import API_KEY, Stack
from tests.support.broker import Subscriber, free_port
from tests.support.daemon import Daemon
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import script
from tests.test_config import EX_CONFIG, edged, write

MASK = "********"
# '+', '/' and '=' are percent-encoded in a URL: the key must be masked in
# every form it takes there, as well as in clear.
KEY = "sk-SECRET+in/url=4711"
FORMS = {KEY, quote_plus(KEY), quote(KEY, safe="")}
ENTITIES = 9  # Home Assistant discovery configs


def leaks(text: str) -> list[str]:
    return [form for form in FORMS if form in text]


def monitor_frames(path: Path, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """What `edged monitor` receives from the daemon: JSON lines on its socket."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no monitor socket at {path}"
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        data = b""
        while data.count(b"\n") < count:
            chunk = client.recv(65536)
            assert chunk, "the daemon closed the monitor socket"
            data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def scrape(port: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def placement(name: str, stack: Stack, stt: SttDouble) -> tuple[dict[str, Any], dict[str, str]]:
    """(stt settings, environment) with KEY in one place; the double is told
    which key to expect, so a connection proves the key reached it intact."""
    stt.api_key = KEY
    if name == "url query":
        return {"url": f"{stack.stt_url}?api_key={quote_plus(KEY)}"}, {}
    if name == "params api_key":
        return {"params": {"api_key": KEY, "language": "en"}}, {}
    if name == "environment":
        return {}, {"EDGED_STT__API_KEY": KEY}
    if name == "api_key_file":
        key_file = write(stack.home / "api_key", KEY + "\n")
        key_file.chmod(0o600)
        return {"api_key_file": str(key_file)}, {}
    # Where the double does not look for a key: it authenticates by header.
    stt.api_key = API_KEY
    if name == "params token":
        return {"params": {"token": KEY}}, {"EDGED_STT__API_KEY": API_KEY}
    assert name == "url password"
    url = stack.stt_url.replace("://", f"://edged:{quote(KEY, safe='')}@")
    return {"url": url}, {"EDGED_STT__API_KEY": API_KEY}


@pytest.mark.parametrize("name", ["url query", "params api_key", "params token",
                                  "url password", "environment", "api_key_file"])
def test_key_never_leaves_in_clear(
    name: str, stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    settings, env = placement(name, stack, stt)
    metrics_port = free_port()
    config = stack.config(stt=settings, metrics={"enabled": True, "port": metrics_port})
    env["EDGED_LOG_LEVEL"] = "debug"

    check = edged("check-config", "--config", str(config), env=env)
    assert check.returncode == 0, check.stderr
    assert not leaks(check.stdout + check.stderr)
    assert MASK in check.stdout

    ha = Subscriber(stack.broker.port, "homeassistant/#")
    daemon = Daemon(stack.home, config, env=env)
    stack.daemons.append(daemon)
    daemon.start()
    try:
        daemon.wait_for_log("stt.connected")
        audio, _ = script([["alpha", "bravo"]])
        mic.play(audio)
        subscriber.next("edged/testpi/transcript", timeout=30)
        frames = monitor_frames(stack.home / "state" / "monitor.sock", 3)
        metrics = scrape(metrics_port)
        discovery = [ha.next(timeout=20) for _ in range(ENTITIES)]
    finally:
        ha.close()
    assert daemon.stop() == 0

    session = stt.sessions[-1]
    if name in ("url query", "params api_key"):
        assert session.query["api_key"] == [KEY], "the key must reach the service unmasked"
    elif name == "params token":
        assert session.query["token"] == [KEY]
    elif name in ("environment", "api_key_file"):
        assert session.api_key == KEY
    assert " DEBUG " in daemon.log, "the log was at debug level"
    published = [message for message in subscriber.seen if message.topic.startswith("edged/")]
    assert any(message.topic == "edged/testpi/state" for message in published)
    outputs = {
        "log": daemon.log,
        "mqtt": "\n".join(message.payload.decode() for message in published),
        "monitor": json.dumps(frames),
        "metrics": metrics,
        "discovery": "\n".join(message.payload.decode() for message in discovery),
    }
    assert {where: leaks(text) for where, text in outputs.items() if leaks(text)} == {}


class EchoingService:
    """A WebSocket service that refuses each session with a close reason
    quoting the request, key and all: what edged reports as its last error."""

    def __init__(self) -> None:
        self.server = serve(self._refuse, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _refuse(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        connection.close(1008, f"refused {connection.request.path}"[:120])

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def echoing() -> Iterator[EchoingService]:
    service = EchoingService()
    yield service
    service.stop()


def test_an_error_quoting_the_url_is_masked_in_state_monitor_and_log(
    stack: Stack, echoing: EchoingService, mic: FifoMic, subscriber: Subscriber
) -> None:
    url = f"ws://127.0.0.1:{echoing.port}/v1/listen?api_key={quote_plus(KEY)}"
    daemon = stack.daemon(stt={"url": url})
    daemon.wait_for_log("stt.disconnected")

    deadline = time.monotonic() + 20
    while True:
        state = json.loads(subscriber.next("edged/testpi/state", timeout=20).payload)
        if "refused" in (state["last_error"] or ""):
            break
        assert time.monotonic() < deadline, f"no last_error from the service: {state}"
    # The error is cleared for the instant a session is up: look at a few frames.
    frames = monitor_frames(stack.home / "state" / "monitor.sock", 10)
    monitor_errors = [frame["state"]["last_error"] for frame in frames
                      if "refused" in (frame["state"]["last_error"] or "")]

    assert f"api_key={MASK}" in state["last_error"]
    assert monitor_errors
    assert all(f"api_key={MASK}" in error for error in monitor_errors)
    assert f"api_key={MASK}" in daemon.log, "the error is logged, masked"
    assert not leaks(daemon.log)
    assert not leaks(json.dumps(frames))
    assert not leaks("\n".join(m.payload.decode() for m in subscriber.seen))


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (f'[stt]\nurl = "https://example.com/v1/listen?api_key={quote_plus(KEY)}"\n',
         "stt.url"),
        (f'[stt]\nurl = "wss://example.com:bad/v1/listen?token={quote_plus(KEY)}"\n',
         "stt.url"),
        ('[stt.params]\naccess_token = ["' + KEY + '"]\n', "stt.params.access_token"),
        ('[stt]\nparams = ["' + KEY + '"]\n', "stt.params"),
    ],
)
def test_a_refused_value_is_not_echoed_with_its_key(tmp_path: Path, content: str,
                                                      key: str) -> None:
    config = write(tmp_path / "edged.toml", content)
    result = edged("check-config", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert f"{key} (from {config})" in result.stderr
    assert not leaks(result.stdout + result.stderr)


def test_a_rule_across_keys_does_not_echo_the_section_with_its_password(
    tmp_path: Path
) -> None:
    config = write(tmp_path / "edged.toml", (
        f'[mqtt]\nusername = "pi"\npassword = "{KEY}"\ncert_file = "/etc/edged/pi.crt"\n'
    ))
    result = edged("check-config", "--config", str(config))
    assert result.returncode == EX_CONFIG
    assert "cert_file and key_file go together" in result.stderr
    assert not leaks(result.stderr)


def test_check_config_masks_credentials_by_name_and_keeps_the_rest(tmp_path: Path) -> None:
    config = write(tmp_path / "edged.toml", (
        f'[stt]\nurl = "wss://stt.example/v1/listen?model=nova&Access-Token={KEY}"\n'
        f'[stt.params]\nlanguage = "de"\nclient_secret = "{KEY}"\nkeywords = "kitchen"\n'
    ))
    result = edged("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert not leaks(result.stdout + result.stderr)
    lines = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert f'"wss://stt.example/v1/listen?model=nova&Access-Token={MASK}"' in lines["stt.url"]
    assert (f'{{"language": "de", "client_secret": "{MASK}", "keywords": "kitchen"}}'
            in lines["stt.params"])
