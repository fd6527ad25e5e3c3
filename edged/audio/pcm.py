"""Sample arithmetic on 16-bit little-endian PCM, in C.

Every hand-off (250 ms, 4000 samples) is metered and, with a gain set,
scaled: in pure Python that costs 160 to 260 us a hand-off on a desktop core
(a third of the daemon's whole CPU budget, ten times more on a Pi Zero);
`audioop` does it in 5 to 10 us. `audioop` is in the standard library up to
Python 3.12 (deprecated since 3.11) and removed in 3.13, where the
`audioop-lts` package (a dependency there) installs the same module.

`audioop` works in the host's byte order; the stream is little-endian
whatever the host is, so a big-endian host swaps around each operation.
"""

from __future__ import annotations

import sys
import warnings

with warnings.catch_warnings():
    # Deprecated in the standard library of 3.11 and 3.12; the warning says
    # nothing a user of edged can act on (3.13 gets audioop-lts instead).
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

WIDTH = 2  # bytes a sample
MAX = 32767
MIN = -32768
# At or within 1 LSB of either rail: an ADC or a gain stage that ran out of range.
CLIP_HIGH = MAX - 1
CLIP_LOW = MIN + 1

_SWAP = sys.byteorder == "big"

# Counting the clipped samples of a chunk without a Python loop: audioop.mul
# floors after scaling, so scaled by 1/(CLIP_HIGH - 0.5) every sample at or
# above CLIP_HIGH becomes 1 and every other one 0, -1 or -2; scaled by
# 1/(-CLIP_LOW - 0.5), every sample at or below CLIP_LOW becomes -2 and every
# other one 1, 0 or -1. Of the bytes of the
# values -2, -1, 0 and 1, 0x01 occurs only in 1 and 0xfe only in -2 (in
# either byte order), so `bytes.count` counts the samples. Checked for all
# 65536 sample values by the tests.
_HIGH_FACTOR = 1 / (CLIP_HIGH - 0.5)
_LOW_FACTOR = 1 / (-CLIP_LOW - 0.5)


def whole(pcm: bytes) -> bytes:
    """`pcm` cut to whole samples (ALSA hands over whole frames; this is for safety)."""
    return pcm if not len(pcm) & 1 else pcm[:-1]


def native(pcm: bytes) -> bytes:
    """Little-endian whole samples in the host's order (and back: the swap is its own inverse)."""
    return audioop.byteswap(pcm, WIDTH) if _SWAP else pcm


def scale(pcm: bytes, factor: float) -> bytes:
    """Every sample times `factor`, saturating at the rails (never wrapping
    around), rounded towards minus infinity. Little-endian in and out; an odd
    last byte passes through unchanged."""
    body = whole(pcm)
    scaled = native(audioop.mul(native(body), WIDTH, factor))
    return scaled if len(body) == len(pcm) else scaled + pcm[-1:]


def minmax(samples: bytes) -> tuple[int, int]:
    """Smallest and largest sample of native-order whole samples (not empty)."""
    low, high = audioop.minmax(samples, WIDTH)
    return low, high


def sum_of_squares(samples: bytes) -> float:
    """Sum of the squared samples of native-order whole samples.

    audioop.rms truncates to a whole sample value, too coarse for a quiet
    room (a few LSB): measured on the samples widened to 32 bits (times
    65536), it keeps 16 more bits."""
    count = len(samples) // WIDTH
    if not count:
        return 0.0
    rms = audioop.rms(audioop.lin2lin(samples, WIDTH, 4), 4) / 65536
    return rms * rms * count


def clipped(samples: bytes) -> int:
    """How many native-order whole samples are at or within 1 LSB of a rail."""
    high = audioop.mul(samples, WIDTH, _HIGH_FACTOR).count(b"\x01")
    low = audioop.mul(samples, WIDTH, _LOW_FACTOR).count(b"\xfe")
    return high + low
