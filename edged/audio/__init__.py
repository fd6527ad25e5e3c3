"""Audio: capture from ALSA and the stream-time indexed buffer."""
