"""A `config` set, planned without I/O: which keys may change, which are
refused and why, and what the remote layer becomes.

The same rules as a config file's (`edged.config.validate_layer`, so the same
messages), plus `control.allowed_keys` and the keys that are never settable
remotely (`edged.config.remote_refusal`). A request with any refused key
changes nothing: a fleet tool sending a coherent set of changes must not
leave a device with half of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edged.config import UNKNOWN, flatten, nest, remote_refusal, validate_layer
from edged.control.requests import MAX_SET_KEYS

KEY_MAX_CHARS = 100


@dataclass(frozen=True)
class Refused:
    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    layer: dict[str, Any]  # the remote layer after the change, by dotted key
    refused: list[Refused]

    @property
    def document(self) -> dict[str, Any]:
        """The layer as its file holds it: nested like a config file."""
        return nest(self.layer)


def plan(options: Mapping[str, Any], stored: Mapping[str, Any], allowed: Sequence[str],
         source: str) -> Plan:
    """What setting `options` (sections or dotted keys; null removes a key
    from the layer) does to the layer that holds `stored`."""
    changes: dict[str, Any] = {}
    refused: list[Refused] = []
    for name, value in options.items():
        for dotted, leaf in flatten({name: value}).items():
            problem = _malformed(dotted) or ("given twice" if dotted in changes else None)
            if problem:
                refused.append(Refused(_shown(dotted), problem))
                continue
            changes[dotted] = leaf
    if len(changes) > MAX_SET_KEYS:
        return Plan(dict(stored), [Refused("options", f"more than {MAX_SET_KEYS} keys")])
    not_allowed = {dotted: reason for dotted in changes
                   if (reason := remote_refusal(dotted, allowed))}
    refused += [Refused(dotted, reason) for dotted, reason in not_allowed.items()]
    # Every key is judged, so that one answer names every problem.
    values = {key: value for key, value in changes.items()
              if value is not None and key not in not_allowed}
    refused += [Refused(problem.key or "options", f"invalid: {problem.message}")
                for problem in validate_layer(values, source)]
    if refused:
        return Plan(dict(stored), refused)
    # A key set or removed replaces what the layer held at it and under it
    # (null on a section name clears the whole section from the layer).
    layer = {key: value for key, value in stored.items()
             if not any(key == dotted or key.startswith(f"{dotted}.") for dotted in changes)}
    return Plan({**layer, **values}, [])


def _malformed(dotted: str) -> str | None:
    if len(dotted) > KEY_MAX_CHARS or not all(dotted.split(".")):
        return "not a key"
    return None


def _shown(dotted: str) -> str:
    return dotted if len(dotted) <= KEY_MAX_CHARS else dotted[:KEY_MAX_CHARS] + "..."


def differences(before: Iterable[tuple[str, Any, str]],
                after: Iterable[tuple[str, Any, str]]) -> list[dict[str, Any]]:
    """Each key whose value or source differs, from `effective_items` rows
    (secrets already masked there): {"key", "old", "new", "source"}."""
    old = {key: (_printable(value), source) for key, value, source in before}
    changed = []
    for key, value, source in after:
        new = (_printable(value), source)
        if old.get(key) != new:
            previous = old.get(key, (None, None))[0]
            changed.append({"key": key, "old": previous, "new": new[0], "source": source})
    return changed


def _printable(value: Any) -> Any:
    return "?" if value is UNKNOWN else value
