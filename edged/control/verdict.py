"""A health verdict from the state dict the daemon publishes (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Statuses in which the device does its job, is starting to, or was told not
# to (muted): anything else (reconnecting, no_microphone, auth_failed, ...)
# means audio is not reaching the service right now.
HEALTHY_STATUSES = frozenset({"streaming", "listening", "connecting", "muted"})


def judge(state: Mapping[str, Any]) -> tuple[bool, str]:
    """(healthy, verdict): the verdict is "ok", or names every problem in
    words a fleet dashboard can show (the state's own names and last error)."""
    problems = []
    status = state.get("status")
    if status not in HEALTHY_STATUSES:
        reason = state.get("last_error")
        problems.append(f"status {status}" + (f" ({reason})" if reason else ""))
    microphone = state.get("microphone", "ok")
    if microphone not in ("ok", "absent"):  # absent is the no_microphone status already
        problems.append(f"microphone {microphone}")
    if state.get("storage", "ok") != "ok":
        problems.append(f"storage {state.get('storage')}: {state.get('storage_error')}")
    return not problems, "; ".join(problems) or "ok"
