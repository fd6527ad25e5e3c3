"""The durable outbox: nothing received is lost to a broker outage or a SIGKILL."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from edged.outbox import Outbox
from tests.conftest import Stack
from tests.support.broker import Subscriber
from tests.support.mic import FifoMic
from tests.support.storage import fill, read_only, tmpfs
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
    first.expect(status=-signal.SIGKILL)
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
    assert logged_seqs(first.log) == [1, 2, 3, 4, 5]
    assert delivered == {1, 2}
    assert received == {3: "Charlie.", 4: "Delta echo.", 5: "Foxtrot."}


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


def render(stream: str, seq: int) -> bytes:
    return f"{stream}:{seq}".encode()


def test_full_outbox_drops_the_oldest_and_counts_it_across_restarts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_items=3)
    for _ in range(5):
        outbox.add(render, transcribed=0)
    assert [item.seq for item in outbox.pending()] == [3, 4, 5]
    assert outbox.dropped == 2
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite3", max_items=3)
    assert again.dropped == 2
    assert again.add(render, 0).seq == 6


def test_stream_and_transcription_point_survive_a_restart(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    item = outbox.add(render, transcribed=48_000)
    assert item.payload == f"{outbox.stream_id}:1".encode()
    outbox.mark_transcribed(64_000, durable=False)
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite3")
    assert (again.stream_id, again.last_seq) == (outbox.stream_id, 1)
    assert again.transcribed == 64_000  # the last point is saved at a clean stop
    assert [i.key for i in again.pending()] == [item.key]
    again.remove(item.key)
    assert again.pending() == []
    assert again.depth == 0


def test_a_new_outbox_starts_a_new_stream(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "a.sqlite3")
    second = Outbox(tmp_path / "b.sqlite3")
    assert first.stream_id != second.stream_id
    assert len(first.stream_id) == 32


@pytest.mark.parametrize("damage", ["garbled_header", "truncated", "flipped_page", "directory"])
def test_a_damaged_outbox_is_quarantined_and_what_it_holds_salvaged(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    for _ in range(300):  # several pages of rows
        outbox.add(lambda stream, seq: f"{stream}:{seq}:".encode() + bytes(200), 0)
    old_stream = outbox.stream_id
    outbox.close()
    data = bytearray(path.read_bytes())
    if damage == "garbled_header":
        data[:16] = b"not a database!!"
    elif damage == "truncated":
        data = data[: len(data) // 3 + 100]
    elif damage == "flipped_page":
        page = len(data) // 4096 // 2 * 4096  # a page in the middle of the table
        data[page : page + 12] = b"\xff" * 12  # its b-tree header
    if damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(bytes(data))

    again = Outbox(path)

    assert again.stream_id != old_stream, "a quarantined outbox starts a new stream"
    assert list(tmp_path.glob("outbox.sqlite3.damaged-*")), "the damaged file is kept aside"
    assert again.health.condition == "ok", "and the new one works"
    assert again.add(render, 0).seq == 1
    salvaged = [item for item in again.pending() if item.stream == old_stream]
    if damage == "flipped_page":
        assert 0 < len(salvaged) < 300, "the readable rows are salvaged"
    assert len({item.key for item in again.pending()}) == again.depth


def test_a_read_only_outbox_keeps_finals_in_memory_and_moves_them_back(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = state / "outbox.sqlite3"
    outbox = Outbox(path)
    delivered = outbox.add(render, 16_000)
    stream = outbox.stream_id
    outbox.close()
    with read_only(state):
        degraded = Outbox(path)
        assert degraded.health.condition == "read_only"
        assert degraded.stream_id == stream, "a readable file keeps its stream"
        assert [i.key for i in degraded.pending()] == [delivered.key]
        kept = degraded.add(render, 32_000)
        assert kept.seq == 2
        degraded.remove(delivered.key)
        assert not degraded.retry(), "still read-only"
    assert degraded.retry()
    assert degraded.health.condition == "ok"
    degraded.close()
    again = Outbox(path)
    assert [i.key for i in again.pending()] == [kept.key]
    assert (again.stream_id, again.last_seq, again.transcribed) == (stream, 2, 32_000)


def test_a_full_disk_keeps_finals_in_memory_until_there_is_room(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size_kb=512) as state:
        outbox = Outbox(state / "outbox.sqlite3")
        first = outbox.add(render, 0)
        filler = fill(state)
        kept = [outbox.add(lambda s, q: bytes(8192), 0) for _ in range(20)]
        assert outbox.health.condition == "full"
        assert outbox.depth == 21
        assert not outbox.retry()
        filler.unlink()
        assert outbox.retry()
        outbox.close()
        again = Outbox(state / "outbox.sqlite3")
        assert [i.seq for i in again.pending()] == [first.seq] + [i.seq for i in kept]


def test_a_garbled_header_keeps_the_write_ahead_log_with_the_quarantined_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.add(render, 0)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size, "the final sits in the WAL (a crash)"
    kept_wal = wal.read_bytes()
    data = bytearray(path.read_bytes())
    data[:16] = b"garbled header!!"
    path.write_bytes(bytes(data))
    Outbox(path)
    (damaged,) = tmp_path.glob("outbox.sqlite3.damaged-*[0-9]")
    assert damaged.with_name(damaged.name + "-wal").read_bytes() == kept_wal
