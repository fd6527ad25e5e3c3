"""The broker: TCP, TLS, CONNACK (a refused login named), and a QoS 1 round
trip on `<base>/<device>/doctor`.

The paho client is made as the publisher makes it (`make_client`: the
protocol, the login, TLS), under a client id of its own: the daemon's would
take over a running daemon's session and fire its Last Will. Nothing is
published on the transcript, state or availability topics.
"""

from __future__ import annotations

import queue
import secrets
import ssl
import time
from typing import Any

from edged.config import Settings
from edged.doctor.checks import BROKER, Check, failed, passed
from edged.doctor.net import connect_any, describe_error, resolve, tcp_failure, tls_handshake
from edged.errors import ConfigError

TIMEOUT_S = 5.0  # for each step
# CONNACK reason codes (MQTT 5; paho maps the 3.1.1 return codes onto them).
BAD_LOGIN = 0x86
NOT_AUTHORISED = 0x87
BAD_PROTOCOL = 0x84


class _BrokerCheck:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.mqtt = settings.mqtt
        host = self.mqtt.host
        self.at = f"[{host}]:{self.mqtt.port}" if ":" in host else f"{host}:{self.mqtt.port}"
        self.topic = f"{self.mqtt.base_topic}/{settings.device.id}/doctor"
        self.steps: list[str] = []
        self.data: dict[str, Any] = {"broker": self.at, "topic": self.topic}

    def passed(self) -> Check:
        return passed(BROKER, f"{self.at}: {', '.join(self.steps)}", **self.data)

    def failed(self, problem: str, fix: str) -> Check:
        return failed(BROKER, problem, fix, steps=list(self.steps), **self.data)

    def run(self) -> Check:
        context = None
        if self.mqtt.uses_tls:
            from edged.mqtt.publisher import tls_context

            try:
                context = tls_context(self.mqtt)
            except ConfigError as error:
                return self.failed(str(error), "point mqtt.ca_file (and mqtt.cert_file, "
                                   "mqtt.key_file) at readable PEM files")
        problem = self._probe(context)
        if problem is not None:
            return problem
        return self._session()

    def _probe(self, context: ssl.SSLContext | None) -> Check | None:
        host, port = self.mqtt.host, self.mqtt.port
        started = time.monotonic()
        infos = resolve(host, port)
        if isinstance(infos, str):
            return self.failed(f"cannot resolve {host}: {infos}",
                               "check mqtt.host, and this device's DNS (`resolvectl status`)")
        sock, error = connect_any(infos, TIMEOUT_S)
        if sock is None:
            return self.failed(*tcp_failure(
                error, host, port, TIMEOUT_S,
                "start the broker (`sudo systemctl start mosquitto`) or set mqtt.host / "
                "mqtt.port"))
        self.data["tcp_ms"] = round(1000 * (time.monotonic() - started))
        self.steps.append(f"TCP in {self.data['tcp_ms']} ms")
        with sock:
            if context is None:
                return None
            result = tls_handshake(sock, context, host, port)
            if isinstance(result, tuple):
                problem, certificate = result
                if not certificate:
                    fix = ("is this the broker's TLS port (often 8883)? for a plain port set "
                           "mqtt.tls = false")
                elif "not yet valid" in problem or "expired" in problem:
                    fix = ("check this device's clock first (`timedatectl`), then the "
                           "broker's certificate")
                else:
                    fix = "set mqtt.ca_file to the CA that signed the broker's certificate"
                return self.failed(f"{self.at}: {problem}", fix)
            self.data["tls"] = result
            self.steps.append(f"{result} verified")
        return None

    def _session(self) -> Check:
        from edged.mqtt.publisher import connect_properties, make_client

        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = make_client(self.settings, f"{self.settings.mqtt_client_id}-doctor",
                             reconnect=False)
        client.connect_timeout = TIMEOUT_S
        client.on_connect = lambda c, u, flags, reason, p: events.put(("connack", reason))
        client.on_disconnect = lambda c, u, flags, reason, p: events.put(("disconnect", reason))
        client.on_subscribe = lambda c, u, mid, reasons, p: events.put(("suback", reasons))
        client.on_publish = lambda c, u, mid, reason, p: events.put(("puback", reason))
        client.on_message = lambda c, u, message: events.put(("message", message.payload))
        started = time.monotonic()
        try:
            client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive_s,
                           properties=connect_properties(self.mqtt))
        except (OSError, ssl.SSLError) as error:
            return self.failed(f"{self.at}: connecting failed: {describe_error(error)}",
                               "check mqtt.host, mqtt.port and mqtt.tls")
        client.loop_start()
        try:
            problem = self._connack(events, started)
            if problem is None:
                problem = self._round_trip(client, events)
        finally:
            client.disconnect()
            client.loop_stop()
        return problem or self.passed()

    def _connack(self, events: queue.Queue[tuple[str, Any]], started: float) -> Check | None:
        kind, value = _next(events, {"connack", "disconnect"}, time.monotonic() + TIMEOUT_S)
        if kind is None:
            return self.failed(f"{self.at}: no CONNACK within {TIMEOUT_S:.0f} s",
                               "is this an MQTT port? check mqtt.port (and mqtt.tls)")
        if kind == "disconnect":
            return self.failed(f"{self.at}: the broker closed the connection before CONNACK "
                               f"({value})",
                               "check mqtt.port and mqtt.tls (a TLS port wants mqtt.tls = "
                               "true), a client certificate (mqtt.cert_file, mqtt.key_file) if "
                               "the broker requires one, and the broker's log")
        if value.is_failure:
            return self._refused(value)
        self.data["connack_ms"] = round(1000 * (time.monotonic() - started))
        user = self.mqtt.username
        self.steps.append("CONNACK accepted" + (f" for user {user}" if user else ""))
        return None

    def _refused(self, reason: Any) -> Check:
        self.data["connack"] = str(reason)
        login = ("set mqtt.username and mqtt.password_file (the broker allows no anonymous "
                 "clients)")
        if reason.value == BAD_LOGIN:
            if self.mqtt.username is None:
                return self.failed(f"{self.at}: the broker wants a login ({reason})", login)
            return self.failed(f"{self.at}: bad user name or password for user "
                               f"{self.mqtt.username} ({reason})",
                               "check mqtt.username and mqtt.password / mqtt.password_file")
        if reason.value == NOT_AUTHORISED:
            if self.mqtt.username is None:
                return self.failed(f"{self.at}: not authorised ({reason})", login)
            # What mosquitto answers an MQTT 3.1.1 client with a wrong password, too.
            return self.failed(f"{self.at}: bad credentials, or user {self.mqtt.username} is "
                               f"not allowed in ({reason})",
                               "check mqtt.username and mqtt.password / mqtt.password_file, "
                               "and the broker's password file and ACL for this user")
        if reason.value == BAD_PROTOCOL:
            return self.failed(f"{self.at}: the broker does not speak MQTT "
                               f"{self.mqtt.protocol} ({reason})",
                               "set mqtt.protocol = \"3.1.1\"")
        return self.failed(f"{self.at}: refused at CONNACK ({reason})", "see the broker's log")

    def _round_trip(self, client: Any, events: queue.Queue[tuple[str, Any]]) -> Check | None:
        acl = (f"let this client read and write {self.mqtt.base_topic}/"
               f"{self.settings.device.id}/# in the broker's ACL")
        client.subscribe(self.topic, qos=1)
        kind, value = _next(events, {"suback", "disconnect"}, time.monotonic() + TIMEOUT_S)
        if kind != "suback":
            return self.failed(f"{self.at}: no SUBACK for {self.topic} within "
                               f"{TIMEOUT_S:.0f} s" + (f" ({value})" if value else ""), acl)
        refusals = [reason for reason in value if reason.is_failure]
        if refusals:
            return self.failed(f"{self.at}: the subscription to {self.topic} was refused "
                               f"({refusals[0]})", acl)
        nonce = secrets.token_hex(8).encode()
        started = time.monotonic()
        client.publish(self.topic, nonce, qos=1)
        deadline = started + TIMEOUT_S
        acknowledged = returned = False
        while not (acknowledged and returned):
            kind, value = _next(events, {"puback", "message", "disconnect"}, deadline)
            if kind is None:
                break
            if kind == "disconnect":
                return self.failed(f"{self.at}: the broker dropped the connection during the "
                                   f"round trip on {self.topic} ({value})", acl)
            if kind == "puback":
                if value.is_failure:
                    return self.failed(f"{self.at}: the publish on {self.topic} was refused "
                                       f"({value})", acl)
                acknowledged = True
            elif value == nonce:
                returned = True
        if not acknowledged:
            return self.failed(f"{self.at}: no PUBACK for a QoS 1 publish on {self.topic} "
                               f"within {TIMEOUT_S:.0f} s", "see the broker's log")
        if not returned:
            return self.failed(f"{self.at}: published on {self.topic}, but it did not come "
                               f"back within {TIMEOUT_S:.0f} s", acl)
        self.data["round_trip_ms"] = round(1000 * (time.monotonic() - started))
        self.steps.append(f"QoS 1 round trip on {self.topic} in "
                          f"{self.data['round_trip_ms']} ms")
        return None


def _next(events: queue.Queue[tuple[str, Any]], kinds: set[str],
          deadline: float) -> tuple[str | None, Any]:
    """The next event of one of `kinds` (others are dropped), or (None, None) at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None
        try:
            kind, value = events.get(timeout=remaining)
        except queue.Empty:
            return None, None
        if kind in kinds:
            return kind, value


def check_broker(settings: Settings) -> Check:
    return _BrokerCheck(settings).run()

