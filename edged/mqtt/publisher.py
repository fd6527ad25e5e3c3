"""The MQTT publisher: availability, retained state, transcripts from the outbox.

paho-mqtt runs its network loop in its own thread and reconnects by itself,
waiting between attempts what `edged.mqtt.backoff` says (jittered, so that a
fleet does not come back all at once); its callbacks are marshalled onto the
asyncio loop, which alone touches the outbox. The outbox is the only store of
transcripts: paho is handed a window of at most `WINDOW` of them at a time
(the next ones as PUBACKs come in), and its own queue is capped, so a broker
that never acknowledges costs disk, not memory. paho keeps a QoS 1 message
until PUBACK and re-sends it after a reconnect; the outbox row is deleted only
on PUBACK. What is left at exit is published on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.config import MqttSettings, Settings
from edged.errors import ConfigError
from edged.mqtt import discovery
from edged.mqtt.backoff import ReconnectSchedule
from edged.mqtt.payloads import OFFLINE, ONLINE, Topics
from edged.outbox import Key, Outbox, OutboxItem
from edged.untrusted import loggable

log = logging.getLogger("edged.mqtt")

WINDOW = 20  # transcripts in paho's hands at once (its default in-flight limit)
# paho's queue, everything included (state, availability, discovery): past
# this, publish() refuses instead of growing without bound.
PAHO_QUEUE = 100
# paho's in-flight limit counts every QoS 1 message: the transcripts' window,
# and besides it what a connection sends at once (availability, a dozen
# discovery configs, the state, the mute state, control answers). Without
# this room a broker slow to acknowledge would hold the transcripts behind them.
OTHER_IN_FLIGHT = 40


class Message(NamedTuple):
    """A message from the broker, as a subscriber's handler gets it (on the loop).

    Its payload is untrusted: whoever may publish on the topic wrote it."""

    topic: str
    payload: bytes
    retained: bool  # a retained copy replayed at subscription, not sent just now


MessageHandler = Callable[[Message], None]

# What a handler is given at most: a request or a command is a few hundred
# bytes; anything this large is refused before it is looked at.
MAX_INCOMING_BYTES = 64 * 1024


def make_client(settings: Settings, client_id: str, *, reconnect: bool) -> paho.Client:
    """A paho client as edged connects: the protocol, the login and TLS of
    `settings` (also what `edged doctor` tries)."""
    mqtt = settings.mqtt
    if mqtt.protocol == "5":
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5, reconnect_on_failure=reconnect)
    else:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,  # durability is the outbox's job, not the broker's
            reconnect_on_failure=reconnect,
        )
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, settings.mqtt_password)
    if mqtt.uses_tls:
        client.tls_set_context(tls_context(mqtt))
    return client


def tls_context(mqtt: MqttSettings) -> ssl.SSLContext:
    """Verify the broker against `ca_file` (else the system's CAs); present a
    client certificate when one is configured."""
    try:
        context = ssl.create_default_context(cafile=str(mqtt.ca_file) if mqtt.ca_file else None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load CA certificates: {error}", key="mqtt.ca_file") from None
    if mqtt.cert_file and mqtt.key_file:
        try:
            context.load_cert_chain(str(mqtt.cert_file), str(mqtt.key_file))
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"cannot load the client certificate: {error}",
                              key="mqtt.cert_file") from None
    return context


def connect_properties(mqtt: MqttSettings) -> Properties | None:
    """CONNECT properties (MQTT 5): the session expiry, when set."""
    if mqtt.protocol != "5" or not mqtt.session_expiry_s:
        return None
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = mqtt.session_expiry_s
    return properties


class MqttPublisher:
    def __init__(self, settings: Settings, outbox: Outbox, loop: asyncio.AbstractEventLoop):
        self.settings = settings
        self.topics = Topics(settings.mqtt.base_topic, settings.device.id)
        self.outbox = outbox
        self.connected = False
        self.connect_failures = 0
        self.last_error: str | None = None
        self._loop = loop
        self._in_flight: dict[int, Key] = {}  # paho mid -> outbox item
        self._handed_over: set[Key] = set()  # items paho holds
        self._drained = asyncio.Event()
        self.connects = 0  # successful connections: each wants the state again
        self._received_at: dict[Key, float] = {}  # when a handed-over final came in
        self.on_delivered: Callable[[float], None] | None = None  # latency, seconds
        self.on_connected: Callable[[], None] | None = None  # each new connection, on the loop
        self._stopping = False
        # Refused by the broker (an MQTT 5 PUBACK with a failure reason): kept
        # in the outbox, not offered again until the next connection.
        self._refused: set[Key] = set()
        # Topic filter -> handler, subscribed again on every connection.
        self._subscriptions: dict[str, MessageHandler] = {}
        self._bad_topic_logged = False  # said once: a broker that lets them through repeats
        # Touched only in paho's thread, which asks it before each of its waits.
        self._schedule = ReconnectSchedule()
        self._refusal: str | None = None  # a refused CONNACK, told with the disconnect after it
        self._first_attempt = True  # paho's first, from connect_async (see _retry_later)
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = make_client(self.settings, self.settings.mqtt_client_id, reconnect=True)
        client.will_set(self.topics.availability, OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(WINDOW + OTHER_IN_FLIGHT)
        client.max_queued_messages_set(PAHO_QUEUE)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        mqtt = self.settings.mqtt
        log.info("mqtt.connecting host=%s port=%d client_id=%s", loggable(mqtt.host), mqtt.port,
                 loggable(self.settings.mqtt_client_id))
        self._client.connect_async(mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s,
                                   properties=connect_properties(mqtt))
        self._client.loop_start()
        self.fill()  # left over from an earlier run

    async def stop(self, within_s: float) -> None:
        """Publish what the outbox holds (bounded), then `offline`, then disconnect."""
        self._stopping = True
        await self.drain(within_s)
        if self.connected:
            info = self._client.publish(self.topics.availability, OFFLINE, qos=1, retain=True)
            # Raises if the connection went meanwhile: the Last Will covers that.
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, max(within_s, 1.0))
            if not info.is_published():
                # Stuck behind transcripts the broker never acknowledged (paho's
                # in-flight window is full): QoS 0 goes out at once, and TCP
                # delivers it before the DISCONNECT that would cancel the Will.
                self._client.publish(self.topics.availability, OFFLINE, qos=0, retain=True)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        if self.outbox.depth:
            log.warning("mqtt.unpublished items=%d kept_in_outbox=true", self.outbox.depth)

    async def drain(self, within_s: float) -> bool:
        """Wait until every outbox item is acknowledged, or `within_s` passed."""
        if self.outbox.depth == 0:
            return True
        self._drained.clear()
        try:
            await asyncio.wait_for(self._drained.wait(), within_s)
        except TimeoutError:
            return False
        return True

    # -- subscriptions ------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Hand messages on `topic_filter` to `handler`, on the loop, for as
        long as this publisher lives (each new connection subscribes again)."""
        self._subscriptions = {**self._subscriptions, topic_filter: handler}
        # Always: `connected` is set on the loop after paho's `_on_connect`
        # took its snapshot of the filters, and a filter added in between
        # would be missing on this connection. Not connected, paho returns
        # MQTT_ERR_NO_CONN and the next `_on_connect` subscribes it.
        self._client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop handing messages on `topic_filter` to anyone."""
        self._subscriptions = {key: handler for key, handler in self._subscriptions.items()
                               if key != topic_filter}
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def _route(self, topic: str, payload: bytes, retained: bool) -> None:
        for topic_filter, handler in self._subscriptions.items():
            if paho.topic_matches_sub(topic_filter, topic):
                if len(payload) > MAX_INCOMING_BYTES:
                    log.warning("mqtt.message_refused topic=%s bytes=%d reason=too_large",
                                loggable(topic), len(payload))
                    return
                handler(Message(topic, payload, retained))
                return

    # -- publishing ---------------------------------------------------------

    def submit(self, item: OutboxItem, received_at: float | None = None) -> None:
        """A new final is committed to the outbox: publish it if the window has room."""
        self.fill()
        if received_at is not None and item.key in self._handed_over:
            self._received_at[item.key] = received_at

    def fill(self) -> None:
        """Hand the oldest waiting outbox items to paho, up to the window."""
        # Refused items hold their place in the window until the next
        # connection: a broker that refuses everything costs no memory.
        while len(self._handed_over) + len(self._refused) < WINDOW:
            batch = [item for item in self.outbox.pending(
                         WINDOW + len(self._handed_over) + len(self._refused))
                     if item.key not in self._handed_over and item.key not in self._refused]
            if not batch:
                return
            for item in batch:
                if (len(self._handed_over) + len(self._refused) >= WINDOW
                        or not self._hand_over(item)):
                    return

    def _hand_over(self, item: OutboxItem) -> bool:
        qos = self.settings.mqtt.qos
        if qos == 0 and not self.connected:
            return False  # paho drops QoS 0 while disconnected: keep it in the outbox
        info = self._client.publish(self.topics.transcript, item.payload, qos=qos)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            return False  # paho is full: the outbox keeps it until there is room
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("mqtt.publish_refused seq=%d rc=%s", item.seq, info.rc)
            return False
        if qos == 0:
            self._delivered(item.key)  # no PUBACK will come
        else:
            self._handed_over.add(item.key)
            self._in_flight[info.mid] = item.key
        return True

    def publish_now(self, topic: str, payload: bytes, qos: int) -> None:
        """Fire and forget (partials, Hermes copies): not kept in the outbox."""
        if self.connected:
            self._client.publish(topic, payload, qos=qos)

    def retract_discovery(self) -> None:
        """Remove our Home Assistant entities (empty retained configs)."""
        if self.connected:
            for topic, _ in discovery.announcements(self.settings, self.topics):
                self._client.publish(topic, b"", qos=1, retain=True)

    def reconfigure(self, settings: Settings) -> None:
        """Settings that keep this client (its mqtt section and device are the
        same): Home Assistant's entities follow them (turning control on or
        off adds or removes some), the ones that went away are removed."""
        before = discovery.announcements(self.settings, self.topics)
        self.settings = settings
        after = discovery.announcements(settings, self.topics)
        if not settings.mqtt.discovery or after == before or not self.connected:
            return  # (a later connection announces what is current)
        for topic in {topic for topic, _ in before} - {topic for topic, _ in after}:
            self._client.publish(topic, b"", qos=1, retain=True)
        self._announce()

    def _announce(self) -> None:
        if self.settings.mqtt.discovery and self.connected:
            for topic, payload in discovery.announcements(self.settings, self.topics):
                self._client.publish(topic, payload, qos=1, retain=True)
            log.info("mqtt.discovery_announced prefix=%s", self.settings.mqtt.discovery_prefix)

    def publish_retained(self, topic: str, payload: bytes, qos: int = 0) -> bool:
        """A retained message of our own that the next one supersedes (audio
        telemetry, the mute state), if the broker is there; whether it went
        out. At QoS 0 it takes no place in paho's in-flight window, which is
        the transcripts', and one lost with a connection is sent again on the
        next one."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=True)
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    def publish_state(self, payload: bytes) -> bool:
        """Retained state, if the broker is there; whether it went out."""
        if not self.connected:
            return False
        info = self._client.publish(self.topics.state, payload, qos=1, retain=True)
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    def _delivered(self, key: Key) -> None:
        received_at = self._received_at.pop(key, None)
        self._handed_over.discard(key)
        self.outbox.remove(key)
        # Observed after the removal: a metrics scrape (another thread) that
        # sees the latency must also see the outbox without it.
        if received_at is not None and self.on_delivered is not None:
            self.on_delivered(time.monotonic() - received_at)
        if self.outbox.depth == 0:
            self._drained.set()

    def _acknowledged(self, key: Key) -> None:
        self._delivered(key)
        self.fill()

    # -- paho callbacks (paho's thread) -------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self._refusal = f"refused: {reason}"  # paho disconnects next, then waits
            return
        self._schedule.connected(time.monotonic())
        client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
        if self.settings.mqtt.discovery:
            client.subscribe(discovery.birth_topic(self.settings), qos=1)
        for topic_filter in self._subscriptions:  # a snapshot: replaced, never mutated
            client.subscribe(topic_filter, qos=1)
        self._loop.call_soon_threadsafe(self._connected)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        if self._stopping:  # we asked for it: no next attempt
            self._loop.call_soon_threadsafe(self._disconnected, str(reason), 0, 0.0)
            return
        was_up = self._schedule.up
        self._first_attempt = False
        delay = self._retry_later(client)
        refusal, self._refusal = self._refusal, None
        if was_up:
            self._loop.call_soon_threadsafe(self._disconnected, str(reason),
                                            self._schedule.failures, delay)
        else:
            self._loop.call_soon_threadsafe(
                self._connect_failed, refusal or f"closed before CONNACK: {reason}", delay)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError`: the cause is at hand.
        error = sys.exc_info()[1]
        reason = f"{type(error).__name__}: {error}" if error else "broker unreachable"
        # paho waits twice after its first attempt fails: once in its
        # connect_async branch, once more in its reconnect loop.
        waits, self._first_attempt = (2 if self._first_attempt else 1), False
        delay = self._retry_later(client, waits)
        self._loop.call_soon_threadsafe(self._connect_failed, reason, delay)

    def _retry_later(self, client: paho.Client, waits: int = 1) -> float:
        """The wait before paho's next attempt, set just before paho starts it
        (every wait of paho's follows an on_disconnect or an on_connect_fail),
        in `waits` equal parts when paho is about to wait more than once.
        paho waits `min_delay` after a reset, doubling up to `max_delay`: with
        both the same it waits exactly that; its wait is float arithmetic
        (sleeps of at most 1 s, so a stop ends it), whatever its annotation says."""
        delay = self._schedule.next_delay(time.monotonic())
        part = delay / waits
        client.reconnect_delay_set(min_delay=part, max_delay=part)  # type: ignore[arg-type]
        return delay

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # The broker should have refused it; raised here, it would end
            # paho's loop (and its reconnecting) for good.
            if not self._bad_topic_logged:
                self._bad_topic_logged = True
                log.warning("mqtt.message_refused reason=topic_not_utf8")
            return
        if topic == discovery.birth_topic(self.settings) and message.payload == ONLINE:
            # Home Assistant restarted: it wants the configs again.
            self._loop.call_soon_threadsafe(self._announce)
            return
        self._loop.call_soon_threadsafe(self._route, topic, bytes(message.payload),
                                        bool(message.retain))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason: ReasonCode, properties: Any) -> None:
        refusal = str(reason) if reason.is_failure else None
        self._loop.call_soon_threadsafe(self._published, mid, refusal)

    # -- the same events, on the loop -----------------------------------------

    def _connected(self) -> None:
        self.connected = True
        self.connect_failures = 0
        self.last_error = None
        self.connects += 1
        log.info("mqtt.connected host=%s tls=%s", loggable(self.settings.mqtt.host),
                 str(self.settings.mqtt.uses_tls).lower())
        self._announce()
        self._refused.clear()  # a new connection: offer them again
        self.fill()
        if self.on_connected is not None:
            self.on_connected()

    def _disconnected(self, reason: str, failures: int, retry_in: float) -> None:
        if self.connected:
            if self._stopping:
                log.info("mqtt.disconnected reason=%s", loggable(reason))  # we asked for it
            else:
                # `failures` counts since the last stable connection, so a broker
                # that keeps dropping us is seen to push the waits up.
                log.warning("mqtt.disconnected reason=%s failures=%d retry_in=%.2fs",
                            loggable(reason), failures, retry_in)
        self.connected = False

    def _connect_failed(self, reason: str, retry_in: float) -> None:
        self.connect_failures += 1
        self.last_error = f"mqtt: {reason}"
        # Retries come every 0.5..60 s; one line per few attempts is enough.
        if self.connect_failures in (1, 2, 5) or self.connect_failures % 20 == 0:
            log.warning("mqtt.connect_failed host=%s port=%d attempts=%d retry_in=%.2fs "
                        "reason=%s", loggable(self.settings.mqtt.host), self.settings.mqtt.port,
                        self.connect_failures, retry_in, loggable(reason))

    def _published(self, mid: int, refusal: str | None = None) -> None:
        key = self._in_flight.pop(mid, None)
        if key is None:
            return
        if refusal is not None:
            # Not delivered: the outbox keeps it; tried again after a reconnect.
            self._handed_over.discard(key)
            self._refused.add(key)
            log.warning("mqtt.publish_refused seq=%d reason=%s kept_in_outbox=true", key[1],
                        loggable(refusal))
            return
        self._acknowledged(key)
