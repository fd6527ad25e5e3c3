"""Requests and responses, in the shape of Zigbee2MQTT's bridge API, without I/O.

A request arrives on ``<base>/<device>/request/<verb>`` (or, for every device,
``<base>/_fleet/request/<verb>``) and is answered on
``<base>/<device>/response/<verb>`` with::

    {"status": "ok", "data": {...}, "transaction": <echoed when given>}
    {"status": "error", "data": {...}, "error": "why", "transaction": ...}

The payload is a JSON object, or nothing at all for a verb that takes no
arguments; ``"transaction"`` (a string or a number) is echoed so that a fleet
tool can match answers to its questions. Everything else in the payload is
the verb's arguments, checked here: `parse` turns bytes into a `Request`
holding the `Effect` to carry out, or into the error `Response` to send. What
carries the effect out (the daemon) is the adapter's (`service.py`).

To add a verb: an effect class, an argument parser in `VERBS`, and a case in
the adapter's `_carry_out`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edged.control.layer import parse_json

# A verb is one topic level: anything else on a request topic is answered by
# nobody (it could not be a verb, and its response topic would be as odd).
VERB = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
TRANSACTION_MAX_CHARS = 256
MAX_SET_KEYS = 64  # a `config` set of more is no tuning of a device

Transaction = str | int | float


# -- effects: what a request asks the daemon to do ---------------------------


@dataclass(frozen=True)
class HealthCheck:
    pass


@dataclass(frozen=True)
class ShowConfig:
    pass


@dataclass(frozen=True)
class SetConfig:
    options: dict[str, Any]  # a partial document: sections, or dotted keys


@dataclass(frozen=True)
class Reload:
    pass


@dataclass(frozen=True)
class Mute:
    muted: bool | None  # None: only say whether it is muted


Effect = HealthCheck | ShowConfig | SetConfig | Reload | Mute


class BadRequest(ValueError):
    """What is wrong with a request, said to whoever sent it."""


def _no_arguments(effect: Effect) -> Callable[[dict[str, Any]], Effect]:
    def parse(arguments: dict[str, Any]) -> Effect:
        _only(arguments, set())
        return effect
    return parse


def _config_arguments(arguments: dict[str, Any]) -> Effect:
    _only(arguments, {"options"})
    if "options" not in arguments:
        return ShowConfig()
    options = arguments["options"]
    if not isinstance(options, dict):
        raise BadRequest('"options" must be an object such as {"audio": {"gain_db": 6}}')
    if not options:
        raise BadRequest('"options" is empty: nothing to set')
    return SetConfig(options)


def _mute_arguments(arguments: dict[str, Any]) -> Effect:
    _only(arguments, {"state"})
    if "state" not in arguments:
        return Mute(None)
    state = arguments["state"]
    if isinstance(state, bool):
        return Mute(state)
    if isinstance(state, str) and state.strip().upper() in ("ON", "OFF"):
        return Mute(state.strip().upper() == "ON")
    raise BadRequest('"state" must be "ON" (muted) or "OFF" (or true / false)')


def _only(arguments: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(arguments) - known)
    if unknown:
        takes = f"takes only {', '.join(sorted(known))}" if known else "takes no arguments"
        raise BadRequest(f"unknown field {_quote(unknown[0])} (this verb {takes})")


VERBS: dict[str, Callable[[dict[str, Any]], Effect]] = {
    "health_check": _no_arguments(HealthCheck()),
    "config": _config_arguments,
    "reload": _no_arguments(Reload()),
    "mute": _mute_arguments,
}


# -- requests and responses -----------------------------------------------------


@dataclass(frozen=True)
class Response:
    verb: str
    status: str  # ok | error
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    transaction: Transaction | None = None

    def payload(self) -> bytes:
        body: dict[str, Any] = {"status": self.status, "data": self.data}
        if self.error is not None:
            body["error"] = self.error
        if self.transaction is not None:
            body["transaction"] = self.transaction
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Request:
    verb: str
    effect: Effect
    transaction: Transaction | None = None

    def ok(self, data: dict[str, Any] | None = None) -> Response:
        return Response(self.verb, "ok", data or {}, transaction=self.transaction)

    def error(self, message: str, data: dict[str, Any] | None = None) -> Response:
        return Response(self.verb, "error", data or {}, message, self.transaction)


def verb_of(topic: str, prefixes: tuple[str, ...]) -> str | None:
    """The verb of a request topic under one of `prefixes` (each ending in
    "/request/"), or None when it is not one a response could be sent for."""
    for prefix in prefixes:
        if topic.startswith(prefix):
            verb = topic[len(prefix):]
            return verb if VERB.match(verb) else None
    return None


def parse(verb: str, payload: bytes,
          verbs: Mapping[str, Callable[[dict[str, Any]], Effect]] = VERBS) -> Request | Response:
    """The request in `payload` for `verb` (already checked against `VERB`),
    or the error response it gets."""
    arguments: Any = {}
    if payload.strip():
        try:
            arguments = parse_json(payload)
        except ValueError as error:
            return Response(verb, "error", error=f"payload is {error}")
    if not isinstance(arguments, dict):
        return Response(verb, "error", error="payload must be a JSON object (or empty)")
    transaction = arguments.pop("transaction", None)
    if transaction is not None and not _is_transaction(transaction):
        return Response(verb, "error", error=(
            f'"transaction" must be a string of at most {TRANSACTION_MAX_CHARS} characters '
            "or a number"))
    request_args = verbs.get(verb)
    if request_args is None:
        known = ", ".join(sorted(verbs))
        return Response(verb, "error", error=f"unknown verb {_quote(verb)} (known: {known})",
                        transaction=transaction)
    try:
        effect = request_args(arguments)
    except BadRequest as error:
        return Response(verb, "error", error=str(error), transaction=transaction)
    return Request(verb, effect, transaction)


def _is_transaction(value: Any) -> bool:
    if isinstance(value, bool):
        return False  # a JSON true is no identifier
    if isinstance(value, str):
        return len(value) <= TRANSACTION_MAX_CHARS
    if isinstance(value, int):
        return abs(value) < 2**63  # what any client's integers hold
    return isinstance(value, float) and math.isfinite(value)


def _quote(text: str, limit: int = 64) -> str:
    """A name from the request, quoted for an error text (JSON-escaped, bounded)."""
    return json.dumps(text[:limit] + ("..." if len(text) > limit else ""))


NUMBER_COMMAND_MAX_BYTES = 32


def parse_number(payload: bytes) -> float | str:
    """A bare number as Home Assistant's number entity sends it ("6", "-3.5"),
    or why it is none."""
    if len(payload) > NUMBER_COMMAND_MAX_BYTES:
        return "too long for a number"
    try:
        value = float(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return "not a number"
    if not math.isfinite(value):
        return "not a finite number"
    return value
