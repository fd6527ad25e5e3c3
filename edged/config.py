"""Settings: the models, where each value comes from, and validation.

Sources, highest first (the contract in design.md):

1. command-line flags
2. environment variables ``EDGED_<SECTION>__<KEY>``
3. systemd credentials ``stt_api_key`` and ``mqtt_password`` (secrets only,
   see `credentials_directory`)
4. the ``[devices."<device id>"]`` section of the config files
5. the config files, later files above earlier ones
6. defaults

Every value remembers its source so that errors and ``edged check-config`` can
name it. Each source is validated on its own first (a bad value in a file is
an error even where a variable overrides it: the next device may lack the
variable), then files and variables are merged by pydantic-settings from one
source object per layer; the models forbid unknown keys. Every problem found
is reported, not only the first.

Secrets are known by name (``stt.api_key``, ``mqtt.password``) and by shape:
credentials in the query of ``stt.url`` and in ``stt.params``, see
`is_credential_name`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edged.errors import ConfigError
from edged.logs import MASK

SYSTEM_CONFIG_DIR = Path("/etc/edged")
ENV_PREFIX = "EDGED_"
ENV_NESTING = "__"
DEFAULT_SOURCE = "default"
ENV_SOURCE = "environment"

SAMPLE_RATE = 16_000
SAMPLE_WIDTH = 2  # bytes, s16le
CHANNELS = 1

# A device id and the base topic end up in MQTT topic names: no wildcards, no
# empty levels, nothing a shell or a file name would trip over.
_TOPIC_LEVEL = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class _Section(BaseModel):
    # No inf or nan anywhere (TOML and the environment can spell them): no
    # setting means either, and a JSON answer (`config` get) cannot carry them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DeviceSettings(_Section):
    id: str = Field(default_factory=socket.gethostname, pattern=rf"^{_TOPIC_LEVEL}$")
    # How Home Assistant shows the device: its name and suggested area.
    name: str | None = None
    area: str | None = None


class AudioSettings(_Section):
    # "auto": the first card that can capture, USB first (edged.audio.devices).
    device: str = Field(default="auto", min_length=1)
    chunk_ms: int = Field(default=100, ge=20, le=250)
    # Exact digital silence (or one stuck value) this long: a dead or muted
    # microphone, reported. A quiet room is never exactly silent. 0: off.
    silent_after_s: float = Field(default=60.0, ge=0, le=86400)
    # Software gain applied to the captured audio, saturating at full scale
    # (edged.audio.gain). Applied on a reload without reopening the device.
    gain_db: float = Field(default=0.0, ge=-20.0, le=30.0)
    # The level telemetry (<base>/<device>/audio): published this often, and
    # sooner (at most once a second) when the RMS level moved this many dB
    # from the last published one (0: only on the interval).
    level_interval_s: float = Field(default=10.0, ge=1.0, le=3600.0)
    level_change_db: float = Field(default=6.0, ge=0.0, le=60.0)

    # What a reload applies to the running capture; any other change reopens the device.
    LIVE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"silent_after_s", "gain_db", "level_interval_s", "level_change_db"})

    def reopens_device(self, other: AudioSettings) -> bool:
        """Whether going from `other` to these settings needs the device reopened."""
        return (self.model_dump(exclude=set(self.LIVE_KEYS))
                != other.model_dump(exclude=set(self.LIVE_KEYS)))

    @property
    def chunk_frames(self) -> int:
        return SAMPLE_RATE * self.chunk_ms // 1000


class SttSettings(_Section):
    url: str = "wss://api.router.audio/v1/listen"
    provider: str = Field(default="deepgram", min_length=1)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    replay_speed: float = Field(default=1.25, ge=1.0, le=20.0)
    # Audio per binary frame while streaming live (the protocol allows 100 to 250).
    frame_ms: int = Field(default=250, ge=100, le=250)
    close_message: str = '{"type":"CloseStream"}'
    close_timeout_s: float = Field(default=5.0, gt=0, le=120)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)
    ping_interval_s: float = Field(default=10.0, gt=0, le=300)
    # wss:// certificates are always verified: against this CA file when set
    # (a private STT server), else the system's CAs.
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _websocket_url(cls, url: str) -> str:
        if not re.match(r"^wss?://[^/?#]+", url):
            raise ValueError("must be a ws:// or wss:// URL")
        # What the WebSocket client would refuse on every attempt (or crash
        # on: a port that is not a number) is refused here, once.
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError when it is not a port number)
        except ValueError as error:
            raise ValueError(f"must be a ws:// or wss:// URL ({error})") from None
        if not parts.hostname:
            raise ValueError("must be a ws:// or wss:// URL with a host name")
        if parts.fragment or url.endswith("#"):
            raise ValueError("must be a ws:// or wss:// URL without a #fragment")
        if parts.username is not None and parts.password is None:
            raise ValueError("must not have a user name without a password")
        return url

    @field_validator("close_message")
    @classmethod
    def _json_text(cls, message: str) -> str:
        try:
            json.loads(message)
        except ValueError as error:
            raise ValueError(f"must be a JSON text frame ({error})") from None
        return message


class BufferSettings(_Section):
    max_seconds: int = Field(default=120, ge=5, le=3600)
    spool_max_mb: int = Field(default=256, ge=0, le=65536)
    # The spool stops before the filesystem's free space falls under the
    # larger of these (like journald's SystemKeepFree): a full SD card breaks
    # more than edged.
    spool_keep_free_mb: int = Field(default=64, ge=0, le=65536)
    spool_keep_free_percent: float = Field(default=5.0, ge=0, le=90)


class MqttSettings(_Section):
    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    base_topic: str = Field(default="edged", pattern=rf"^{_TOPIC_LEVEL}(/{_TOPIC_LEVEL})*$")
    qos: Literal[0, 1, 2] = 1
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    drain_timeout_s: float = Field(default=5.0, ge=0, le=120)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # TLS: on when `tls` is true or any of the files is set. The broker's
    # certificate is always verified (against `ca_file`, else the system CAs).
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None  # a client certificate, per device in fleets
    key_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    session_expiry_s: int = Field(default=0, ge=0, le=2**32 - 1)  # MQTT 5 only
    discovery: bool = True  # Home Assistant MQTT discovery
    discovery_prefix: str = Field(default="homeassistant",
                                  pattern=rf"^{_TOPIC_LEVEL}(/{_TOPIC_LEVEL})*$")
    hermes: bool = False  # also publish finals as Rhasspy's hermes/asr/textCaptured
    partials: bool = False  # publish partial transcripts on <base>/<device>/partial

    @property
    def uses_tls(self) -> bool:
        return self.tls or any((self.ca_file, self.cert_file, self.key_file))

    @model_validator(mode="after")
    def _client_certificate_pairs(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MetricsSettings(_Section):
    """Prometheus metrics over HTTP: opt-in, and on loopback unless told otherwise."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9101, ge=1, le=65535)


