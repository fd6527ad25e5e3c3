"""Which capture device `audio.device = "auto"` means, read from /proc/asound.

On a Raspberry Pi, card 0 is usually HDMI or the headphone jack, neither of
which can capture, so ALSA's `default` may never open the USB microphone.
`auto` picks the first card that has a capture PCM, USB cards first (a USB
microphone is what people plug in), and opens it through `plughw:` so ALSA
converts to 16 kHz mono when the hardware cannot. It is resolved at every
open, so a microphone plugged in later is found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
ASOUND = Path("/proc/asound")
_CARD_LINE = re.compile(r"^\s*(\d+)\s+\[([^\]]*)\]:\s*(.*)$")


@dataclass(frozen=True)
class CaptureCard:
    index: int
    id: str  # ALSA's card id, stable across reboots (unlike the index)
    name: str
    usb: bool
    capture_devices: tuple[int, ...]

    @property
    def pcm(self) -> str:
        return f"plughw:CARD={self.id},DEV={self.capture_devices[0]}"


def cards(root: Path = ASOUND) -> list[CaptureCard]:
    """Every card with at least one capture PCM, in index order."""
    names: dict[int, str] = {}
    try:
        for line in (root / "cards").read_text(errors="replace").splitlines():
            match = _CARD_LINE.match(line)
            if match:
                names[int(match.group(1))] = match.group(3).strip()
    except OSError:
        return []
    found = []
    for index in sorted(names):
        directory = root / f"card{index}"
        try:
            card_id = (directory / "id").read_text(errors="replace").strip()
            capture = sorted(int(p.name[3:-1]) for p in directory.glob("pcm*c")
                             if p.name[3:-1].isdigit())
        except OSError:
            continue
        if capture and card_id:
            usb = (directory / "usbid").exists() or "USB" in names[index]
            found.append(CaptureCard(index, card_id, names[index], usb, tuple(capture)))
    return found


def pick(available: list[CaptureCard]) -> CaptureCard | None:
    """USB first, then the lowest index."""
    return min(available, key=lambda card: (not card.usb, card.index), default=None)


def resolve(device: str, root: Path = ASOUND) -> str:
    """The PCM to open for `audio.device`: itself, or for `auto` the card
    `pick` chooses (`default` when no card can capture)."""
    if device != AUTO:
        return device
    card = pick(cards(root))
    return card.pcm if card is not None else "default"
