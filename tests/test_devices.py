"""`audio.device = "auto"`: the first card that can capture, USB first, never
an output-only card; read from a /proc/asound tree laid out as a Pi's."""

from __future__ import annotations

from pathlib import Path

from edged.audio import devices


def card(root: Path, index: int, card_id: str, pcms: list[str], usb: bool = False) -> None:
    directory = root / f"card{index}"
    directory.mkdir(parents=True)
    (directory / "id").write_text(card_id + "\n")
    for pcm in pcms:
        (directory / pcm).mkdir()
    if usb:
        (directory / "usbid").write_text("0d8c:0014\n")


def cards_file(root: Path, lines: list[str]) -> None:
    (root / "cards").write_text("\n".join(lines) + "\n")


def test_a_pi_with_hdmi_headphones_and_a_usb_microphone_picks_the_usb_one(tmp_path: Path) -> None:
    card(tmp_path, 0, "vc4hdmi0", ["pcm0p"])
    card(tmp_path, 1, "Headphones", ["pcm0p"])
    card(tmp_path, 2, "Device", ["pcm0p", "pcm0c"], usb=True)
    cards_file(tmp_path, [
        " 0 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0",
        "                      vc4-hdmi-0",
        " 1 [Headphones     ]: bcm2835_headpho - bcm2835 Headphones",
        " 2 [Device         ]: USB-Audio - USB PnP Sound Device",
    ])
    assert devices.resolve("auto", tmp_path) == "plughw:CARD=Device,DEV=0"
    assert [c.index for c in devices.cards(tmp_path)] == [2], "output-only cards are never used"


def test_usb_comes_first_even_after_a_capture_hat(tmp_path: Path) -> None:
    card(tmp_path, 0, "seeed2micvoicec", ["pcm0p", "pcm0c"])
    card(tmp_path, 1, "Mic", ["pcm0c"], usb=True)
    cards_file(tmp_path, [" 0 [seeed2micvoicec]: simple-card - seeed-2mic-voicecard",
                          " 1 [Mic            ]: USB-Audio - USB Microphone"])
    assert devices.resolve("auto", tmp_path) == "plughw:CARD=Mic,DEV=0"
    (tmp_path / "card1" / "usbid").unlink()
    (tmp_path / "cards").write_text(" 0 [seeed2micvoicec]: simple-card - seeed-2mic-voicecard\n"
                                    " 1 [Mic            ]: snd-mic - Microphone\n")
    assert devices.resolve("auto", tmp_path) == "plughw:CARD=seeed2micvoicec,DEV=0"


def test_no_card_that_can_capture_falls_back_to_default(tmp_path: Path) -> None:
    card(tmp_path, 0, "vc4hdmi0", ["pcm0p"])
    cards_file(tmp_path, [" 0 [vc4hdmi0       ]: vc4-hdmi - vc4-hdmi-0"])
    assert devices.resolve("auto", tmp_path) == "default"
    assert devices.resolve("auto", tmp_path / "missing") == "default"


def test_a_named_device_is_used_as_it_is(tmp_path: Path) -> None:
    assert devices.resolve("plughw:1,0", tmp_path) == "plughw:1,0"