class VadSettings(_Section):
    """Send only speech (opt-in): what a provider bills by the second."""

    enabled: bool = False
    aggressiveness: int = Field(default=2, ge=0, le=3)  # webrtcvad's 0 (lenient) to 3
    preroll_ms: int = Field(default=500, ge=0, le=5000)
    hangover_ms: int = Field(default=1000, ge=0, le=10000)
    # Silence is not sent; services close a session that gets nothing for
    # about 10 s, so a KeepAlive text frame goes out after this long.
    keepalive_s: float = Field(default=4.0, gt=0, le=60)
    keepalive_message: str = '{"type":"KeepAlive"}'


class ControlSettings(_Section):
    """Fleet control over MQTT (edged.control): requests, mute, remote config.

    Off by default: whoever may publish on the device's request topics can
    steer it, so a broker's ACL must say who that is first (README)."""

    enabled: bool = False
    # What a remote `config` set may change (dotted keys, or a section name
    # for all of its keys). Never the service URL and key, MQTT credentials
    # or the state directory: a remote change must not be able to take the
    # device off its fleet or read its secrets.
    allowed_keys: list[str] = Field(default_factory=lambda: [
        "audio.gain_db", "audio.silent_after_s", "stt.replay_speed", "buffer.max_seconds",
        "mqtt.partials", "mqtt.hermes", "log_level",
    ])


def _default_state_dir() -> Path:
    # systemd's StateDirectory= hands us the path; elsewhere use the FHS place.
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/edged").split(":")[0])


