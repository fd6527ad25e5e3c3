"""Power cuts for real: the state directory is a filesystem that keeps every
write in memory until it is fsynced and drops the rest on command
(tests/support/powercut_fs.py, in the spirit of LazyFS). A cut is a SIGKILL
of the daemon and then the loss of everything not synced.

The promises: a cut during an outage loses at most about a second of audio
(the spool is synced once a second); a cut never loses a committed final,
and a final delivered before the cut comes back, if at all, with its old
(stream_id, seq).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.daemon import Daemon
from tests.support.durable import stop_keeping_the_rest
from tests.support.mic import FifoMic
from tests.support.powercut_fs import PowerCutFs
from tests.support.stt_double import SttDouble
from tests.support.tonespeech import VOCABULARY, script, words_of
from tests.support.waiting import wait_until
from tests.test_restarts import Transcripts

# What a cut may take: the last unsynced second (plus a hand-off), and what
# the microphone's pipe and the killed process held.
AT_RISK_BEFORE_S = 1.8
AT_RISK_AFTER_S = 0.3


@pytest.fixture
def disk(stack: Stack) -> Iterator[PowerCutFs]:
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("a FUSE filesystem needs root and /dev/fuse (CI has both)")
    with PowerCutFs(stack.home / "state") as fs:
        yield fs
        for daemon in stack.daemons:  # nothing may hold the mount at unmount
            daemon.stop()


def cut_power(daemon: Daemon, disk: PowerCutFs) -> None:
    daemon.expect(status=-signal.SIGKILL)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    disk.cut()


def test_cuts_during_an_outage_lose_at_most_about_a_second(
    stack: Stack, stt: SttDouble, mic: FifoMic, subscriber: Subscriber, disk: PowerCutFs
) -> None:
    rng = random.Random(1128)
    words = list(VOCABULARY)
    utterances = [[words[i % len(words)]] for i in range(18)]  # neighbours always differ
    stt.faults.refuse_status, stt.faults.refuse_count = 503, 1_000_000
    audio, truth = script(utterances, pause_s=1.2)
    offset = mic.play(audio)
    spoken = words_of(truth)
    cuts: list[float] = []
    for _ in range(3):
        daemon = stack.daemon()
        daemon.wait_for_log("capture.open")
        time.sleep(rng.uniform(3.0, 6.0))  # a random moment of the outage
        cuts.append(mic.stream_seconds)
        cut_power(daemon, disk)
    stt.faults.refuse_count = 0
    last = stack.daemon()
    transcripts = Transcripts(subscriber)
    at_risk = [any(cut - AT_RISK_BEFORE_S < offset + w.end and offset + w.start < cut
                   + AT_RISK_AFTER_S for cut in cuts) for w in spoken]
    safe = [w.text for w, risky in zip(spoken, at_risk, strict=True) if not risky]
    assert safe[-1] == spoken[-1].text, "the script goes on well past the last cut"
    wait_until(lambda: transcripts.poll() or (mic.idle and transcripts.words[-1:]
                                              == [spoken[-1].text]),
               f"the last word, and at least {safe}", timeout=90)
    transcripts.assert_no_late_deliveries()  # not even under a new seq

    heard = transcripts.words
    # Each spoken word at most once and in order; every word not near a cut, for sure.
    matched = iter(range(len(spoken)))
    for text in heard:
        index = next((i for i in matched if spoken[i].text == text), None)
        assert index is not None, f"{text!r} is extra or out of order: {heard}"
    missing = [w for w in safe if heard.count(w) < safe.count(w)]
    assert not missing, f"lost beyond the last second before a cut: {missing}; cuts at {cuts}"
    assert len({key[0] for key in transcripts.by_key}) == 1, "the outbox survived: one stream"
    stop_keeping_the_rest(last, stack.home / "state")


def test_a_cut_loses_no_committed_final_and_renumbers_none(
    stack: Stack, mic: FifoMic, subscriber: Subscriber, disk: PowerCutFs
) -> None:
    first = stack.daemon()
    audio, _ = script([["alpha"], ["bravo"]])
    mic.play(audio)
    transcripts = Transcripts(subscriber)
    while len(transcripts.words) < 2:
        first.wait_for_log("transcript seq=2")
        transcripts.poll()
    subscriber.close()
    stack.broker.stop()  # the next finals wait in the outbox
    audio, _ = script([["charlie"], ["delta", "echo"]])
    mic.play(audio)
    first.wait_for_log("transcript seq=4")
    cut_power(first, disk)

    stack.broker.start()
    late = Subscriber(stack.broker.port, "edged/#")
    try:
        after = Transcripts(late)
        second = stack.daemon()
        audio, _ = script([["foxtrot"]])
        mic.play(audio)
        wait_until(lambda: after.poll() or len([k for k in after.by_key if k[1] >= 3]) == 3,
                   "seqs 3, 4 and 5", timeout=30)
        after.assert_no_late_deliveries(1.0)
    finally:
        late.close()
    assert [after.by_key[k]["text"] for k in sorted(after.by_key, key=lambda k: k[1])
            if k[1] >= 3] == ["Charlie.", "Delta echo.", "Foxtrot."]
    before = {key: body["text"] for key, body in transcripts.by_key.items()}
    for key, body in after.by_key.items():  # a re-delivery keeps its (stream_id, seq)
        assert key not in before or before[key] == body["text"]
    assert len({key[0] for key in [*before, *after.by_key]}) == 1
    assert sorted(k[1] for k in after.by_key if k[1] >= 3) == [3, 4, 5]
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
