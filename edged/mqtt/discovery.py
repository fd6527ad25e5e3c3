"""Home Assistant MQTT discovery: one device per edged instance, without I/O.

Each entity's config is published retained at
`<prefix>/<component>/<node>/<object>/config` and points at edged's own
topics; availability follows edged's availability topic, so the entities go
unavailable with the Last Will. An entity that goes away is removed with an
empty retained payload on its config topic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edged import __version__
from edged.config import AudioSettings, Settings, remote_refusal
from edged.mqtt.payloads import Topics

HA_STATE_MAX = 255  # Home Assistant refuses longer states


@dataclass(frozen=True)
class Entity:
    component: str  # sensor, binary_sensor, event
    object_id: str
    config: dict[str, Any]


def gain_settable(settings: Settings) -> bool:
    """Whether Home Assistant gets a gain number (and fleet control listens
    to it): control is on and may set `audio.gain_db`."""
    return settings.control.enabled and remote_refusal(
        "audio.gain_db", settings.control.allowed_keys) is None


def _gain_bounds() -> tuple[float, float]:
    """`audio.gain_db`'s range, as the configuration validates it."""
    bounds = {type(rule).__name__: rule for rule in AudioSettings.model_fields["gain_db"].metadata}
    return float(bounds["Ge"].ge), float(bounds["Le"].le)


def node_id(device_id: str) -> str:
    return "edged_" + re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def entities(settings: Settings, topics: Topics) -> list[Entity]:
    state = topics.state
    text = f"{{{{ value_json.text[:{HA_STATE_MAX}] }}}}"
    return [
        Entity("sensor", "transcript", {
            "name": "Last transcript",
            "icon": "mdi:microphone-message",
            "state_topic": topics.transcript,
            "value_template": text,
            # The whole payload (words, times, seq) as attributes.
            "json_attributes_topic": topics.transcript,
        }),
        Entity("event", "speech", {
            "name": "Speech",
            "icon": "mdi:account-voice",
            "state_topic": topics.transcript,
            "event_types": ["transcript"],
            "value_template": (
                "{{ {'event_type': 'transcript', 'text': value_json.text, "
                "'stream_id': value_json.stream_id, 'seq': value_json.seq, "
                "'start': value_json.start, 'end': value_json.end} | to_json }}"
            ),
        }),
        _diagnostic("binary_sensor", "stt", "Speech-to-text connection", state, {
            "device_class": "connectivity",
            "value_template": "{{ 'ON' if value_json.stt_connected else 'OFF' }}",
        }),
        # A problem unless audio really arrives: absent, stalled, or dead
        # (exact digital silence, a stuck value), with the why as an attribute.
        _diagnostic("binary_sensor", "microphone", "Microphone", state, {
            "device_class": "problem",
            # Muted is closed on purpose (the privacy mute), no problem.
            "value_template": "{{ 'OFF' if value_json.microphone in ('ok', 'muted') "
                              "else 'ON' }}",
            "json_attributes_topic": state,
            "json_attributes_template": "{{ {'condition': value_json.microphone} | to_json }}",
        }),
        # The level of what the microphone hears (edged.audio.telemetry). dBFS
        # is no unit of sound pressure (sound_pressure takes dB SPL): no
        # device class. A null level (no audio) renders "None": unknown in HA.
        Entity("sensor", "sound_level", {
            "name": "Sound level", "icon": "mdi:waveform", "state_topic": topics.audio,
            "unit_of_measurement": "dBFS", "state_class": "measurement",
            "suggested_display_precision": 1,
            "value_template": "{{ value_json.rms_dbfs }}",
            "json_attributes_topic": topics.audio,
        }),
        _diagnostic("sensor", "peak_level", "Peak level", topics.audio, {
            "icon": "mdi:waveform", "unit_of_measurement": "dBFS", "state_class": "measurement",
            "suggested_display_precision": 1,
            "value_template": "{{ value_json.peak_dbfs }}",
        }),
        _diagnostic("sensor", "clipping", "Clipping", topics.audio, {
            "icon": "mdi:sine-wave", "unit_of_measurement": "%", "state_class": "measurement",
            "suggested_display_precision": 2,
            "value_template": "{{ None if value_json.clipping is none "
                              "else (value_json.clipping * 100) | round(4) }}",
        }),
        _diagnostic("sensor", "buffered", "Audio buffered", state, {
            "device_class": "duration", "unit_of_measurement": "s",
            "state_class": "measurement", "value_template": "{{ value_json.buffered_s }}",
        }),
        _diagnostic("sensor", "dropped", "Audio dropped", state, {
            "device_class": "duration", "unit_of_measurement": "s",
            "state_class": "total_increasing", "value_template": "{{ value_json.dropped_s }}",
        }),
        _diagnostic("sensor", "reconnects", "Reconnects", state, {
            "state_class": "total_increasing", "icon": "mdi:connection",
            "value_template": "{{ value_json.reconnects }}",
        }),
        _diagnostic("sensor", "outbox", "Transcripts queued", state, {
            "state_class": "measurement", "icon": "mdi:tray-full",
            "value_template": "{{ value_json.outbox_depth }}",
        }),
        # The state directory: a problem (full, read-only, unwritable,
        # corrupt) means transcripts and audio are held in memory only.
        _diagnostic("binary_sensor", "storage", "Storage", state, {
            "device_class": "problem",
            "value_template": "{{ 'OFF' if value_json.storage == 'ok' else 'ON' }}",
            "json_attributes_topic": state,
            "json_attributes_template": (
                "{{ {'condition': value_json.storage, 'error': value_json.storage_error}"
                " | to_json }}"
            ),
        }),
    ]


