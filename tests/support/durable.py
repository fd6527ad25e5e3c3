"""What a stopped daemon left in its state directory for the next start."""

from __future__ import annotations

import itertools
import re
import signal
from pathlib import Path

from edged.audio.spool import Spool
from edged.outbox import Outbox
from tests.support.daemon import Daemon

RATE = 16_000


def left_for_next_start(state: Path) -> tuple[int, list[tuple[int, int]]]:
    """(the durable transcription point, the spooled audio as (start, end)
    sample ranges), as the next start recovers them."""
    outbox = Outbox(state / "outbox.sqlite3")
    spool = Spool(state / "spool", 1 << 30)
    try:
        spool.recover(outbox.stream_id, outbox.transcribed)
        return outbox.transcribed, [(record.start, record.end) for record in spool.records]
    finally:
        spool.close()
        outbox.close()


def assert_untranscribed_audio_is_spooled(state: Path, untranscribed_s: float) -> None:
    """Everything from the transcription point on (`untranscribed_s` of it, as
    the daemon logged at its stop) is in the spool, in one unbroken run."""
    point, spooled = left_for_next_start(state)
    assert spooled, f"{untranscribed_s} s untranscribed, and nothing spooled"
    assert spooled[0][0] <= point, f"spooled from {spooled[0][0]}, transcribed to {point}"
    for (_, end), (start, _) in itertools.pairwise(spooled):
        assert start == end, f"a hole in the spool at {end / RATE:.2f} s"
    kept_s = (spooled[-1][1] - point) / RATE
    assert abs(kept_s - untranscribed_s) <= 0.1, (
        f"{kept_s:.2f} s spooled after the point, {untranscribed_s} s untranscribed")


def stop_keeping_the_rest(daemon: Daemon, state: Path) -> None:
    """SIGTERM a daemon that may still be replaying a backlog: it exits 0 in
    bounded time, and whatever it could not have transcribed within
    stt.close_timeout_s (the log says how much) is in the spool for the next
    start."""
    daemon.allow("stt.close_timeout")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, daemon.log
    timed_out = re.search(r"stt\.close_timeout .*untranscribed_s=([0-9.]+)", daemon.log)
    if timed_out:
        assert_untranscribed_audio_is_spooled(state, float(timed_out.group(1)))
