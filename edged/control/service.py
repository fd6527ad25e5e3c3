"""Fleet control's adapter: MQTT messages in, the daemon's effects, responses out.

Thin on purpose: `requests.parse` decides what a payload asks, `changes.plan`
what a `config` set may do; this module subscribes, queues, carries effects
out one at a time and publishes the answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from edged.config import UNKNOWN, LoadedConfig, config_report, effective_items
from edged.control import layer
from edged.control.changes import Refused, differences, plan
from edged.control.mute import parse_command
from edged.control.requests import (
    HealthCheck,
    Mute,
    Reload,
    Request,
    Response,
    SetConfig,
    ShowConfig,
    parse,
    parse_number,
    verb_of,
)
from edged.control.verdict import judge
from edged.errors import ConfigError
from edged.logs import mask_secrets
from edged.mqtt.discovery import gain_settable
from edged.mqtt.payloads import Topics
from edged.mqtt.publisher import Message, MqttPublisher
from edged.storage import condition_of, describe, quarantine
from edged.untrusted import loggable

if TYPE_CHECKING:
    from edged.supervisor import Daemon

log = logging.getLogger("edged.control")

# Loads the configuration as `check-config` does (files, the remote layer,
# environment, flags), or with a candidate remote layer in place of its file.
LoadConfig = Callable[[Mapping[str, Any] | None], LoadedConfig]

# Requests wait here and are carried out one at a time: a reload or a config
# set takes a second, and a flood must cost memory in proportion to this, not
# to the flood. What does not fit is dropped (and counted in the log).
QUEUE_LIMIT = 16
DROPPED_LOG_EVERY_S = 10.0
RETAINED_TOPICS_REMEMBERED = 64
# A reload that changed the mqtt section answers through a new client, which
# is still connecting: the answer waits this long for it.
RESPONSE_WAIT_S = 10.0
RESPONSE_POLL_S = 0.05


def settle_remote_layer(loaded: LoadedConfig) -> None:
    """At each load of the daemon: a damaged remote layer is moved aside
    (it was already left out), keys no longer allowed are said."""
    remote = loaded.remote
    if remote is None:
        return
    if remote.damaged:
        log.error("control.remote_layer_damaged path=%s reason=%s", loggable(remote.path),
                  loggable(remote.damaged))
        quarantine(remote.path, "not_a_layer")
    elif remote.unreadable:
        log.error("control.remote_layer_unreadable path=%s error=%s", loggable(remote.path),
                  loggable(remote.unreadable))
    for key in remote.ignored:
        log.warning("control.remote_key_ignored key=%s reason=not_in_allowed_keys",
                    loggable(key))


class Control:
    def __init__(self, daemon: Daemon, load_config: LoadConfig):
        self.daemon = daemon
        self._load_config = load_config
        # (message, the topics it came in under, fleet or device)
        self._queue: asyncio.Queue[tuple[Message, Topics, str]] = asyncio.Queue(QUEUE_LIMIT)
        self._serial = asyncio.Lock()  # one effect at a time, whoever asks
        self._publisher: MqttPublisher | None = None  # where our subscriptions are
        self._filters: tuple[str, ...] = ()
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retained_seen: set[str] = set()
        self._dropped = 0
        self._dropped_logged_at = 0.0
        # The gain a Home Assistant slider asked for last: a drag sends many
        # values, and only the last one needs carrying out.
        self._gain_wanted: float | None = None
        self._gain_setter: asyncio.Task[None] | None = None
        self._closed = False  # the daemon is stopping

    # -- lifecycle ------------------------------------------------------------

    def attach(self) -> None:
        """Follow the daemon's configuration now and after every reload;
        call before the daemon's publisher starts."""
        self.daemon.reconfigured.append(self._follow)
        self.daemon.stopping.append(self._stop)
        self._worker = self.daemon.loop.create_task(self._work(), name="control")
        self._follow()

    def _stop(self) -> None:
        """The daemon is stopping: no new request is taken (the one under way
        finishes), so nothing restarts what the shutdown stops."""
        self._closed = True
        if self._publisher is not None:
            for topic_filter in self._filters:
                self._publisher.unsubscribe(topic_filter)
        self._filters = ()
        if self._worker is not None and not self._serial.locked():
            self._worker.cancel()  # idle: waiting for the next request
        log.info("control.stopped reason=shutdown")

    async def close(self) -> None:
        for task in [self._worker, self._gain_setter, *self._tasks]:
            if task is not None:
                task.cancel()
        self._worker = None

    def _follow(self) -> None:
        """Subscribe (or not) as control.enabled says, on the daemon's
        current publisher (a reload may have made a new one)."""
        if self._closed:
            return
        publisher = self.daemon.publisher
        enabled = self.daemon.settings.control.enabled
        wanted: tuple[str, ...] = ()
        if enabled:
            wanted = (publisher.topics.request("+"), publisher.topics.fleet_request("+"))
            wanted += (publisher.topics.mute_set,)
            if gain_settable(self.daemon.settings):
                wanted += (publisher.topics.gain_set,)
        if publisher is self._publisher and wanted == self._filters:
            return
        if publisher is self._publisher:  # same client: drop what is no longer wanted
            for topic_filter in self._filters:
                if topic_filter not in wanted:
                    publisher.unsubscribe(topic_filter)
        handlers = {publisher.topics.gain_set: self._gain_received,
                    publisher.topics.mute_set: self._mute_received}
        for topic_filter in wanted:
            publisher.subscribe(topic_filter, handlers.get(topic_filter, self._received))
        if wanted != self._filters:
            log.info("control.%s requests=%s", "enabled" if enabled else "disabled",
                     ",".join(wanted) or "none")
        self._publisher, self._filters = publisher, wanted

    # -- requests -------------------------------------------------------------

    def _received(self, message: Message) -> None:
        if self._closed or self._retained(message):
            return
        topics = self.daemon.publisher.topics
        source = "fleet" if message.topic.startswith(topics.fleet_request("")) else "device"
        try:
            self._queue.put_nowait((message, topics, source))
        except asyncio.QueueFull:
            self._dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged_at >= DROPPED_LOG_EVERY_S:
                log.warning("control.requests_dropped count=%d reason=queue_full limit=%d",
                            self._dropped, QUEUE_LIMIT)
                self._dropped_logged_at, self._dropped = now, 0

    def _mute_received(self, message: Message) -> None:
        """`<base>/<device>/mute/set`: ON or OFF. Whoever may publish there can
        silence the device: subscribed only with control on (and a broker ACL)."""
        if self._closed:  # (handed over just before the unsubscribe)
            log.warning("control.mute_ignored reason=stopping")
            return
        if message.retained:
            # A retained command is replayed at every connection: it would undo
            # whatever was decided since it was sent. Only live commands count.
            log.warning("control.mute_ignored reason=retained payload=%s",
                        loggable(message.payload[:64].decode("utf-8", "replace")))
            return
        muted = parse_command(message.payload)
        if muted is None:
            log.warning("control.mute_refused reason=not_ON_or_OFF payload=%s",
                        loggable(message.payload[:64].decode("utf-8", "replace")))
            return
        self.daemon.set_muted(muted, source="mqtt")

    def _gain_received(self, message: Message) -> None:
        """Home Assistant's gain number: a bare number, set as `audio.gain_db`
        through the path of a remote `config` set (allowed keys, validation,
        the remote layer, a reload)."""
        if self._closed or self._retained(message):
            return
        value = parse_number(message.payload)
        if isinstance(value, str):
            log.warning("control.gain_refused reason=%s payload=%s", value,
                        loggable(message.payload[:40].decode("utf-8", "replace")))
            return
        self._gain_wanted = value
        if self._gain_setter is None or self._gain_setter.done():
            self._gain_setter = self.daemon.loop.create_task(self._set_gain(), name="control-gain")

    async def _set_gain(self) -> None:
        while self._gain_wanted is not None:
            value, self._gain_wanted = self._gain_wanted, None
            try:
                ok, error, _ = await self.set_config({"audio": {"gain_db": value}},
                                                     source="mqtt gain/set")
            except Exception:  # a bug: said, and the next value still served
                log.exception("control.gain_failed value=%s", value)
                continue
            if not ok:
                log.warning("control.gain_refused value=%s reason=%s", value, loggable(error))

    def _retained(self, message: Message) -> bool:
        """Whether to ignore `message` as a retained command."""
        if message.retained:
            # A retained request is replayed by the broker at every connection
            # (each reconnect, each restart, each reload that makes a new
            # client): carried out, a `reload` or a `config` set would run
            # again and again, and one a tool left behind would steer devices
            # that join later. Requests are commands, not state: ignored,
            # with one line per topic to say how to clear it.
            if message.topic not in self._retained_seen:
                if len(self._retained_seen) < RETAINED_TOPICS_REMEMBERED:
                    self._retained_seen.add(message.topic)
                log.warning("control.retained_request_ignored topic=%s hint=clear it with "
                            "mosquitto_pub -r -n -t <topic>", loggable(message.topic))
            return True
        return False

    async def _work(self) -> None:
        while not self._closed:
            message, topics, source = await self._queue.get()
            if self._closed:
                return
            try:
                await self._serve(message, topics, source)
            except Exception:  # a bug: said, and the next request still served
                log.exception("control.request_failed topic=%s", loggable(message.topic))

    async def _serve(self, message: Message, topics: Topics, source: str) -> None:
        verb = verb_of(message.topic, (topics.request(""), topics.fleet_request("")))
        if verb is None:
            log.warning("control.request_ignored topic=%s reason=not_a_verb",
                        loggable(message.topic))
            return
        response_topic = topics.response(verb)
        decided = parse(verb, message.payload)
        if isinstance(decided, Response):
            response = decided
        else:
            async with self._serial:
                response = await self._answer(decided, source)
        log.info("control.request verb=%s source=%s status=%s%s", verb, source,
                 response.status, f" error={loggable(response.error)}"
                 if response.error else "")
        try:
            payload = response.payload()
        except ValueError:  # a value JSON cannot carry (inf, nan): said, not sent half-way
            log.exception("control.response_unencodable verb=%s", verb)
            if isinstance(decided, Response):
                return
            payload = decided.error("internal error (see the device's log)").payload()
        await self._respond(response_topic, payload)

    async def _respond(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + RESPONSE_WAIT_S
        while not self.daemon.publisher.connected:  # the daemon's client, whichever it is now
            if time.monotonic() > deadline:
                log.warning("control.response_lost topic=%s reason=mqtt_down", loggable(topic))
                return
            await asyncio.sleep(RESPONSE_POLL_S)
        self.daemon.publisher.publish_now(topic, payload, qos=1)

    async def _answer(self, request: Request, source: str) -> Response:
        try:
            return await self._carry_out(request, source)
        except Exception:  # a bug: said in the log, answered, and the next request served
            log.exception("control.request_failed verb=%s", request.verb)
            return request.error("internal error (see the device's log)")

    async def _carry_out(self, request: Request, source: str) -> Response:
        match request.effect:
            case HealthCheck():
                state = self.daemon.state()
                healthy, verdict = judge(state)
                return request.ok({**state, "healthy": healthy, "verdict": verdict})
            case ShowConfig():
                return await self._show_config(request)
            case Reload():
                outcome = await self.daemon.reload()
                data = {"changed": outcome.changed, "needs_restart": outcome.needs_restart}
                if outcome.refused:
                    return request.error(f"refused, the current configuration stays: "
                                         f"{mask_secrets(outcome.refused)}", data)
                return request.ok(data)
            case Mute(muted):
                if muted is not None:
                    self.daemon.set_muted(muted, source=f"mqtt {source} request")
                return request.ok({"muted": self.daemon.muted})
            case SetConfig(options):
                ok, error, data = await self._set(options, f"mqtt {source}")
                return request.ok(data) if ok else request.error(error or "", data)
        return request.error("not implemented")

    async def _show_config(self, request: Request) -> Response:
        try:
            loaded = await asyncio.to_thread(self._load_config, None)
        except ConfigError as error:  # the files were edited since: the daemon runs on
            return request.error(f"the configuration is invalid: {mask_secrets(str(error))}")
        report = config_report(loaded)
        config = {key: {"value": "?" if value is UNKNOWN else value, "source": source}
                  for key, value, source in report.items}
        running = dict((key, value) for key, value, _ in effective_items(
            LoadedConfig(self.daemon.settings, loaded.layers)))
        # What the files say now and what the daemon runs on differ until a
        # reload (or, for state_dir and vad, a restart) applies them.
        pending = [key for key, entry in config.items()
                   if key in running and running[key] != entry["value"]]
        return request.ok({"config": config, "warnings": report.warnings,
                           "not_applied": pending})

    # -- config set -----------------------------------------------------------

    async def set_config(self, options: Mapping[str, Any], *,
                         source: str) -> tuple[bool, str | None, dict[str, Any]]:
        """Set keys through exactly the path of a remote `config` set (for
        example from a Home Assistant number entity):
        `await control.set_config({"audio": {"gain_db": 6.0}}, source="homeassistant")`.
        Returns (ok, error, data) as the response would say them."""
        async with self._serial:
            return await self._set(options, source)

    async def _set(self, options: Mapping[str, Any],
                   source: str) -> tuple[bool, str | None, dict[str, Any]]:
        try:
            before = await asyncio.to_thread(self._load_config, None)
        except ConfigError as error:
            return False, (f"the configuration is invalid, nothing set: "
                           f"{mask_secrets(str(error))}"), {}
        remote = before.remote
        assert remote is not None  # load_config always looks for the layer when valid
        if remote.unreadable:
            return False, f"cannot read {remote.path}: {remote.unreadable}", {}
        if remote.damaged:  # moved aside, as at a start: the new layer starts empty
            settle_remote_layer(before)
        planned = plan(options, remote.stored, before.settings.control.allowed_keys,
                       remote.source)
        if not planned.refused and planned.layer == remote.stored:
            return True, None, {"changed": [], "refused": []}
        after = None
        if not planned.refused:
            try:
                after = await asyncio.to_thread(self._load_config, planned.document)
            except ConfigError as error:  # a rule across keys, with the other sources
                planned = type(planned)(planned.layer, [
                    Refused(problem.key or "options", f"invalid: {problem.message}")
                    for problem in error.problems])
        if after is None or planned.refused:
            refused = [item.as_dict() for item in planned.refused]
            log.warning("control.config_refused source=%s keys=%s", loggable(source),
                        loggable(",".join(item.key for item in planned.refused)))
            count = len(refused)
            return False, (f"{count} key{'s' * (count > 1)} refused, nothing changed"), {
                "changed": [], "refused": refused}
        try:
            await asyncio.to_thread(layer.write, remote.path, planned.document)
        except OSError as error:
            condition = condition_of(error, remote.path.parent)
            log.error("control.config_not_saved source=%s condition=%s error=%s",
                      loggable(source), condition, loggable(describe(error)))
            return False, (f"storage {condition}: cannot save {remote.path.name} "
                           f"({describe(error)}); nothing changed"), {
                "changed": [], "refused": [], "storage": condition}
        changed = differences(effective_items(before), effective_items(after))
        log.info("control.config_set source=%s keys=%s", loggable(source),
                 loggable(",".join(item["key"] for item in changed) or "none"))
        outcome = await self.daemon.reload()
        data = {"changed": changed, "refused": [], "reload": asdict(outcome)}
        if outcome.refused:
            return False, (f"saved, but the reload was refused: "
                           f"{mask_secrets(outcome.refused)}"), data
        return True, None, data
