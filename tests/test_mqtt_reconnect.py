"""MQTT reconnects against a real mosquitto: the daemon waits what its log
says (the jittered schedule of edged/mqtt/backoff.py reaches paho's thread,
also for the first retry at start),
a broker that accepts and then drops it at once sees the waits grow instead
of a retry a second, and each new connection says `online` and subscribes to
Home Assistant's birth topic again."""

from __future__ import annotations

import re
import socket
import threading
import time

import paho.mqtt.publish as publish

from edged.mqtt.backoff import BACKOFF_FLOOR_S, BACKOFF_INITIAL_S
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.daemon import Daemon
from tests.support.mic import FifoMic
from tests.support.mqtt_proxy import MqttProxy
from tests.support.waiting import wait_until

AVAILABILITY = "edged/testpi/availability"


def connections(daemon: Daemon) -> int:
    return daemon.log.count("mqtt.connected ")


def account_of_drop(daemon: Daemon, failures: int) -> re.Match[str] | None:
    """The log line of a lost connection, `failures` in a row: its group 1 is the wait."""
    return re.search(rf"mqtt\.disconnected .* failures={failures} retry_in=([\d.]+)s",
                     daemon.log)


def test_a_broker_that_keeps_dropping_the_daemon_sees_the_waits_grow(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    proxy = MqttProxy(stack.broker.port, drop_pubacks=False).start()
    try:
        daemon = stack.daemon(mqtt={"port": proxy.port})
        subscriber.next(AVAILABILITY, payload=b"online")
        for failures in (1, 2):
            wait_until(lambda: connections(daemon) == failures,  # noqa: B023 (called at once)
                       f"connection {failures}")
            dropped_at = time.monotonic()
            proxy.abort_connections()  # each connection is accepted, then cut at once
            said = wait_until(lambda: account_of_drop(daemon, failures),  # noqa: B023 (at once)
                              f"the daemon's account of drop {failures}")
            assert said is not None
            retry_in = float(said.group(1))
            # Not reset by the connections in between: none was stable.
            ceiling = BACKOFF_INITIAL_S * 2.0 ** (failures - 1)
            assert BACKOFF_FLOOR_S <= retry_in <= ceiling, (failures, retry_in)
            back_at = wait_until(lambda: proxy.connected_at[failures:],  # noqa: B023 (at once)
                                 f"attempt {failures + 1}", timeout=ceiling + 10)[0]
            assert retry_in <= back_at - dropped_at + 0.01, "not sooner than it said"
            assert back_at - dropped_at <= retry_in + 1.0, "not much later than it said"
            subscriber.next(AVAILABILITY, payload=b"online")

        # Home Assistant restarts: the daemon, subscribed again on its third
        # connection, sends its configs again. (Retained: it reaches the
        # subscription even if it came before the SUBSCRIBE.)
        wait_until(lambda: daemon.log.count("mqtt.discovery_announced") == 3,
                   "the configs announced on the third connection")
        publish.single("homeassistant/status", "online", retain=True, hostname="127.0.0.1",
                       port=stack.broker.port)
        wait_until(lambda: daemon.log.count("mqtt.discovery_announced") == 4,
                   "the configs again, after Home Assistant's birth")
    finally:
        proxy.stop()


def test_the_first_retry_at_start_comes_when_the_log_says(stack: Stack, mic: FifoMic) -> None:
    """A broker that takes the TCP connection and hangs up in the TLS handshake:
    the daemon's first attempt is at once, the second `retry_in` later (paho,
    left to itself, would wait twice that after a failed first attempt)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[float] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(time.monotonic())
            connection.close()

    threading.Thread(target=hang_up, daemon=True, name="hang-up").start()
    try:
        started = time.monotonic()
        daemon = stack.daemon(mqtt={"port": listener.getsockname()[1], "tls": True})
        said = wait_until(lambda: re.search(
            r"mqtt\.connect_failed .* attempts=1 retry_in=([\d.]+)s", daemon.log),
            "the first failure's account")
        assert said is not None
        retry_in = float(said.group(1))
        assert BACKOFF_FLOOR_S <= retry_in <= BACKOFF_INITIAL_S
        wait_until(lambda: len(accepted) >= 2, "the second attempt",
                   timeout=BACKOFF_INITIAL_S + 10)
        assert accepted[0] - started < 5.0, "the first attempt is not delayed"
        gap = accepted[1] - accepted[0]
        assert retry_in <= gap + 0.01, "not sooner than it said"
        assert gap <= retry_in + 0.4, "not later than it said"
    finally:
        listener.close()
