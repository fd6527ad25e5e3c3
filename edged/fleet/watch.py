"""`edged fleet` on the broker: subscribe, gather the retained messages, show them.

The client is made as the daemon makes it (`make_client`: the protocol, the
login, TLS) under a client id of its own, and only subscribes: it needs no
right to publish anywhere. The broker sends the retained messages right
after the subscription is granted; there is no marker for their end that a
read-only client could use, so `--json` and a table into a pipe wait until
no new device has appeared for `QUIET_S`, at most `--wait` seconds. The live
view redraws whenever something arrived (at most every `REDRAW_S`) and
every second, for the ages.
"""

from __future__ import annotations

import json
import queue
import secrets
import signal
import ssl
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho

from edged.config import Settings
from edged.doctor.net import describe_error
from edged.errors import EX_UNAVAILABLE
from edged.fleet.model import Device, Fleet, as_json
from edged.fleet.table import render
from edged.monitor.terminal import AnsiScreen, keys, write
from edged.untrusted import loggable

QUIET_S = 0.5  # no new device for this long: the retained messages are in
TIMEOUT_S = 5.0  # for the connection and the subscription each
REDRAW_S = 0.2
AGES_S = 1.0  # redrawn this often even when nothing arrives: the ages move
NOTICE_LOST = "connection to the broker lost: reconnecting…"
FOOTER = "q or Ctrl-C quits"


class FleetError(Exception):
    def __init__(self, message: str, exit_status: int = EX_UNAVAILABLE):
        super().__init__(message)
        self.exit_status = exit_status


