"""Topics and payloads: the MQTT half of the contract, without I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edged.stt.protocol import Final, samples_to_seconds

ONLINE = b"online"
OFFLINE = b"offline"


@dataclass(frozen=True)
class Topics:
    base: str
    device: str

    @property
    def root(self) -> str:
        return f"{self.base}/{self.device}"

    @property
    def transcript(self) -> str:
        return f"{self.root}/transcript"

    @property
    def availability(self) -> str:
        return f"{self.root}/availability"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def partial(self) -> str:
        return f"{self.root}/partial"

    # -- fleet control (edged.control): commands in, answers and states out --

    @property
    def mute(self) -> str:
        return f"{self.root}/mute"  # retained ON / OFF

    @property
    def mute_set(self) -> str:
        return f"{self.root}/mute/set"

    @property
    def gain_set(self) -> str:
        """audio.gain_db from a Home Assistant number entity (a bare number)."""
        return f"{self.root}/gain/set"

    def request(self, verb: str) -> str:
        return f"{self.root}/request/{verb}"

    def response(self, verb: str) -> str:
        return f"{self.root}/response/{verb}"

    def fleet_request(self, verb: str) -> str:
        """The same verbs for every device on the base topic."""
        return f"{self.base}/_fleet/request/{verb}"

    @property
    def audio(self) -> str:
        """Retained audio telemetry: levels, clipping, the microphone (edged.audio.telemetry)."""
        return f"{self.root}/audio"


def _seconds(samples: int) -> float:
    return round(samples_to_seconds(samples), 3)


def transcript_payload(
    final: Final, *, stream_id: str, seq: int, device: str, provider: str, time: str | None
) -> bytes:
    # (stream_id, seq) names this transcript forever: a re-delivery carries
    # the same pair, a new outbox a new stream_id.
    body: dict[str, Any] = {
        "stream_id": stream_id,
        "seq": seq,
        "device": device,
        "provider": final.provider or provider,
        "text": final.text,
        "start": _seconds(final.start),
        "end": _seconds(final.end),
        "time": time,
        "words": [
            {
                "text": word.text,
                "start": _seconds(word.start),
                "end": _seconds(word.end),
                "speaker": word.speaker,
            }
            for word in final.words
        ],
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


HERMES_TEXT_CAPTURED = "hermes/asr/textCaptured"


def hermes_text_captured(final: Final, *, device: str) -> bytes:
    """Rhasspy's Hermes ASR message, so existing Rhasspy and Node-RED flows work."""
    body = {
        "text": final.text,
        "likelihood": 1.0,
        "seconds": round(samples_to_seconds(final.end - final.start), 3),
        "siteId": device,
        "sessionId": None,
        "wakewordId": None,
        "asrTokens": [[
            {
                "value": word.text,
                "confidence": 1.0,
                "rangeStart": 0,
                "rangeEnd": 0,
                "time": {"start": _seconds(word.start), "end": _seconds(word.end)},
            }
            for word in final.words
        ]],
        "lang": None,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def partial_payload(text: str, *, start: int, end: int, device: str) -> bytes:
    body = {"device": device, "text": text, "start": _seconds(start), "end": _seconds(end)}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
