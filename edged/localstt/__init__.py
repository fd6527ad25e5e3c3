"""Local router.audio-compatible speech-to-text server, backed by PocketSphinx.

Used by ``edged stt-server``, the demo, and as a real-recognition peer in tests.
"""

from edged.localstt.server import serve

__all__ = ["serve"]