def _why_not_a_directory(path: Path) -> str | None:
    """Why `path` can never be a directory (it, or a parent, exists as
    something else), or None. A path that does not exist yet is fine (the
    daemon makes it); one that cannot be looked at (no permission) is left to
    the daemon, which reports storage it cannot use and tries it again."""
    for candidate in (path, *path.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        if stat.S_ISDIR(mode):
            return None
        kind = "a file" if stat.S_ISREG(mode) else "a special file"
        if candidate == path:
            return f"{path} is {kind}, not a directory"
        return f"{path} cannot be a directory: {candidate} is {kind}"
    return None


class Settings(BaseSettings):
    """The whole effective configuration of one edged instance."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    device: DeviceSettings = Field(default_factory=DeviceSettings)
    audio: AudioSettings = Field(default_factory=AudioSettings)
    stt: SttSettings = Field(default_factory=SttSettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    vad: VadSettings = Field(default_factory=VadSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    # What can never be a directory (a file, or a file where a parent should
    # be) is a configuration error, found before the daemon starts; storage
    # that fails at run time (full, read-only, unwritable) is a condition the
    # daemon reports and retries.
    state_dir: Path = Field(default_factory=_default_state_dir, validate_default=True)
    # A state directory that failed (full, read-only, unwritable, corrupt) is
    # tried again this often; meanwhile transcripts and audio wait in memory.
    state_retry_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("state_dir")
    @classmethod
    def _can_be_a_directory(cls, path: Path) -> Path:
        why = _why_not_a_directory(path)
        if why:
            raise PydanticCustomError("not_a_directory", why)
        return path

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first, as pydantic-settings expects.
        layers = _LAYERS.get()
        return tuple(_LayerSource(settings_cls, layer) for layer in reversed(layers))

    @property
    def api_key(self) -> str | None:
        return self.stt.api_key.get_secret_value() if self.stt.api_key else None

    @property
    def secrets(self) -> list[str]:
        """Every secret value, for the log's last line of defence: the keys
        named as secrets, and credentials found by shape in the STT URL and
        parameters, each also as it appears percent-encoded in a URL."""
        values = [self.api_key, self.mqtt_password, *stt_credentials(self.stt)]
        return sorted({form for value in values if value for form in _url_forms(value)})

    @property
    def mqtt_password(self) -> str | None:
        return self.mqtt.password.get_secret_value() if self.mqtt.password else None

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.device.id}"


SECRET_KEYS = frozenset({"stt.api_key", "mqtt.password"})
# Keys naming a file that holds a secret, and the secret key it fills in.
SECRET_FILES = {"stt.api_key_file": "stt.api_key", "mqtt.password_file": "mqtt.password"}


# ---------------------------------------------------------------------------
# Secrets by shape. Services take credentials in the query too (router.audio
# accepts `api_key`; others `token`, `access_token`, a signed URL's
# `signature`), so a name that looks like a credential is treated as one,
# wherever edged meets it: a query parameter of stt.url, a key of stt.params.
# The rule, in one place: compared case-insensitively with '-' as '_', the
# name is one of _CREDENTIAL_NAMES or ends with one of _CREDENTIAL_ENDINGS.
# A false positive only masks a harmless value; a false negative leaks a key.

_CREDENTIAL_NAMES = frozenset({"key", "auth", "authorization", "jwt", "sig", "signature"})
_CREDENTIAL_ENDINGS = ("_key", "apikey", "token", "secret", "password", "passwd",
                       "credential", "credentials")


def is_credential_name(name: str) -> bool:
    """Whether a query parameter or stt.params key of this name holds a credential."""
    normal = name.strip().lower().replace("-", "_")
    return normal in _CREDENTIAL_NAMES or normal.endswith(_CREDENTIAL_ENDINGS)


def _credential_text(value: object) -> str | None:
    # A boolean cannot be a credential, and masking "true" would garble the log.
    if isinstance(value, bool) or value is None:
        return None
    return str(value)


def url_credentials(url: str) -> list[str]:
    """Credentials in a URL: query values under credential names, and the
    password of a `user:password@` part (the user name is not secret)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL validation would let through; be safe anyway
        return [url.partition("?")[2]] if "?" in url else []
    found = [value for name, value in parse_qsl(parts.query, keep_blank_values=True)
             if value and is_credential_name(name)]
    # As written, too: a value percent-encoded in the file is sent that way.
    found += [raw for piece in parts.query.split("&")
              for name, sep, raw in [piece.partition("=")]
              if sep and raw and is_credential_name(unquote_plus(name))]
    return found + ([password, unquote_plus(password)] if password else [])


def stt_credentials(stt: SttSettings) -> list[str]:
    """Credentials in stt.url and stt.params, found by shape."""
    params = [_credential_text(value) for name, value in stt.params.items()
              if is_credential_name(name)]
    return url_credentials(stt.url) + [value for value in params if value]


def _url_forms(value: str) -> set[str]:
    # A key in a URL goes out percent-encoded (urlencode uses quote_plus), and
    # error messages quote the URL as sent.
    return {value, quote_plus(value), quote(value, safe="")}


def mask_url(url: str) -> str:
    """`url` with credential query values and any password replaced by the mask;
    the rest as written."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.partition("?")[0] + (f"?{MASK}" if "?" in url else "")
    pieces = []
    for piece in parts.query.split("&") if parts.query else []:
        name, sep, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if sep and is_credential_name(unquote_plus(name))
                      else piece)
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(pieces)))


def mask_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """stt.params with the values of credential-like names masked."""
    return {name: MASK if is_credential_name(name) and value is not None else value
            for name, value in params.items()}


# ---------------------------------------------------------------------------
# Layers: one per file, device section, environment and flags.


@dataclass(frozen=True)
class Layer:
    """Values from one source, flattened to dotted keys."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)

    def nested(self) -> dict[str, Any]:
        return nest(self.values)


_LAYERS: contextvars.ContextVar[Sequence[Layer]] = contextvars.ContextVar("edged_layers")


class _LayerSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], layer: Layer):
        super().__init__(settings_cls)
        self.layer = layer

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.layer.nested().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.layer.nested()


# Keys whose values are tables in their own right: flattening stops there, so
# that `stt.params.language` stays a key of the `stt.params` table.
_TABLE_KEYS = frozenset({"stt.params"})


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in _TABLE_KEYS:
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", source=source) from None
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror}", source=source) from None


@dataclass(frozen=True)
class FileLayers:
    base: list[Layer]
    devices: list[tuple[str, dict[str, dict[str, Any]]]]  # (file, {device id: table})