class Watcher:
    """A subscription to every device's retained messages, fed from paho's thread."""

    def __init__(self, settings: Settings, *, reconnect: bool):
        self.mqtt = settings.mqtt
        host = self.mqtt.host
        self.at = f"[{host}]:{self.mqtt.port}" if ":" in host else f"{host}:{self.mqtt.port}"
        self.fleet = Fleet(self.mqtt.base_topic)
        self.lock = threading.Lock()  # the fleet: paho's thread writes, ours reads
        self.changes = 0  # messages taken, to know when to redraw
        self.new_device = threading.Event()
        self.connected = False
        self._looping = False
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        # Its own id: the daemon's would take over a device's session.
        client_id = f"{settings.mqtt_client_id}-fleet-{secrets.token_hex(4)}"
        from edged.mqtt.publisher import make_client  # ConfigError: TLS files

        self._client = make_client(settings, client_id, reconnect=reconnect)
        self._client.connect_timeout = TIMEOUT_S
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self) -> None:
        """Connected and subscribed, or FleetError saying why not."""
        from edged.mqtt.publisher import connect_properties

        try:
            self._client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive_s,
                                 properties=connect_properties(self.mqtt))
        except (OSError, ssl.SSLError, UnicodeError) as error:
            raise FleetError(f"edged fleet: cannot reach the broker at {loggable(self.at)}: "
                             f"{loggable(describe_error(error))}") from None
        self._client.loop_start()
        self._looping = True
        kind, value = self._next({"connack", "disconnect"})
        if kind is None:
            raise FleetError(f"edged fleet: no answer from the broker at {loggable(self.at)} "
                             f"within {TIMEOUT_S:.0f} s")
        if kind == "disconnect":
            raise FleetError(f"edged fleet: the broker at {loggable(self.at)} closed the "
                             f"connection ({value}): check mqtt.port and mqtt.tls")
        if value.is_failure:
            raise FleetError(f"edged fleet: the broker at {loggable(self.at)} refused the "
                             f"connection ({value}): check mqtt.username and the password")
        kind, value = self._next({"suback", "disconnect"})
        if kind != "suback":
            raise FleetError(f"edged fleet: no subscription on the broker at "
                             f"{loggable(self.at)} within {TIMEOUT_S:.0f} s")
        refused = [reason for reason in value if reason.is_failure]
        if refused:
            raise FleetError(f"edged fleet: the broker at {loggable(self.at)} refused the "
                             f"subscription to {self.fleet.subscriptions[0]} ({refused[0]}): "
                             f"let this user read {self.mqtt.base_topic}/+/state, "
                             f"/availability and /audio in its ACL")

    def stop(self) -> None:
        if self._looping:  # else paho logs that there is nothing to stop
            self._client.disconnect()
            self._client.loop_stop()

    def settle(self, wait_s: float) -> None:
        """Wait for the retained messages: until no new device for QUIET_S, at most `wait_s`."""
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            self.new_device.clear()
            if not self.new_device.wait(min(QUIET_S, remaining)):
                break
        if not self.connected:
            raise FleetError(f"edged fleet: the broker at {loggable(self.at)} closed the "
                             f"connection while the retained messages came in")

    def snapshot(self) -> tuple[list[Device], bool, int]:
        """Copies of the devices (paho's thread goes on changing the originals),
        whether some were left out, and the change count."""
        with self.lock:
            devices = [replace(device, problems=dict(device.problems))
                       for device in self.fleet.devices.values()]
            return devices, self.fleet.overflow, self.changes

    # -- paho's thread -------------------------------------------------------------

    def _next(self, kinds: set[str]) -> tuple[str | None, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                kind, value = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if kind in kinds:
                return kind, value
        return None, None

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._events.put(("connack", reason))
        if not reason.is_failure:
            self.connected = True
            # A clean session each time: subscribe again after a reconnection.
            client.subscribe([(topic, 1) for topic in self.fleet.subscriptions])

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected = False
        with self.lock:
            self.changes += 1  # the notice changes
        self._events.put(("disconnect", reason))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._events.put(("suback", reasons))

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # the broker should refuse such a topic; not ours then
            return
        with self.lock:
            try:
                new = self.fleet.receive(topic, bytes(message.payload))
            except Exception as error:  # a bug: raised here, it would end paho's thread
                new = False
                self.fleet.failed(topic, f"not understood ({type(error).__name__})")
            self.changes += 1
        if new:
            self.new_device.set()


# -- the command ----------------------------------------------------------------------


def run_fleet(settings: Settings, *, as_json_document: bool, wait_s: float) -> int:
    """`edged fleet`: exit 0, or EX_UNAVAILABLE when the broker cannot be used."""
    live = not as_json_document and sys.stdout.isatty()
    if live and threading.current_thread() is threading.main_thread():
        # `kill` ends it as Ctrl-C does, leaving the terminal as it was.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = Watcher(settings, reconnect=live)
    title = (f"edged fleet  broker {loggable(watcher.at)}  "
             f"under {loggable(watcher.mqtt.base_topic)}/")
    try:
        watcher.start()
        if live:
            _live(watcher, title)
            return 0
        watcher.settle(wait_s)
        devices, overflow, _ = watcher.snapshot()
        if as_json_document:
            write(json.dumps(as_json(devices), indent=2) + "\n")
        else:
            lines = render(devices, datetime.now(UTC), 1000, title=title, overflow=overflow)
            write("\n".join(lines) + "\n")
        if overflow:
            print(f"edged fleet: more than {len(devices)} devices: the rest are left out",
                  file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 0
    except FleetError as error:
        print(error, file=sys.stderr)
        return error.exit_status
    finally:
        watcher.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _live(watcher: Watcher, title: str) -> None:
    """Redraw until `q` or Ctrl-C."""
    drawn = -1
    drawn_at = 0.0
    with AnsiScreen() as screen, keys() as keyboard:
        while True:
            devices, overflow, changes = watcher.snapshot()
            now = time.monotonic()
            if changes != drawn or now - drawn_at >= AGES_S:
                notice = None if watcher.connected else NOTICE_LOST
                screen.show(render(devices, datetime.now(UTC), screen.width, title=title,
                                   notice=notice, overflow=overflow), FOOTER)
                drawn, drawn_at = changes, now
            if "q" in keyboard.wait(REDRAW_S).lower():
                return