def mute_switch(topics: Topics) -> Entity:
    """The privacy mute: ON is muted (the microphone closed, nothing sent)."""
    return Entity("switch", "mute", {
        "name": "Privacy mute",
        "icon": "mdi:microphone-off",
        "command_topic": topics.mute_set,
        "state_topic": topics.mute,
        "payload_on": "ON",
        "payload_off": "OFF",
        "state_on": "ON",
        "state_off": "OFF",
        "retain": False,  # a retained command would replay at every connection (ignored)
        "optimistic": False,  # on only once edged says so on its state topic
    })


def gain_number(topics: Topics) -> Entity:
    """`audio.gain_db`, set through fleet control (a remote `config` set);
    its state is the gain the audio report says is applied."""
    low, high = _gain_bounds()
    return Entity("number", "gain", {
        "name": "Microphone gain", "icon": "mdi:knob", "entity_category": "config",
        "command_topic": topics.gain_set, "state_topic": topics.audio,
        "value_template": "{{ value_json.gain_db }}",
        "min": low, "max": high, "step": 1, "mode": "slider",
        "unit_of_measurement": "dB",
    })


def control_entities(settings: Settings, topics: Topics) -> list[Entity]:
    """Entities that steer the device: only while `control.enabled` (whoever
    may publish on their command topics can silence it), the gain only while
    control may set it."""
    if not settings.control.enabled:
        return []
    return [mute_switch(topics), *([gain_number(topics)] if gain_settable(settings) else [])]


def retired_entities(settings: Settings, topics: Topics) -> list[Entity]:
    """Entities announced only in some configurations, while they are off:
    announced with an empty retained config, which removes what an earlier
    run (or this one before a reload) left at the broker and in Home Assistant."""
    announced = {entity.object_id for entity in control_entities(settings, topics)}
    return [entity for entity in (mute_switch(topics), gain_number(topics))
            if entity.object_id not in announced]


def _diagnostic(component: str, object_id: str, name: str, state_topic: str,
                extra: dict[str, Any]) -> Entity:
    return Entity(component, object_id, {
        "name": name, "state_topic": state_topic, "entity_category": "diagnostic", **extra,
    })


def config_topic(prefix: str, device_id: str, entity: Entity) -> str:
    return f"{prefix}/{entity.component}/{node_id(device_id)}/{entity.object_id}/config"


def announcements(settings: Settings, topics: Topics) -> list[tuple[str, bytes]]:
    """(config topic, retained payload) for every entity."""
    node = node_id(settings.device.id)
    device: dict[str, Any] = {
        "identifiers": [node],
        "name": settings.device.name or f"edged {settings.device.id}",
        "manufacturer": "edged",
        "model": "edged audio daemon",
        "sw_version": __version__,
    }
    if settings.device.area:
        device["suggested_area"] = settings.device.area
    messages = []
    for entity in entities(settings, topics) + control_entities(settings, topics):
        config = {
            **entity.config,
            "unique_id": f"{node}_{entity.object_id}",
            "object_id": f"{node}_{entity.object_id}",
            "availability_topic": topics.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": device,
            "origin": {"name": "edged", "sw_version": __version__},
        }
        topic = config_topic(settings.mqtt.discovery_prefix, settings.device.id, entity)
        messages.append((topic, json.dumps(config, separators=(",", ":")).encode()))
    messages += [(config_topic(settings.mqtt.discovery_prefix, settings.device.id, entity), b"")
                 for entity in retired_entities(settings, topics)]
    return messages


def birth_topic(settings: Settings) -> str:
    """Home Assistant publishes `online` here when it (re)starts."""
    return f"{settings.mqtt.discovery_prefix}/status"