def _file_layers(paths: Sequence[Path], problems: list[ConfigError]) -> FileLayers:
    """The files' layers; a file that cannot be read or parsed is a problem
    and is left out (the other files are still checked)."""
    base: list[Layer] = []
    devices: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for path in paths:
        source = str(path)
        try:
            tree = _read_toml(path, source)
        except ConfigError as error:
            problems.append(error)
            continue
        device_tables = tree.pop("devices", {})
        if not isinstance(device_tables, dict) or not all(
            isinstance(table, dict) for table in device_tables.values()
        ):
            problems.append(ConfigError('must be tables like [devices."<id>"]', key="devices",
                                        source=source))
            device_tables = {}
        base.append(Layer(source, dict(_flatten(tree))))
        devices.append((source, device_tables))
    return FileLayers(base, devices)


def _env_layer(environ: Mapping[str, str], problems: list[ConfigError]) -> Layer:
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING)]
        if not all(parts):
            problems.append(ConfigError("malformed variable name", key=name, source=ENV_SOURCE))
            continue
        dotted = ".".join(parts)
        if raw.startswith("{"):  # a table such as EDGED_STT__PARAMS='{"language": "de"}'
            try:
                values[dotted] = json.loads(raw)
            except ValueError:
                problems.append(ConfigError("not valid JSON", key=name, source=ENV_SOURCE))
        else:
            values[dotted] = _env_value(dotted, raw)
    return Layer(ENV_SOURCE, dict(_flatten(nest(values))))


def _env_value(dotted: str, raw: str) -> Any:
    """A variable's value, read as the same value in a file would be.

    Variables are strings; a file's values are typed. A key that takes a
    string gets the string as given (a device id "007", a key "12345", a
    language "de" stay strings, with no quoting needed); otherwise the value
    is read as a TOML value, so EDGED_MQTT__QOS=1 is the integer 1 as
    `qos = 1` is (pydantic does not coerce "1" into Literal[0, 1, 2]). When
    it fits neither way, the error shows the reading of the type the key
    wants: `(got 3)` for a QoS, `(got '-1')` for a device id.
    """
    if not _layer_errors({dotted: raw}):
        return raw
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    if list(parsed) != ["value"]:
        return raw  # more than one value ("1\nx = 2")
    errors = _layer_errors({dotted: parsed["value"]})
    if any(error["type"].endswith("_type") for error in errors):
        return raw  # a key of another type, such as a string with a pattern
    return parsed["value"]


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys made a tree again, as a config file nests them."""
    tree: dict[str, Any] = {}
    for dotted, value in values.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def config_directory(environ: Mapping[str, str]) -> Path:
    """systemd's ConfigurationDirectory= hands us the path; elsewhere /etc/edged."""
    configured = environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
    return Path(configured) if configured else SYSTEM_CONFIG_DIR


def default_config_paths(directory: Path) -> list[Path]:
    """edged.toml, then conf.d/*.toml in name order; those absent are skipped."""
    main = directory / "edged.toml"
    paths = [main] if main.exists() else []
    if (directory / "conf.d").is_dir():
        paths += sorted((directory / "conf.d").glob("*.toml"))
    return paths


# ---------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Unreadable:
    """A secret this process may not read, though the service may: a key file
    readable by root or the edged user only, or the credentials that
    edged.service loads (root only). `edged check-config` run by another user
    names it and checks the rest."""

    secret: str  # the secret key it would fill in: stt.api_key, mqtt.password
    key: str  # the key that names it: stt.api_key_file, or the secret itself
    source: str
    path: Path
    reason: str
    who: str  # who can read it: "root or as the edged user", "root"

    @property
    def message(self) -> str:
        what = "it" if str(self.path) in self.source else str(self.path)
        return f"cannot read {what}: {self.reason} (run as {self.who})"

    def __str__(self) -> str:
        return f"{self.key} (from {self.source}): {self.message}"


@dataclass(frozen=True)
class SecretFile:
    """A key file that supplied a secret (stt.api_key_file, mqtt.password_file)."""

    key: str
    source: str
    path: Path


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    layers: list[Layer]  # lowest priority first
    # Secrets this process could not read (only with load_config(unreadable_ok=True),
    # and the installed credentials read outside systemd by another user).
    unreadable: list[Unreadable] = field(default_factory=list)
    secret_files: list[SecretFile] = field(default_factory=list)
    remote: RemoteLayer | None = None  # the layer `config` set writes (edged.control)

    def source_of(self, dotted: str) -> str:
        return _source_of(self.layers, dotted)


def _source_of(layers: Sequence[Layer], dotted: str) -> str:
    for layer in reversed(layers):
        if any(key == dotted or key.startswith(f"{dotted}.") for key in layer.values):
            return _describe(layer, dotted)
        if any(dotted.startswith(f"{key}.") for key in layer.values):  # inside a table value
            return _describe(layer, dotted)
    return DEFAULT_SOURCE


def _describe(layer: Layer, dotted: str) -> str:
    if layer.source == ENV_SOURCE:
        return f"environment variable {env_variable(dotted)}"
    return layer.source


def env_variable(dotted: str) -> str:
    """The variable that sets a dotted key: stt.api_key -> EDGED_STT__API_KEY."""
    return ENV_PREFIX + dotted.upper().replace(".", ENV_NESTING)


