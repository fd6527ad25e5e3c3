"""Restarts at any moment of an outage and of its replay: every word is
published exactly once, and a re-delivery only ever repeats a (stream_id,
seq) pair, never the same audio under a new one.

The daemon is killed (SIGKILL, and now and then SIGTERM) at random moments
from outside, as a device in the field lives it. A SIGKILL loses what the
process holds and no disk has: the capture thread's last hand-off (at most
`stt.frame_ms`) and the period in the microphone's pipe. The kills during
the outage therefore land at random moments in the pauses between words
(never within 0.7 s after one); kills during the replay land anywhere, as
the backlog is all on disk by then.
"""

from __future__ import annotations

import queue
import random
import signal
import time
from array import array
from typing import Any

from edged.audio.spool import Spool
from edged.outbox import Outbox
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.daemon import Daemon
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import VOCABULARY, SpokenWord, script, tone, words_of
from tests.support.waiting import assert_quiet, wait_until
from tests.test_end_to_end import TIME_TOLERANCE_S, assert_captured_at

TOPIC = "edged/testpi/transcript"
KILLS = 20
LOSS_WINDOW_S = 0.7  # what a SIGKILL may take with it, with a margin


class Transcripts:
    """Every transcript received, de-duplicated as a consumer must: by (stream_id, seq)."""

    def __init__(self, subscriber: Subscriber):
        self.subscriber = subscriber
        self.by_key: dict[tuple[str, int], dict[str, Any]] = {}
        self.deliveries = 0

    def poll(self) -> None:
        while True:
            try:
                message = self.subscriber.messages.get_nowait()
            except queue.Empty:
                return
            if message.topic != TOPIC:
                continue
            body = message.json()
            key = (body["stream_id"], body["seq"])
            known = self.by_key.get(key)
            assert known is None or known == body, f"{key} re-delivered with other content"
            self.by_key[key] = body
            self.deliveries += 1

    def assert_no_late_deliveries(self, for_s: float = 2.0) -> None:
        """A quiet period: nothing is delivered again, nothing new (a late
        duplicate under a new seq would have arrived by then)."""
        self.poll()
        known, deliveries = dict(self.by_key), self.deliveries

        def nothing_new() -> bool:
            self.poll()
            return self.deliveries == deliveries and self.by_key == known

        assert_quiet(nothing_new, for_s, "no late delivery")

    @property
    def ordered(self) -> list[dict[str, Any]]:
        """The transcripts in the order they were spoken."""
        return [self.by_key[key] for key in sorted(self.by_key, key=self._order)]

    @property
    def words(self) -> list[str]:
        return [word["text"] for final in self.ordered for word in final["words"]]

    def _order(self, key: tuple[str, int]) -> tuple[float, int]:
        return (self.by_key[key]["start"], key[1])


def safe_to_kill(mic: FifoMic, words: list[SpokenWord], offset: float) -> bool:
    """No word in the audio a SIGKILL may take with it."""
    position = mic.stream_seconds
    return not any(offset + w.start < position + 0.2 and offset + w.end > position - LOSS_WINDOW_S
                   for w in words)


def kill(daemon: Daemon, rng: random.Random) -> str:
    how = signal.SIGTERM if rng.random() < 0.2 else signal.SIGKILL
    if how == signal.SIGKILL:
        daemon.expect(status=-signal.SIGKILL)
    else:  # during a replay, it may not get through all of it in stt.close_timeout_s
        daemon.allow("stt.close_timeout")
    daemon.signal(how)
    assert daemon.wait(30) == daemon.expected_status, daemon.log
    return how.name


def test_random_kills_during_an_outage_and_its_replay_lose_and_repeat_no_word(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber
) -> None:
    rng = random.Random(20261128)
    utterances = [[rng.choice(VOCABULARY)] for _ in range(22)]
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 1_000_000  # the outage
    overrides: dict[str, Any] = {"stt": {"replay_speed": 2.0}}
    transcripts = Transcripts(subscriber)
    signals: list[str] = []

    audio, truth = script(utterances, pause_s=1.6)
    offset = mic.play(audio)
    spoken = words_of(truth)
    # Outage: killed at random moments in the pauses, until all is spoken.
    while not mic.idle:
        daemon = stack.daemon(**overrides)
        deadline = time.monotonic() + rng.uniform(1.0, 3.0)
        while time.monotonic() < deadline or not safe_to_kill(mic, spoken, offset):
            time.sleep(0.02)
        signals.append(kill(daemon, rng))
    # The service is back: killed at random moments while it replays.
    stt.faults.refuse_count = 0
    replay_kills = 0
    last = None
    while replay_kills < 6 or signals.count("SIGKILL") < KILLS:
        daemon = stack.daemon(**overrides)
        daemon.wait_for_log("stt.connected")
        time.sleep(rng.uniform(0.2, 2.0))
        transcripts.poll()
        if len(transcripts.words) >= len(spoken):
            last = daemon  # the replay is over
            break
        signals.append(kill(daemon, rng))
        replay_kills += 1
    last = last or stack.daemon(**overrides)
    wait_until(lambda: transcripts.poll() or len(transcripts.words) >= len(spoken),
               f"all {len(spoken)} words", timeout=90)
    transcripts.assert_no_late_deliveries()  # not even under a new seq

    assert signals.count("SIGKILL") >= KILLS, signals
    assert transcripts.words == [w.text for w in spoken]
    streams = {key[0] for key in transcripts.by_key}
    assert len(streams) == 1, "one outbox, one stream"
    seqs = sorted(key[1] for key in transcripts.by_key)
    assert seqs == list(range(1, len(spoken) + 1)), "no seq skipped or reused"
    # Replayed from disk after restarts (each a gap in capture), each
    # stamped with when it was said.
    assert_captured_at(transcripts.ordered, [[word] for word in spoken], offset, mic,
                       tolerance=TIME_TOLERANCE_S)
    stop_keeping_the_rest(last, stack.home / "state")


def test_sigkill_in_an_outage_keeps_every_sample_handed_over(
    stack: Stack, stt: SttDouble, mic: FifoMic
) -> None:
    """2.5 s spoken offline, then SIGKILL: all of it is on disk (before, up to
    a second waited in memory for the spool)."""
    daemon = stack.daemon()
    daemon.wait_for_log("stt.connected")
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 1_000_000
    stt.abort_connections()
    daemon.wait_for_log("stt.disconnected")
    spoken = tone("golf", 2.5)
    end = mic.play(spoken) + 2.5
    mic.wait_read(end + 0.6)  # the tone's last hand-off has reached edged
    daemon.expect(status=-signal.SIGKILL)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)

    outbox = Outbox(stack.home / "state" / "outbox.sqlite3")
    spool = Spool(stack.home / "state" / "spool", 1 << 30)
    spool.recover(outbox.stream_id, outbox.transcribed)
    on_disk = b"".join(spool.read(r.start, r.length)[1] for r in spool.records)
    outbox.close()
    assert loud_samples(on_disk) == loud_samples(spoken), "every sample of the tone is on disk"


def loud_samples(pcm: bytes) -> int:
    return sum(1 for value in array("h", pcm) if abs(value) > 500)
