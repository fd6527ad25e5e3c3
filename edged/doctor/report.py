"""The report: a line per check as it finishes and a summary, or (`--json`) one
JSON document and nothing else on stdout.

Exit status: 0 when no check failed (a warning does not fail: it names
something to look at that does not stop edged working), 1 when one did, 130
when interrupted. Every string is masked with the configuration's secrets
before it is shown.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from edged.config import Settings
from edged.doctor.checks import MICROPHONE, Check, run_checks
from edged.logs import mask_secrets, setup_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT

LABELS = {"pass": "[ OK ]", "warn": "[WARN]", "fail": "[FAIL]", "skip": "[SKIP]"}


def run_doctor(config_paths: Sequence[Path] | None, flags: Mapping[str, Any], *,
               seconds: float, as_json: bool) -> int:
    checks: list[Check] = []
    dash = _dash(sys.stdout)

    def announce(name: str) -> None:
        if name == MICROPHONE and not as_json and sys.stderr.isatty():
            print(f"  (microphone: listening for {seconds:g} s; speak or make a sound)",
                  file=sys.stderr, flush=True)

    try:
        for check in run_checks(config_paths, flags, seconds=seconds, on_settings=_use_secrets,
                                announce=announce):
            check = masked(check)
            checks.append(check)
            if not as_json:
                print(line(check, dash), flush=True)
    except KeyboardInterrupt as interrupt:  # SIGINT, or SIGTERM (edged.cli passes its number)
        print("edged doctor: interrupted", file=sys.stderr)
        signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else 0
        return 128 + signum if signum else EXIT_INTERRUPTED
    ok = not any(check.failed for check in checks)
    if as_json:
        print(json.dumps(document(checks), indent=2))
    else:
        print(summary(checks))
    return EXIT_OK if ok else EXIT_FAILED


def _use_secrets(settings: Settings) -> None:
    # The log (libraries may warn) and mask_secrets both mask these from now on.
    setup_logging("warning", secrets=settings.secrets)


def masked(check: Check) -> Check:
    return Check(check.name, check.verdict, mask_secrets(check.detail),
                 mask_secrets(check.fix) if check.fix is not None else None,
                 _masked_data(check.data))


def _masked_data(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, Mapping):
        return {key: _masked_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked_data(item) for item in value]
    return value


def line(check: Check, dash: str = "—") -> str:
    text = f"{LABELS[check.verdict]} {check.name}: {check.detail}"
    if check.fix:
        text += f" {dash} fix: {check.fix}"
    return text


def summary(checks: Sequence[Check]) -> str:
    def names(verdict: str) -> list[str]:
        return [check.name for check in checks if check.verdict == verdict]

    counts = [f"{len(names(verdict))} {word}" for verdict, word in
              (("pass", "passed"), ("warn", "warned"), ("fail", "failed"), ("skip", "skipped"))
              if names(verdict)]
    failed, warned = names("fail"), names("warn")
    if failed:
        return f"edged doctor: FAILED: {', '.join(failed)} ({', '.join(counts)})"
    note = f"; look at: {', '.join(warned)}" if warned else ""
    return f"edged doctor: OK ({', '.join(counts)}){note}"


def document(checks: Sequence[Check]) -> dict[str, Any]:
    return {
        "ok": not any(check.failed for check in checks),
        "checks": [{"name": check.name, "verdict": check.verdict, "detail": check.detail,
                    "fix": check.fix, "data": dict(check.data)} for check in checks],
    }


def _dash(stream: TextIO) -> str:
    """An em dash where the terminal can show one."""
    try:
        "—".encode(stream.encoding or "ascii")
    except (LookupError, UnicodeEncodeError):
        return "--"
    return "—"
