"""A real mosquitto on a free loopback port, and a subscriber that records."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None, extra: str = "",
                 anonymous: bool = True):
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra  # listener options, e.g. TLS files
        self.anonymous = anonymous
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{self.extra}"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            "persistence false\n"
            # Started as root, mosquitto drops to its own user before it loads
            # TLS files, and could not read them in pytest's private tmp dirs.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.log = (self.workdir / "mosquitto.log").open("wb")
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        """A broker that dies (SIGKILL): connections cut, no goodbye, no Will sent for anyone."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    received_at: float = 0.0  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Subscribes to a topic filter and queues what arrives, in order."""

    def __init__(self, port: int, topic: str = "#", login: tuple[str, str] | None = None):
        self.messages: queue.Queue[Message] = queue.Queue()
        self.seen: list[Message] = []
        self.filter = topic
        self._subscribed = queue.Queue[bool]()
        self._synced = queue.Queue[bytes]()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{time.time_ns()}")
        if login:  # a broker with a password file (and ACLs)
            self.client.username_pw_set(*login)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.put(True)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._subscribed.get(timeout=10)

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        if m.topic == self._sync_topic:
            self._synced.put(bytes(m.payload))
            return
        self.messages.put(Message(m.topic, bytes(m.payload), bool(m.retain), m.qos,
                                  time.monotonic()))

    @property
    def _sync_topic(self) -> str:
        return self.filter.removesuffix("#") + "_test_sync"

    def sync(self, timeout: float = 10.0) -> None:
        """Return once everything the broker had for us when called has arrived
        (the retained messages of the subscription, above all): a marker we
        publish ourselves comes after them. Needs a filter ending in `#`."""
        assert self.filter.endswith("#"), "a marker must match the subscription"
        marker = str(time.time_ns()).encode()
        self.client.publish(self._sync_topic, marker, qos=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._synced.get(timeout=max(deadline - time.monotonic(), 0.01)) == marker:
                    return
            except queue.Empty:
                raise TimeoutError(f"our own marker did not come back within {timeout}s") from None

    def pending(self) -> list[Message]:
        """What has arrived and nobody has taken with `next` yet (taken now)."""
        taken = []
        while True:
            try:
                taken.append(self.messages.get_nowait())
            except queue.Empty:
                break
        self.seen += taken
        return taken

    def next(self, topic: str | None = None, timeout: float = 30.0,
             payload: bytes | None = None) -> Message:
        """The next message (on `topic`, with `payload`, if given); others are kept in `seen`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message on {topic or '#'} within {timeout}s; "
                                   f"saw {[(m.topic, m.payload[:60]) for m in self.seen[-8:]]}")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(message)
            if (topic is None or message.topic == topic) and (
                payload is None or message.payload == payload
            ):
                return message

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