def load_config(
    config_paths: Sequence[Path] | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    unreadable_ok: bool = False,
    remote: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Build the effective settings, or raise ConfigError naming every
    problem, each with its key and source (`ConfigError.problems`).

    `config_paths` None means the default files, each skipped when absent; a
    path given explicitly must exist. With `unreadable_ok`, a key file this
    process has no permission to read is not an error but listed in
    `LoadedConfig.unreadable` (its secret is then unknown): for
    `check-config` run by a user other than the service's, and for commands
    that need no secret. `remote` stands in for the remote layer's file (a
    `config` set tries its candidate layer before writing it).
    """
    environ = os.environ if environ is None else environ
    if config_paths is None:
        paths = default_config_paths(config_directory(environ))
    else:
        paths = list(config_paths)
    problems: list[ConfigError] = []
    files = _file_layers(paths, problems)
    env = _env_layer(environ, problems)
    flag_layer = Layer("command line", {k: v for k, v in (flags or {}).items() if v is not None})
    for layer in [*files.base, env, flag_layer]:
        problems += _layer_problems(layer)

    device_id = _pick_device_id([*files.base, env, flag_layer])
    device_layers = _device_layers(files, device_id, problems)
    remote_layer = None if problems else _remote_layer(
        [*files.base, *device_layers, env, flag_layer], remote)
    remote_values = [remote_layer.layer] if remote_layer and remote_layer.layer.values else []
    unreadable: list[Unreadable] = []
    credentials = _credential_layers(environ, [env, flag_layer], problems, unreadable)
    layers = [*files.base, *device_layers, *remote_values, *credentials, env, flag_layer]
    secret_files: list[SecretFile] = []
    for file_key, secret_key in SECRET_FILES.items():
        layers = _resolve_secret_file(layers, file_key, secret_key, problems,
                                      unreadable if unreadable_ok else None, secret_files)
    if not problems:
        token = _LAYERS.set(layers)
        try:
            settings = Settings()
        except ValidationError as error:
            problems = _problems(error.errors(), layers)
        finally:
            _LAYERS.reset(token)
    if problems:
        failure = ConfigError.of(problems)
        failure.warnings = [str(note) for note in unreadable]
        raise failure
    return LoadedConfig(settings, layers, unreadable, secret_files, remote_layer)


def _pick_device_id(layers: Sequence[Layer]) -> str | None:
    for layer in reversed(layers):
        if "device.id" in layer.values:
            return str(layer.values["device.id"])
    return None


def _device_layers(files: FileLayers, device_id: str | None,
                   problems: list[ConfigError]) -> list[Layer]:
    device_id = device_id or socket.gethostname()
    layers = []
    for source, tables in files.devices:
        for table_id, table in tables.items():
            values = dict(_flatten(table))
            misplaced = [key for key in values
                         if key.startswith("device.") or key.startswith("devices")]
            problems += [ConfigError("cannot be set inside a device section",
                                     key=f'devices."{table_id}".{key}', source=source)
                         for key in misplaced]
            for key in misplaced:
                del values[key]
            layer = Layer(f'{source} [devices."{table_id}"]', values)
            # Every device's section, not only ours: the file serves them all.
            problems += _layer_problems(layer)
            if table_id == device_id:
                layers.append(layer)
    return layers


def _layer_problems(layer: Layer) -> list[ConfigError]:
    """One source on its own: each key it sets must exist and each value must
    fit its field, whatever a higher source does with that key. Rules across
    fields (cert_file with key_file) are left to the merged configuration:
    one layer may hold half of a pair."""
    errors = _layer_errors(layer.values)
    return _problems(errors, [layer]) if errors else []


def _layer_errors(values: Mapping[str, Any]) -> list[ErrorDetails]:
    """The errors of a partial document: those at keys it sets, or unknown keys.

    Validated through the real models (every field has a default, so keys a
    layer does not set cannot fail); what fails at a section as a whole (a
    cross-field rule) is not this layer's to answer for, unless the layer set
    that section itself (`mqtt = 5`)."""
    if not values:
        return []
    token = _LAYERS.set([Layer("", dict(values))])
    try:
        Settings()
    except ValidationError as error:
        return [detail for detail in error.errors() if detail["type"] == "extra_forbidden"
                or any(_dotted(detail) == key or _dotted(detail).startswith(f"{key}.")
                       for key in values)]
    finally:
        _LAYERS.reset(token)
    return []


def _dotted(detail: ErrorDetails) -> str:
    loc = [str(part) for part in detail["loc"]]
    if loc[:2] == ["stt", "params"]:
        # A parameter's value fits none of str, int, float, bool: pydantic
        # names each; the user needs the parameter.
        loc = loc[:3]
    return ".".join(loc)


# ---------------------------------------------------------------------------
# Secrets from files and from systemd credentials.
#
# The rule, in one place (README "Secrets" says the same): the API key
# (stt.api_key) and the MQTT password (mqtt.password) come, highest first,
# from a flag or the environment (the secret itself, or its *_file key);
# else the systemd credential stt_api_key / mqtt_password; else the config
# files (the device section, then the files), again the secret or its file.
# edged.service loads the credentials with LoadCredential= from
# /etc/edged/credentials/<name> (root only, 0600, written by scripts/install);
# systemd hands them over in $CREDENTIALS_DIRECTORY. Outside systemd (edged
# check-config in a shell, edged run by hand) edged reads that same source
# directory, <configuration directory>/credentials, so that both see the key
# the service uses. A blank credential is no credential: the unit gives each
# one a blank default (SetCredential=) so that a missing file does not stop it.

CREDENTIALS = {"stt.api_key": "stt_api_key", "mqtt.password": "mqtt_password"}
CREDENTIALS_SUBDIRECTORY = "credentials"
SERVICE_USER = "edged"


def credentials_directory(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """(directory, whether systemd made it): $CREDENTIALS_DIRECTORY under
    systemd, else the directory edged.service loads its credentials from."""
    given = environ.get("CREDENTIALS_DIRECTORY", "")
    if given:
        return Path(given), True
    return config_directory(environ) / CREDENTIALS_SUBDIRECTORY, False


def _credential_layers(environ: Mapping[str, str], higher: Sequence[Layer],
                       problems: list[ConfigError],
                       unreadable: list[Unreadable]) -> list[Layer]:
    directory, from_systemd = credentials_directory(environ)
    layers = []
    for secret_key, name in CREDENTIALS.items():
        file_key = next(key for key, secret in SECRET_FILES.items() if secret == secret_key)
        if any(secret_key in layer.values or file_key in layer.values for layer in higher):
            continue  # the environment or a flag names it: not read at all
        path = directory / name
        source = (f"systemd credential {name}" if from_systemd
                  else f"systemd credential {name} at {path}")
        try:
            mode = path.stat().st_mode
            secret = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as error:
            # Outside systemd, as a user other than root: the service gets it.
            unreadable.append(Unreadable(secret_key, secret_key, source, path,
                                         error.strerror or "Permission denied", "root"))
            continue
        except OSError as error:
            problems.append(ConfigError(f"cannot read {path}: {error.strerror}",
                                        key=secret_key, source=source))
            continue
        except UnicodeDecodeError:
            problems.append(ConfigError(f"{path} is not UTF-8 text", key=secret_key,
                                        source=source))
            continue
        if not secret:
            continue  # the unit's blank default: no file was installed
        if not from_systemd and mode & stat.S_IROTH:
            problems.append(ConfigError(
                f"{path} is readable by every user; chmod 0600 it (it holds a secret)",
                key=secret_key, source=source))
            continue
        layers.append(Layer(source, {secret_key: secret}))
    return layers


def _resolve_secret_file(layers: list[Layer], file_key: str, secret_key: str,
                         problems: list[ConfigError], unreadable: list[Unreadable] | None,
                         used: list[SecretFile]) -> list[Layer]:
    """Replace `file_key` (a path) by the secret it holds, in the layer that
    named it. A file this process may not read goes to `unreadable` when that
    is given, else it is a problem like any other."""
    for index in range(len(layers) - 1, -1, -1):
        if secret_key in layers[index].values:
            return layers  # a secret given directly outranks any file below it
        if file_key in layers[index].values:
            break
    else:
        return layers
    layer = layers[index]
    if not isinstance(layer.values[file_key], str):
        return layers  # not a path: the layer's validation said so
    path = Path(layer.values[file_key])
    message = None
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8").strip()
    except PermissionError as error:
        note = Unreadable(secret_key, file_key, layer.source, path,
                          error.strerror or "Permission denied",
                          f"root or as the {SERVICE_USER} user")
        if unreadable is not None:
            unreadable.append(note)
            return layers
        message = note.message
    except OSError as error:
        message = f"cannot read {path}: {error.strerror}"
    except UnicodeDecodeError:
        message = f"{path} is not UTF-8 text"
    else:
        if mode & stat.S_IROTH:
            message = f"{path} is readable by every user; chmod o-r it (it holds a secret)"
        elif not secret:
            message = f"{path} is empty"
    if message:
        problems.append(ConfigError(message, key=file_key, source=layer.source))
        return layers
    used.append(SecretFile(file_key, layer.source, path))
    layers = list(layers)
    layers[index] = Layer(layer.source, {**layer.values, secret_key: secret})
    return layers


def _problems(errors: Sequence[ErrorDetails], layers: Sequence[Layer]) -> list[ConfigError]:
    """One ConfigError per key that failed, in pydantic's order."""
    problems: dict[str, ConfigError] = {}
    for error in errors:
        dotted = _dotted(error)
        if dotted in problems:
            continue  # alternatives of one parameter's union count as one problem
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" if "." in dotted else "unknown section or key"
        elif "input" in error and error["type"] != "not_a_directory":
            shown = _printable_input(dotted, error["input"])
            if shown is not None:
                message = f"{message} (got {shown})"
        problems[dotted] = ConfigError(message, key=dotted, source=_source_of(layers, dotted))
    return list(problems.values())


