"""The `edged` command: run, check-config, doctor, monitor, fleet, devices, stt-server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edged import __version__
from edged.errors import EX_CONFIG, ConfigError

# Each command imports what it needs when it runs (pydantic, ALSA, paho,
# asyncio are most of a start on a Pi Zero), so `monitor`, `check-config`
# and `doctor` start quickly and a signal in the first instant meets our
# handler, not an import half done.
if TYPE_CHECKING:
    from edged.config import LoadedConfig, Settings

log = logging.getLogger("edged")

# Flags that set configuration keys: (flag, dotted key, type, help)
_SETTING_FLAGS: list[tuple[str, str, type, str]] = [
    ("--device-id", "device.id", str, "device id used in MQTT topics"),
    ("--audio-device", "audio.device", str,
     "ALSA capture PCM, e.g. plughw:1,0 (default auto: the first card that can capture)"),
    ("--stt-url", "stt.url", str, "WebSocket endpoint of the STT service"),
    ("--mqtt-host", "mqtt.host", str, "MQTT broker host"),
    ("--mqtt-port", "mqtt.port", int, "MQTT broker port"),
    ("--state-dir", "state_dir", str, "directory for durable state"),
    ("--log-level", "log_level", str, "debug, info, warning or error"),
]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", action="append", type=Path, metavar="PATH",
        help="config file (repeatable; default: edged.toml then conf.d/*.toml in "
             "$CONFIGURATION_DIRECTORY, else /etc/edged)",
    )
    for flag, dotted, kind, text in _SETTING_FLAGS:
        parser.add_argument(flag, dest=dotted, type=kind, metavar="VALUE", help=text)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {dotted: getattr(args, dotted) for _, dotted, _, _ in _SETTING_FLAGS}


def _load(args: argparse.Namespace, *, unreadable_ok: bool = False,
          remote: Mapping[str, Any] | None = None) -> LoadedConfig:
    from edged.config import load_config

    return load_config(args.config, flags=_flags(args), unreadable_ok=unreadable_ok,
                       remote=remote)


def _config_failed(error: ConfigError) -> int:
    for warning in error.warnings:  # what this user could not check, besides
        print(f"edged: warning: {warning}", file=sys.stderr)
    for problem in error.problems:  # every problem, one line each
        print(f"edged: configuration error: {problem}", file=sys.stderr)
    return EX_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    from urllib.parse import urlsplit

    from edged.config import missing_key_warning
    from edged.logs import setup_logging

    try:
        loaded = _load(args)
    except ConfigError as error:
        return _config_failed(error)
    settings = loaded.settings
    setup_logging(settings.log_level, secrets=settings.secrets)
    for note in loaded.unreadable:  # the installed credentials, read outside systemd
        log.warning("config.secret_unreadable key=%s path=%s error=%s hint=run as %s, or "
                    "start edged.service, which gets it as a credential",
                    note.key, note.path, note.reason, note.who)
    if missing_key_warning(loaded):
        log.warning("stt.no_api_key host=%s hint=sudo scripts/install --api-key-stdin, "
                    "or set stt.api_key_file or EDGED_STT__API_KEY",
                    urlsplit(settings.stt.url).hostname)
    from edged.control.service import settle_remote_layer
    from edged.supervisor import run_daemon  # imports ALSA and paho only when running

    def load() -> Settings:  # the first time it cannot fail: this was just validated
        loaded = _load(args)
        settle_remote_layer(loaded)  # a damaged remote layer is moved aside
        return loaded.settings

    def inspect(remote: Mapping[str, Any] | None = None) -> LoadedConfig:
        return _load(args, remote=remote)

    try:
        return asyncio.run(run_daemon(load, inspect))
    except ConfigError as error:  # found only when used: a TLS file, the audio format
        log.error("edged.config_error error=%s", error)
        return _config_failed(error)
    except OSError as error:
        log.error("edged.fatal error=%s", error)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every value and its source, then warnings; exit 78 listing every
    problem. A secret this user may not read (a key file for root and the
    edged user, the installed credentials for root) is a warning, not an
    error: the service may well read it. Exit 0 then means that all this
    user could read is valid."""
    import json

    from edged.config import UNKNOWN, config_report

    try:
        loaded = _load(args, unreadable_ok=True)
    except ConfigError as error:
        return _config_failed(error)
    report = config_report(loaded)
    rows = [(key, "?" if value is UNKNOWN else json.dumps(value), source)
            for key, value, source in report.items]
    width = max(len(key) + len(value) + 3 for key, value, _ in rows)
    for key, value, source in rows:
        print(f"{key} = {value}".ljust(width), f"# {source}")
    warnings = report.warnings
    for warning in warnings:
        print(f"edged: warning: {warning}", file=sys.stderr)
    if loaded.unreadable:
        print("configuration OK as far as this user can read it (see the warnings)",
              file=sys.stderr)
    elif warnings:
        print(f"configuration OK, with {len(warnings)} warning{'s' * (len(warnings) > 1)}",
              file=sys.stderr)
    else:
        print("configuration OK", file=sys.stderr)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import alsaaudio

    from edged.audio.alsalog import route_alsa_messages

    route_alsa_messages()
    cards = alsaaudio.cards()
    print("Sound cards:")
    if not cards:
        print("  (none: is the microphone plugged in, and is this user in group 'audio'?)")
    for index, name in zip(alsaaudio.card_indexes(), cards, strict=False):
        long_name = alsaaudio.card_name(index)[1] if hasattr(alsaaudio, "card_name") else name
        print(f"  card {index}: {name} ({long_name})   -> audio.device = \"plughw:{index},0\"")
    from edged.audio import devices

    capture_cards = devices.cards()
    chosen = devices.pick(capture_cards)
    print("\nCards that can capture (audio.device = \"auto\" picks the first USB one, "
          "else the first):")
    for card in capture_cards:
        mark = "   <- auto picks this" if card is chosen else ""
        print(f"  card {card.index} [{card.id}]: {card.name}{' (USB)' if card.usb else ''}"
              f"   -> {card.pcm}{mark}")
    if not capture_cards:
        print("  (none: auto falls back to \"default\")")
    print("\nCapture PCMs (usable as audio.device):")
    for pcm in alsaaudio.pcms(alsaaudio.PCM_CAPTURE):
        hint = ""
        if pcm.startswith("hw:"):
            hint = "   (raw: may not do 16 kHz mono; prefer plughw:)"
        print(f"  {pcm}{hint}")
    return 0


