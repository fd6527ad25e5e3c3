"""Software gain (`audio.gain_db`), applied to captured audio before anything
else sees it: the buffer, the spool, the STT service, the levels, the VAD.

Samples that the gain would push past full scale stop at the rails
(saturation), as an analogue stage clips: wrapping around would turn a loud
peak into a full-scale click of the opposite sign. 0 dB costs nothing (the
bytes pass through untouched); any other gain costs about 10 us a 250 ms
hand-off on a desktop core (`edged.audio.pcm.scale`, in C).
"""

from __future__ import annotations

from edged.audio import pcm


class Gain:
    def __init__(self, db: float):
        self.db = db
        self.factor = 10.0 ** (db / 20.0)

    def apply(self, data: bytes) -> bytes:
        if not self.db:
            return data
        return pcm.scale(data, self.factor)