def _printable_input(dotted: str, value: Any) -> str | None:
    """A rejected value as the error may show it: never a secret."""
    if dotted in SECRET_KEYS:
        return None
    if dotted.startswith("stt.params.") and any(
        is_credential_name(name) for name in dotted.split(".")[2:]
    ):
        return None
    if dotted == "stt.url" and isinstance(value, str):
        return repr(mask_url(value))
    if dotted == "stt.params":
        return repr(mask_params(value)) if isinstance(value, Mapping) else None
    if isinstance(value, Mapping) or dotted == "stt":
        # A whole section (a rule across its keys failed): it may hold a key
        # or a password, and the message names what is wrong anyway.
        return None
    return repr(value)


# ---------------------------------------------------------------------------
# Presentation: the effective configuration, secrets masked.


class _Unknown:
    """The value of a secret this process could not read."""

    def __repr__(self) -> str:
        return "?"


UNKNOWN: Any = _Unknown()


def effective_items(loaded: LoadedConfig) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, printable value, source) for every setting; a secret this
    process could not read is `UNKNOWN`."""
    data = loaded.settings.model_dump(mode="json")
    unknown: dict[str, Unreadable] = {}
    for note in loaded.unreadable:
        unknown.setdefault(note.secret, note)  # the first is the highest source
    for dotted, value in _flatten(data):
        if dotted in SECRET_KEYS:
            value = MASK if value is not None else None
        elif dotted == "stt.url":
            value = mask_url(value)
        elif dotted == "stt.params":
            value = mask_params(value)
        source = loaded.source_of(dotted)
        if dotted in unknown:
            note = unknown[dotted]
            where = note.source if note.key == dotted else f"{note.path} via {note.source}"
            yield dotted, UNKNOWN, f"{where}: this user cannot read it"
            continue
        file_key = next((f for f, secret in SECRET_FILES.items() if secret == dotted), None)
        layer = _layer_of(loaded.layers, dotted)
        if file_key and layer is not None and file_key in layer.values:
            source = f"{layer.values[file_key]} via {_describe(layer, file_key)}"
        secret_key = SECRET_FILES.get(dotted)
        if secret_key and value is not None and secret_key not in unknown:
            # A key file below a higher source of its secret is not read.
            secret_layer = _layer_of(loaded.layers, secret_key)
            if secret_layer is not None and dotted not in secret_layer.values:
                source += f" (not used: {secret_key} comes from {loaded.source_of(secret_key)})"
        yield dotted, value, source


def _layer_of(layers: Sequence[Layer], dotted: str) -> Layer | None:
    return next((layer for layer in reversed(layers) if dotted in layer.values), None)


# ---------------------------------------------------------------------------
# Warnings: what is valid but will not work as meant.


def is_local_host(host: str) -> bool:
    """localhost (and *.localhost), 127.0.0.0/8, ::1."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def missing_key_warning(loaded: LoadedConfig) -> str | None:
    """A service on another machine and no API key anywhere (stt.api_key,
    its file, the credential, or by shape in stt.url and stt.params): every
    session would be refused. A local server (edged stt-server) may need none."""
    settings = loaded.settings
    if settings.api_key or stt_credentials(settings.stt):
        return None
    if any(note.secret == "stt.api_key" for note in loaded.unreadable):  # noqa: S105
        return None  # there may be one; check-config names what it could not read
    host = urlsplit(settings.stt.url).hostname or ""
    if is_local_host(host):
        return None
    return (f"stt.url (from {loaded.source_of('stt.url')}) is on {host}, and no API key is "
            "set: install it with `sudo scripts/install --api-key-stdin` (the systemd "
            "credential stt_api_key), or set stt.api_key_file or EDGED_STT__API_KEY")