def cmd_stt_server(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    from edged.logs import setup_logging

    setup_logging(args.log_level)
    api_key = None
    if args.api_key_file:
        try:
            api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            print(f"edged: cannot read --api-key-file: {error.strerror}", file=sys.stderr)
            return EX_CONFIG
        if not api_key:
            print(f"edged: --api-key-file {args.api_key_file} is empty", file=sys.stderr)
            return EX_CONFIG
    try:
        from edged.localstt import serve
    except ImportError as error:
        print(f"edged: stt-server needs PocketSphinx: pip install 'edged[localstt]' ({error})",
              file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, api_key=api_key))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    try:
        settings = _load(args, unreadable_ok=True).settings  # it needs no secret
    except ConfigError as error:
        return _config_failed(error)
    from edged.monitor.view import run_monitor  # ALSA only if it falls back to the mic

    return run_monitor(settings.state_dir / "monitor.sock", settings.audio.device,
                       settings.audio.chunk_ms)


def cmd_fleet(args: argparse.Namespace) -> int:
    try:
        loaded = _load(args, unreadable_ok=True)
    except ConfigError as error:
        return _config_failed(error)
    for note in loaded.unreadable:
        if note.secret == "mqtt.password":  # noqa: S105  (the key's name, not a secret)
            print(f"edged: warning: {note}", file=sys.stderr)
    from edged.fleet.watch import run_fleet  # paho only now

    try:
        return run_fleet(loaded.settings, as_json_document=args.json, wait_s=args.wait)
    except ConfigError as error:  # found only when used: the TLS files
        return _config_failed(error)


def cmd_doctor(args: argparse.Namespace) -> int:
    from edged.doctor.report import run_doctor

    # Up now: an interrupt ends the checks in order (the microphone closed,
    # one line said) rather than at once.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    return run_doctor(args.config, _flags(args), seconds=args.seconds, as_json=args.json)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.5 <= value <= 60:
        raise argparse.ArgumentTypeError("must be from 0.5 to 60")
    return value


