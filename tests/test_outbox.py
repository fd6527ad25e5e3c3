"""The durable outbox: nothing received is lost to a broker outage or a SIGKILL."""

from __future__ import annotations

import re
import signal

from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.tonespeech import script

TOPIC = "edged/testpi/transcript"


def logged_seqs(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"transcript seq=(\d+)", log)]


def test_finals_survive_broker_outage_and_sigkill_restart(
    stack: Stack, mic: FifoMic, subscriber: Subscriber
) -> None:
    first = stack.daemon()
    audio, _ = script([["alpha"], ["bravo"]])
    mic.play(audio)
    delivered = {subscriber.next(TOPIC).json()["seq"] for _ in range(2)}

    subscriber.close()
    stack.broker.stop()
    audio, _ = script([["charlie"], ["delta", "echo"], ["foxtrot"]])
    mic.play(audio)
    while len(logged_seqs(first.log)) < 5:  # the daemon has received all five finals
        first.wait_for_log(f"transcript seq={max(logged_seqs(first.log), default=0) + 1}")
    first.signal(signal.SIGKILL)
    first.wait(10)

    second = stack.daemon()  # the broker is still down
    second.wait_for_log("mqtt.connect_failed")
    second.wait_for_log("stt.connected")
    stack.broker.start()
    late = Subscriber(stack.broker.port, "edged/#")
    try:
        received = {}
        while set(logged_seqs(first.log)) - delivered - set(received):
            body = late.next(TOPIC, timeout=30).json()
            received[body["seq"]] = body["text"]
    finally:
        late.close()
    assert set(logged_seqs(first.log)) <= delivered | set(received)
    assert [received[seq] for seq in sorted(received)] == ["Charlie.", "Delta echo.", "Foxtrot."]


def test_seq_continues_across_restarts(stack: Stack, mic: FifoMic,
                                       subscriber: Subscriber) -> None:
    first = stack.daemon()
    audio, _ = script([["golf"]])
    mic.play(audio)
    seq = subscriber.next(TOPIC).json()["seq"]
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    stack.daemon()
    audio, _ = script([["hotel"]])
    mic.play(audio)
    assert subscriber.next(TOPIC).json()["seq"] == seq + 1


def test_full_outbox_drops_the_oldest_and_counts_it_across_restarts(tmp_path) -> None:
    from edged.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox.sqlite3", max_items=3)
    for _ in range(5):
        outbox.add(lambda seq: f"final {seq}".encode())
    assert [item.seq for item in outbox.pending()] == [3, 4, 5]
    assert outbox.dropped == 2
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite3", max_items=3)
    assert again.dropped == 2
    assert again.add(lambda seq: b"x").seq == 6
