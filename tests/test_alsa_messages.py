"""alsa-lib's own messages go through edged's log, never raw on stderr."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support.broker import Mosquitto
from tests.support.daemon import Daemon, write_config


def test_alsa_lib_messages_go_through_the_log_not_raw_on_stderr(
    home: Path, broker: Mosquitto
) -> None:
    """alsa-lib prints `ALSA lib ...` lines straight to stderr on every failed
    open; edged routes them to its debug log, formatted, repeated at most a
    few times."""
    (home / ".asoundrc").write_text(
        'pcm.brokenmic { type plug; slave.pcm "hw:CARD=NoSuchCard" }\n')
    config = write_config(home / "edged.toml", {
        "device": {"id": "testpi"},
        "audio": {"device": "brokenmic"},
        "stt": {"url": "ws://127.0.0.1:9/v1/listen"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
    }, top={"state_dir": str(home / "state"), "log_level": "debug"})
    daemon = Daemon(home, config).start()
    try:
        daemon.wait_for_log("capture.unavailable attempt=2", timeout=30)
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    assert "ALSA lib" not in daemon.log, "nothing raw from alsa-lib"
    assert "alsa.message" in daemon.log
    assert "Cannot get card index for NoSuchCard" in daemon.log, "formatted, with its argument"
