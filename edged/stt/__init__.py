"""Speech-to-text: the router.audio protocol (no I/O) and the session that speaks it."""