_INSTALL_OPTION = {"stt.api_key_file": "--api-key-file",
                   "mqtt.password_file": "--mqtt-password-file"}


def service_user_warnings(loaded: LoadedConfig, user: str = SERVICE_USER) -> list[str]:
    """Key files the service's user (edged.service's User=) could not read,
    though this process could: the service would exit 78 on them. Nothing
    when there is no such user (edged not installed as a service)."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return []
    if os.geteuid() == account.pw_uid:
        return []
    groups = set(os.getgrouplist(user, account.pw_gid))
    warnings = []
    for used in loaded.secret_files:
        try:
            info = used.path.stat()
        except OSError:
            continue
        if info.st_uid == account.pw_uid:
            readable = bool(info.st_mode & stat.S_IRUSR)
        elif info.st_gid in groups:
            readable = bool(info.st_mode & stat.S_IRGRP)
        else:
            readable = bool(info.st_mode & stat.S_IROTH)
        if not readable:
            warnings.append(
                f"{used.key} (from {used.source}): the {user} user, which edged.service runs "
                f"as, cannot read {used.path}: chgrp {user} and chmod 0640 it, or install it "
                f"as a systemd credential (sudo scripts/install {_INSTALL_OPTION[used.key]} "
                f"{used.path})")
    return warnings


# ---------------------------------------------------------------------------
# The remote layer: what a `config` set over MQTT wrote (edged.control), a
# file in the state directory. Above the files (a fleet's shared files set
# the defaults; one device is then tuned remotely), below the environment and
# the flags (what the unit or the command line says still wins).

# Never settable remotely, whatever control.allowed_keys says: control itself
# (a remote change must not widen what remote changes may do), the state
# directory (the layer lives in it), the secrets (they would be written in
# clear where the outbox lives, and a remote key swap could send the audio to
# someone else's account), where the secrets and the audio go (a remote
# `stt.url` or `mqtt.host` would hand the API key, the broker password and
# every word to whoever asked), and the device's identity at the broker (its
# id and client id name it in a broker's ACL: a device that could rename
# itself could take another's rights). Allowing a whole section (`stt`,
# `mqtt`) allows its other keys only.
IDENTITY_AND_DESTINATION = (
    "device.id", "stt.url", "stt.ca_file", "mqtt.host", "mqtt.port", "mqtt.tls",
    "mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file", "mqtt.username", "mqtt.client_id",
    "mqtt.base_topic", "metrics.host",
)
NEVER_REMOTE = ("control", "state_dir", *sorted(SECRET_KEYS), *sorted(SECRET_FILES),
                *IDENTITY_AND_DESTINATION)


@dataclass(frozen=True)
class RemoteLayer:
    path: Path
    stored: dict[str, Any]  # what the file holds, by dotted key ({} when damaged or unreadable)
    applied: dict[str, Any]  # what of it is in force (allowed now)
    ignored: list[str] = field(default_factory=list)  # held, but no longer allowed
    damaged: str | None = None  # why the file is no layer at all (moved aside by the daemon)
    unreadable: str | None = None  # this process may not read it

    @property
    def source(self) -> str:
        return f"remote ({self.path})"

    @property
    def layer(self) -> Layer:
        return Layer(self.source, self.applied)

    @property
    def warnings(self) -> list[str]:
        if self.damaged:
            return [f"{self.path} is not a configuration layer ({self.damaged}): left out "
                    "(edged run moves it aside)"]
        if self.unreadable:
            return [f"cannot read {self.path}: {self.unreadable} (its remote settings are "
                    "not shown; run as root or as the edged user)"]
        return [f"{key} (from {self.source}): ignored, not in control.allowed_keys"
                for key in self.ignored]


def remote_refusal(dotted: str, allowed: Sequence[str]) -> str | None:
    """Why a remote `config` set may not change `dotted`, or None."""
    if any(dotted == key or dotted.startswith(f"{key}.") or key.startswith(f"{dotted}.")
           for key in NEVER_REMOTE):
        return "never settable remotely"
    if not any(dotted == key or dotted.startswith(f"{key}.") for key in allowed):
        return "not allowed (not in control.allowed_keys)"
    return None


def _highest(layers: Sequence[Layer], dotted: str) -> Any:
    return next((layer.values[dotted] for layer in reversed(layers) if dotted in layer.values),
                None)


def _remote_layer(layers: Sequence[Layer], candidate: Mapping[str, Any] | None) -> RemoteLayer:
    """The remote layer that `layers` (files, device sections, environment,
    flags) point at: its file in their state directory, filtered by their
    control.allowed_keys; or `candidate` instead of the file."""
    from edged.control import layer as remote_file

    state_dir = _highest(layers, "state_dir")
    path = remote_file.path_in(Path(state_dir) if isinstance(state_dir, str)
                               else _default_state_dir())
    allowed = _highest(layers, "control.allowed_keys")
    if not (isinstance(allowed, list) and all(isinstance(key, str) for key in allowed)):
        allowed = ControlSettings().allowed_keys
    if candidate is None:
        try:
            document = remote_file.read(path)
        except remote_file.Damaged as error:
            return RemoteLayer(path, {}, {}, damaged=str(error))
        except OSError as error:
            return RemoteLayer(path, {}, {}, unreadable=error.strerror or type(error).__name__)
    else:
        document = dict(candidate)
    source = f"remote ({path})"
    stored = dict(_flatten(document))
    never = [key for key in stored if remote_refusal(key, [key])]
    if never:
        return RemoteLayer(path, {}, {}, damaged="holds keys never settable remotely: "
                           + ", ".join(sorted(never)))
    problems = _layer_problems(Layer(source, stored))
    if problems:
        return RemoteLayer(path, {}, {}, damaged="; ".join(
            f"{problem.key}: {problem.message}" for problem in problems))
    ignored = [key for key in stored if remote_refusal(key, allowed)]
    applied = {key: value for key, value in stored.items() if key not in ignored}
    return RemoteLayer(path, stored, applied, ignored)


def validate_layer(values: Mapping[str, Any], source: str) -> list[ConfigError]:
    """The problems of a partial document of dotted keys, as a config file's
    would be reported (each key on its own, whatever other sources say)."""
    return _layer_problems(Layer(source, dict(values)))


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A document of sections as dotted keys (tables such as stt.params stay whole)."""
    return dict(_flatten(tree))


@dataclass(frozen=True)
class ConfigReport:
    """What `edged check-config` prints (and the `config` request answers)."""

    items: list[tuple[str, Any, str]]  # (dotted key, value with secrets masked, source)
    warnings: list[str]


def config_report(loaded: LoadedConfig) -> ConfigReport:
    warnings = [str(note) for note in loaded.unreadable]
    warnings += service_user_warnings(loaded)
    missing_key = missing_key_warning(loaded)
    warnings += [missing_key] if missing_key else []
    warnings += loaded.remote.warnings if loaded.remote else []
    return ConfigReport(list(effective_items(loaded)), warnings)
