"""Synthetic speech for tests: espeak-ng text-to-speech, resampled with sox.

Both tools are called at test time so no audio fixtures live in the repository.
The result is what the router.audio protocol carries: 16 kHz s16le mono PCM.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2

# Of the espeak-ng voices and rates tried, this one PocketSphinx's US English
# model recognises best and most consistently (synthetic speech is far from
# what the model was trained on, so most voices come out half garbled).
VOICE = "en-us+f2"
WORDS_PER_MINUTE = 150
# sox output format: what the router.audio protocol carries.
_RAW_PCM_ARGS = ["-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", "-t", "raw"]


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def silence(seconds: float) -> bytes:
    """Digital silence of the given length, as 16 kHz s16le mono PCM."""
    return bytes(round(seconds * SAMPLE_RATE) * BYTES_PER_SAMPLE)


def speak(text: str, *, lead_silence_s: float = 0.5, tail_silence_s: float = 1.0) -> bytes:
    """Synthesise ``text`` as 16 kHz s16le mono PCM with silence around it.

    The trailing silence matters for streaming recognisers: it is what lets
    an endpointer notice that the utterance is over.
    """
    wav = subprocess.run(
        [_require("espeak-ng"), "--stdout", "-v", VOICE, "-s", str(WORDS_PER_MINUTE), text],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    pcm = subprocess.run(
        # sox dithers when it requantises the resampled audio; -R seeds the
        # dither with a constant so that the same text gives the same bytes
        # (without it, recognition results vary from run to run).
        [_require("sox"), "-R", "-t", "wav", "-", *_RAW_PCM_ARGS, "-"],
        input=wav,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return silence(lead_silence_s) + pcm + silence(tail_silence_s)