def _wait(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 60:
        raise argparse.ArgumentTypeError("must be from 0.1 to 60")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged",
        description="Edge audio daemon: ALSA microphone -> streaming STT -> MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="capture, transcribe and publish (the daemon)",
        description="Capture from the microphone, stream it to the STT service and publish "
                    "the final transcripts to MQTT until SIGTERM or SIGINT (exit 0); a bad "
                    "configuration exits 78. Under systemd this is edged.service.")
    _add_config_arguments(run)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config", help="validate and print the configuration",
        description="Print every configuration value with its source (secrets masked), then "
                    "warnings; exit 78 listing every problem. Run as root or as the edged "
                    "user to check the secrets too.")
    _add_config_arguments(check)
    check.set_defaults(handler=cmd_check_config)

    monitor = commands.add_parser(
        "monitor", help="live input level, connection states and transcripts",
        description="A live view for setting up a microphone: the input level in dBFS, "
                    "clipping, connection states and the last transcripts, from the running "
                    "daemon's socket, or from the microphone itself when no daemon runs. "
                    "Ctrl-C quits. Into a file or a pipe it writes one plain line a second."
    )
    _add_config_arguments(monitor)
    monitor.set_defaults(handler=cmd_monitor)

    fleet = commands.add_parser(
        "fleet", help="every edged on the broker, those in trouble first",
        description="A live table of every edged on the broker, from their retained state, "
                    "availability and audio level: status, muted, the age of the last "
                    "transcript, reconnects, queued transcripts, level, version; devices in "
                    "trouble first. q or Ctrl-C quits. Into a pipe it prints one table; "
                    "--json one document. Exit 69 when the broker cannot be used.")
    _add_config_arguments(fleet)
    fleet.add_argument("--json", action="store_true",
                       help="print one JSON document, a list of devices (for fleet tooling)")
    fleet.add_argument("--wait", type=_wait, default=2.0, metavar="S",
                       help="with --json or into a pipe: wait at most S seconds for the "
                            "retained messages (default 2)")
    fleet.set_defaults(handler=cmd_fleet)

    doctor = commands.add_parser(
        "doctor", help="check each link live: configuration, storage, microphone, STT, broker",
        description="Check each link of the data path live, in its order: the configuration, "
                    "the state directory, the microphone's level, the STT service (DNS, TCP, "
                    "TLS, the key, a short session), the broker (TCP, TLS, login, a round "
                    "trip) and the clock; each with a verdict and the fix. Exit 0 when no "
                    "check failed (warnings allowed), 1 when one did.",
    )
    _add_config_arguments(doctor)
    doctor.add_argument("--json", action="store_true",
                        help="print one JSON document {ok, checks} (for fleet tooling)")
    doctor.add_argument("--seconds", type=_seconds, default=3.0, metavar="N",
                        help="seconds of microphone level to measure (default 3)")
    doctor.set_defaults(handler=cmd_doctor)

    devices = commands.add_parser(
        "devices", help="list ALSA capture devices",
        description="List the sound cards, the cards that can capture (marking the one "
                    "audio.device = \"auto\" picks) and the capture PCMs ALSA knows.")
    devices.set_defaults(handler=cmd_devices)

    server = commands.add_parser(
        "stt-server", help="run a local router.audio-compatible STT server (PocketSphinx)",
        description="A local server speaking router.audio's streaming protocol on "
                    "/v1/listen, recognising US English with PocketSphinx: for the demo, the "
                    "tests, and a device with no cloud account."
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8765)
    server.add_argument("--api-key-file", type=Path, help="require this key in x-api-key")
    server.add_argument("--log-level", default="info")
    server.set_defaults(handler=cmd_stt_server)
    return parser


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Out at once, from wherever the signal landed: raising here instead
    # could land inside an import, a weakref callback or a C extension,
    # where the exception is swallowed or reported with a traceback. Nothing
    # durable is open before a command installs its own handlers.
    os.write(2, f"edged: interrupted ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signum)


def _unraisable(unraisable: Any) -> None:
    """An interrupt raised where Python cannot raise it (a weakref callback
    or a `__del__` that ran when the signal came) would be printed with a
    traceback and lost: the command ends at once instead, as it would have."""
    interrupt = unraisable.exc_value
    if isinstance(interrupt, KeyboardInterrupt):
        signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) \
            else signal.SIGINT
        _interrupted(signum, None)
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    """Any command ends cleanly on SIGINT or SIGTERM at any moment: status
    128 + the signal, one line, no traceback. The daemon and the monitor put
    their own handlers in place once they are up (the daemon to stop in
    order, the monitor to give the terminal back)."""
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    sys.unraisablehook = _unraisable
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


def entry() -> None:
    """The `edged` command: `main`, then out at once with its status. A
    signal that lands while the interpreter winds down (or an interrupt
    that landed inside an import or a C extension) could otherwise be
    reported again on the way out, as a second exit status."""
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)

if __name__ == "__main__":
    entry()
