"""Property: across drops, replays, clean restarts and SIGKILLs, every word
captured is published exactly once, in order, at the stream time its audio
was at, unless its audio was lost in a way the design counts or allows.

It drives the real parts, wired as `Daemon.__init__` wires them: an `Outbox`
on disk, a `Spool` recovered from its files, an `AudioBuffer` over both and a
real `SttSession`, against a WebSocket server on loopback that "recognises"
words from the audio itself (the sample value inside a word is 1 + its index).

Operations: capture, a final from the service (possibly saying again words it
already finalised: a final straddling the acknowledged point; or a final it
sent before, again), a dropped connection (now, or after k more frames), an
outage (every connection cut, captures spooled) and the return of the service
(the replay cut after k frames, or not), a clean restart (close, persist,
reopen from the files) and an in-process SIGKILL (abandon everything, write
nothing more, reopen from the files). Spool segments are shrunk to 3 records
and the spool to 4 segments, so outages rotate segments and hit the size limit.

What may be lost, and nothing else:
- audio counted as dropped: by the spool at its size limit, or by the buffer
  letting unsent audio leave memory that is not on disk (the test records
  which stretches);
- audio in memory only (never spooled) at a SIGKILL: everything from the
  point the next start recovers to, which must be at least the end of what
  was spooled.

One premise: audio sent live and not yet acknowledged is in memory only, and
the design relies on the service answering before memory runs out (it does
within seconds; memory holds `buffer.max_seconds`). The test answers for the
service in time (`World.answer`) and fails loudly if that premise is broken.

Reach is recorded with `hypothesis.event` and asserted over the run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import tempfile
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import edged.audio.spool as spool_module
import edged.stt.session as session_module
from edged.audio.buffer import AudioBuffer
from edged.audio.spool import Spool
from edged.config import SAMPLE_RATE, SAMPLE_WIDTH, Settings, load_config
from edged.outbox import Outbox
from edged.stt.protocol import Final, FinalFilter, ReplayPacer
from edged.stt.session import SttSession

WORD_EVERY = 800  # samples: word k is mic audio [800k, 800k + 400), zeros after
WORD_LENGTH = 400
CHUNK_WORDS = 2  # one capture hand-over (and one spool record): 0.1 s
CHUNK_SAMPLES = CHUNK_WORDS * WORD_EVERY
RECORD_BYTES = 28 + CHUNK_SAMPLES * SAMPLE_WIDTH  # the record header + PCM
SEGMENT_BYTES = 3 * RECORD_BYTES + 1  # a new segment every 4 records (0.4 s)
SPOOL_MAX_BYTES = 4 * SEGMENT_BYTES  # the size limit: about 1.6 s of backlog
MEMORY_SAMPLES = 12 * CHUNK_SAMPLES  # 1.2 s in memory: a backlog needs the spool
# Live audio sent and not yet acknowledged lives in memory only, and if it
# leaves memory before the session notices a loss it is gone uncounted; a
# service answers within seconds, so the test keeps it well under memory.
UNACKNOWLEDGED_LIMIT = MEMORY_SAMPLES // 2
WAIT_S = 10.0


def mic_audio(chunk: int) -> bytes:
    """Capture hand-over number `chunk` of the microphone's endless signal."""
    values = array("h")
    for n in range(chunk * CHUNK_SAMPLES, (chunk + 1) * CHUNK_SAMPLES):
        values.append(1 + n // WORD_EVERY if n % WORD_EVERY < WORD_LENGTH else 0)
    return values.tobytes()


# -- the service --------------------------------------------------------------------


@dataclass
class Heard:
    """One connection's audio (session time) and what the service finalised of it."""

    connection: ServerConnection
    port: int  # the client's
    audio: array = field(default_factory=lambda: array("h"), repr=False)
    scanned: int = 0
    finalised: list[tuple[int, int, int]] = field(default_factory=list)  # word, start, end
    frames: list[str] = field(default_factory=list, repr=False)  # the finals sent

    def new_words(self) -> list[tuple[int, int, int]]:
        words, n, end = [], self.scanned, len(self.audio)
        while n < end:
            value = self.audio[n]
            if value == 0:
                n += 1
                continue
            run_end = n
            while run_end < end and self.audio[run_end] == value:
                run_end += 1
            if run_end == end:
                break  # the word may go on
            words.append((value - 1, n, run_end))
            n = run_end
        self.scanned = n
        return words

    def final(self, overlap: int, repeat: int) -> str | None:
        """A final of the words heard since the last one, `overlap` words
        before them said again (it straddles); or with `repeat` > 0, the
        final sent that many finals ago, again (a duplicate)."""
        if 0 < repeat <= len(self.frames):
            return self.frames[-repeat]
        new = self.new_words()
        self.finalised.extend(new)
        first = max(len(self.finalised) - len(new) - overlap, 0)
        words = self.finalised[first:] if new else []
        if not words:
            return None
        # `overlap` words finalised before come again: the final straddles.
        self.frames.append(json.dumps({
            "type": "transcript", "provider": "deepgram", "is_partial": False,
            "transcript": " ".join(f"w{k}" for k, _, _ in words),
            "start_time": words[0][1] / SAMPLE_RATE, "end_time": words[-1][2] / SAMPLE_RATE,
            "words": [{"text": f"w{k}", "start_time": s / SAMPLE_RATE,
                       "end_time": e / SAMPLE_RATE, "speaker": None} for k, s, e in words],
        }))
        return self.frames[-1]


class Service:
    def __init__(self) -> None:
        self.current: Heard | None = None
        self.client_sent: dict[int, int] = {}  # client port -> samples it sent
        self.client_port = 0  # of the session's newest connection
        self.abort_after: int | None = None  # binary frames
        self.down = False  # an outage: every connection is cut at once
        self.on_abort: Callable[[], None] = lambda: None

    async def handle(self, connection: ServerConnection) -> None:
        if self.down:
            connection.transport.abort()
            return
        heard = Heard(connection, connection.remote_address[1])
        self.current = heard
        try:
            async for message in connection:
                if isinstance(message, bytes):
                    heard.audio.frombytes(message)
                elif json.loads(message).get("type") == "CloseStream":
                    frame = heard.final(0, 0)
                    if frame is not None:
                        await connection.send(frame)
                    await connection.close()
                    return
        except ConnectionClosed:
            return
        finally:
            if self.current is heard:
                self.current = None

    async def send_final(self, overlap: int, repeat: int) -> bool:
        """Send a final, if there is one to send: whether one was sent."""
        heard = self.current
        if heard is None:
            return False
        frame = heard.final(overlap, repeat)
        if frame is None:
            return False
        try:
            await heard.connection.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def connect(self, *args: Any, **kwargs: Any) -> ClientConnection:
        """The session's `connect`, counting what each connection sent."""
        connection = await connect(*args, **kwargs)
        port = connection.local_address[1]
        self.client_sent[port], self.client_port = 0, port
        send = connection.send

        async def counted(message: Any, *more: Any, **options: Any) -> None:
            await send(message, *more, **options)
            if isinstance(message, bytes):
                self.client_sent[port] += len(message) // SAMPLE_WIDTH
                if self.abort_after is not None:
                    self.abort_after -= 1
                    if self.abort_after <= 0:
                        # Cut here, as the frame leaves: a drop after exactly
                        # that many frames, however fast they are sent.
                        self.abort_after = None
                        self.on_abort()
                        connection.transport.abort()

        connection.send = counted  # type: ignore[method-assign]
        return connection

    def heard_all(self) -> bool:
        """Whether the service has read all the newest connection sent."""
        heard = self.current
        return (heard is not None and heard.port == self.client_port
                and len(heard.audio) == self.client_sent[heard.port])

    def abort(self) -> None:
        if self.current is not None:
            self.current.connection.transport.abort()


# -- the daemon's data path, wired as Daemon.__init__ wires it --------------------------


class TracingSpool(Spool):
    """The real spool, noting what it drops at its size limit and each new segment."""

    def __init__(self, directory: Path, world: World):
        super().__init__(directory, SPOOL_MAX_BYTES, keep_free_bytes=0, keep_free_ratio=0)
        self.world = world

    def _drop_oldest(self, limit: str) -> None:
        records = self._segments[0].records
        if records:
            self.world.dropped.append((records[0].start, records[-1].end))
        self.world.reach["spool: size-limit drop"] = 1
        super()._drop_oldest(limit)

    def _open_segment(self) -> Any:
        if self._segments:
            self.world.reach["spool: segment rotated"] = 1
        return super()._open_segment()


class TracingBuffer(AudioBuffer):
    """The real buffer, noting the unsent audio it lets go from memory that
    is not on disk (what it counts in `dropped`), and any audio sent but not
    acknowledged that leaves memory for nowhere (which the test must prevent)."""

    world: World

    def _evict_oldest(self) -> None:
        start = self._starts[self._first]
        end = start + len(self._chunks[self._first]) // SAMPLE_WIDTH
        before, sent, unacknowledged = self._dropped, self.sent, max(start, self._acknowledged)
        super()._evict_oldest()
        if self._dropped > before:
            self.world.dropped.append((end - (self._dropped - before), end))
        elif (unacknowledged < end <= sent
              and self._on_disk(unacknowledged, end) < end - unacknowledged
              and not covered(self.world.dropped, unacknowledged, end)):
            self.world.premise_broken.append((unacknowledged, end))


class TracingFilter(FinalFilter):
    """The real filter, noting which branch each final takes."""

    world: World | None = None

    def accept(self, final: Final) -> Final | None:
        assert self.world is not None
        if final.end <= self.acknowledged:
            self.world.reach["filter: duplicate dropped"] = 1
            if final.end < self.acknowledged:
                self.world.reach["filter: an older final again"] = 1
        elif final.start < self.acknowledged and any(
                w.end <= self.acknowledged for w in final.words):
            self.world.reach["filter: straddle trimmed"] = 1
        return super().accept(final)


def recovered_point(outbox: Outbox) -> int:
    """The transcription point a start resumes from (a mutation check replaces it)."""
    return outbox.transcribed


@dataclass
class Run:
    """One run of the daemon: its objects and the task of its session."""

    outbox: Outbox
    spool: TracingSpool
    buffer: AudioBuffer
    session: SttSession
    task: asyncio.Task[None]
    position: int  # where this run's stream time began
    alive: bool = True


@dataclass
class Captured:
    word: int
    start: int  # stream time of its audio
    run: int


@dataclass
class World:
    directory: Path
    settings: Settings
    service: Service
    published: list[tuple[str, int, list[tuple[int, int, int]]]] = field(default_factory=list)
    captured: list[Captured] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)  # stream time, counted
    killed_after: dict[int, int] = field(default_factory=dict)  # run -> next position
    reach: Counter[str] = field(default_factory=Counter)
    runs: list[Run] = field(default_factory=list)
    mic: int = 0  # next capture hand-over
    finals_taken: int = 0  # final frames the sessions have handled
    premise_broken: list[tuple[int, int]] = field(default_factory=list)  # see TracingBuffer

    @property
    def run(self) -> Run:
        return self.runs[-1]

    def start(self) -> Run:
        outbox = Outbox(self.directory / "outbox.sqlite3")
        spool = TracingSpool(self.directory / "spool", self)
        point = recovered_point(outbox)
        position = spool.recover(outbox.stream_id, point)
        if spool.records:
            self.reach["restart: recovered a spooled backlog"] = 1
        buffer = TracingBuffer(MEMORY_SAMPLES, spool=spool, head=position, acknowledged=point,
                             release_limit=lambda: outbox.durable_transcribed)
        buffer.world = self
        number = len(self.runs)

        def on_final(final: Final | None, transcribed: int) -> None:
            assert self.runs[number].alive, "a killed run published"
            self.finals_taken += 1
            if final is None:
                spooled_from = spool.start
                outbox.mark_transcribed(
                    transcribed, durable=spooled_from is not None and spooled_from < transcribed)
                return
            words = [(int(w.text[1:]), w.start, w.end) for w in final.words]

            def render(stream_id: str, seq: int) -> bytes:
                return json.dumps({"stream": stream_id, "seq": seq, "words": words}).encode()

            item = outbox.add(render, transcribed)
            self.published.append((item.stream, item.seq, words))

        session = SttSession(self.settings, buffer, on_final)
        session.finals = TracingFilter()
        session.finals.world = self
        session.finals.acknowledged = point
        buffer.on_append = session.audio_arrived
        run = Run(outbox, spool, buffer, session, asyncio.create_task(session.run()), position)
        self.runs.append(run)
        return run

    async def capture(self, chunks: int) -> None:
        for _ in range(chunks):
            run = self.run
            if (not run.buffer.spooling
                    and run.buffer.head - run.session.finals.acknowledged > UNACKNOWLEDGED_LIMIT):
                await self.answer(run)
            head = run.buffer.head
            run.buffer.append(mic_audio(self.mic))
            for n in range(CHUNK_WORDS):
                word = self.mic * CHUNK_WORDS + n
                self.captured.append(Captured(word, head + n * WORD_EVERY, len(self.runs) - 1))
            self.mic += 1
            await asyncio.sleep(0)

    async def answer(self, run: Run) -> None:
        """Live audio sent and not acknowledged is in memory only: let the
        service answer before it outgrows memory, as a service would."""
        if self.service.down:
            # The session may not know yet: the service cuts a connection
            # once it is open, so for a moment it looks up, and what is sent
            # on it is lost with it. Once the session knows, the backlog is
            # on disk (`go_offline`).
            await self.until(lambda: run.buffer.spooling)
            return
        if not await self.settle():
            return
        port, taken = self.service.client_port, self.finals_taken
        if await self.service.send_final(0, 0):
            # Handled (or the connection was lost: an armed drop).
            await self.until(lambda: self.finals_taken > taken
                             or run.session.stats.state != "connected"
                             or self.service.client_port != port)

    async def until(self, condition: Callable[[], bool]) -> bool:
        async with asyncio.timeout(WAIT_S):
            while not condition():  # noqa: ASYNC110 - conditions on several objects' state
                await asyncio.sleep(0.001)
        return True

    async def settle(self) -> bool:
        """Wait until the service has heard all the session will send now."""
        run = self.run
        self.service.abort_after = None if self.service.abort_after is None else 1
        await self.until(lambda: run.session.stats.state == "connected"
                         # live audio goes out in whole frames (stt.frame_ms)
                         and run.buffer.head - run.buffer.sent < CHUNK_SAMPLES
                         and self.service.heard_all())
        return run.session.stats.state == "connected"

    async def final(self, overlap: int, repeat: int) -> None:
        if self.service.abort_after is not None or self.service.down:
            return  # no session, or a drop is armed for the next frames
        await self.settle()
        await self.service.send_final(overlap, repeat)
        await asyncio.sleep(0.005)

    def dropping(self) -> None:
        if self.run.buffer.spooling and self.run.session.stats.state == "connected":
            self.reach["drop: during replay"] = 1

    async def drop(self, after_frames: int) -> None:
        if after_frames == 0:
            self.dropping()
            await self.cut()
        else:
            self.service.abort_after = after_frames

    async def outage(self, down: bool, drop_after: int) -> None:
        """The service goes away (every connection cut) or comes back; when
        it comes back, `drop_after` > 0 cuts the connection again after that
        many frames of the replay."""
        if down:
            self.service.down = True
            await self.cut()
        elif self.service.down:
            self.service.abort_after = drop_after or None
            self.service.down = False
            run = self.run
            # Back: wait for the session to be (cut and) connected again.
            await self.until(lambda: run.session.stats.state == "connected" and (
                self.service.abort_after is None or (self.service.heard_all()
                and run.buffer.head - run.buffer.sent < CHUNK_SAMPLES)))
            self.service.abort_after = None

    async def outage_and_replay(self, chunks: int, drop_after: int) -> None:
        """An outage while `chunks` are captured; the connection that replays
        them is cut after `drop_after` frames."""
        await self.outage(True, 0)
        await self.capture(chunks)
        await self.outage(False, drop_after)

    async def cut(self) -> None:
        """Abort the connection, and wait until the session knows."""
        heard = self.service.current
        self.service.abort()
        if heard is not None:
            await self.until(lambda: self.service.client_port != heard.port
                             or self.run.session.stats.state != "connected")

    async def clean_restart(self) -> None:
        self.reach["restart: clean"] = 1
        await self.stop_and_start()

    async def stop_and_start(self) -> None:
        """SIGTERM: send what is buffered and CloseStream, take the last finals,
        persist the point and the backlog (Daemon._shutdown, _keep_for_next_start);
        then start again from the files."""
        run, self.service.abort_after = self.run, None
        run.session.close()
        await asyncio.wait_for(asyncio.shield(run.task), WAIT_S)
        run.outbox.close()
        run.buffer.persist()
        run.spool.close()
        run.alive = False
        # Nothing captured is lost at a clean stop: the next start resumes at the head.
        assert self.start().position == run.buffer.head

    async def kill(self) -> None:
        """SIGKILL: nothing more is written; the files stay as they are."""
        self.reach["restart: SIGKILL"] = 1
        run, self.service.abort_after = self.run, None
        spooled_end = run.spool.end if run.spool.records else 0
        run.spool._close_writer()  # what was written is in the kernel already
        run.spool.enabled = False  # so the session's teardown writes nothing
        run.outbox._close_db()  # committed transactions stay, nothing else
        run.alive = False
        self.service.abort()
        while not run.task.done():
            # Again until it ends: on Python 3.11 `asyncio.wait_for` (the
            # session's backoff sleep) can swallow a cancellation that races
            # its timeout.
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=0.05)
        if not run.task.cancelled():
            run.task.result()  # ended some other way: an error in the session fails here
        killed = len(self.runs) - 1
        new = self.start()
        # Audio on disk is never lost at a kill: the next start resumes after it.
        assert new.position >= spooled_end
        self.killed_after[killed] = new.position
        if any(c.run == killed and c.start >= new.position for c in self.captured):
            self.reach["restart: SIGKILL lost live audio"] = 1


# -- the property -------------------------------------------------------------------------

_OPERATION: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "capture": st.tuples(st.just("capture"), st.integers(1, 30)),
    # (words finalised before to say again; or a final sent 1 or 2 finals ago, again)
    "final": st.tuples(st.just("final"), st.sampled_from([0, 1, 1, 2, 3]),
                       st.sampled_from([0, 0, 1, 2, 2])),
    "drop": st.tuples(st.just("drop"), st.sampled_from([0, 1, 2, 4, 8])),
    "restart": st.tuples(st.just("restart")),
    "kill": st.tuples(st.just("kill")),
    "outage": st.tuples(st.just("outage"), st.booleans(), st.sampled_from([0, 1, 2, 4])),
    "outage_and_replay": st.tuples(st.just("outage_and_replay"), st.integers(4, 30),
                                   st.sampled_from([1, 2, 3])),
}
# Weighted: captures and finals often, so that sessions have several finals
# to straddle and repeat, and outages long enough to fill the spool.
OPERATIONS = st.lists(
    st.sampled_from(["capture"] * 4 + ["final"] * 4 + ["drop"] * 2 + ["outage"] * 2
                    + ["outage_and_replay", "restart"] + ["kill"] * 2)
    .flatmap(_OPERATION.__getitem__),
    min_size=8, max_size=40)


SERVICE = Service()  # one per example: reset by run_example


def session_settings(url: str) -> Settings:
    return load_config([], environ={}, flags={
        "device.id": "replay", "stt.url": url, "stt.frame_ms": 100, "stt.replay_speed": 20.0,
        "mqtt.partials": False, "state_dir": "/nonexistent",
    }).settings


async def run_example(ops: list[tuple[Any, ...]], directory: Path) -> World:
    service = SERVICE
    service.__init__()  # type: ignore[misc]
    async with serve(service.handle, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        world = World(directory, session_settings(f"ws://127.0.0.1:{port}/v1/listen"), service)
        service.on_abort = world.dropping
        world.start()
        steps: dict[str, Callable[..., Awaitable[None] | None]] = {
            "capture": world.capture, "final": world.final, "drop": world.drop,
            "restart": world.clean_restart, "kill": world.kill, "outage": world.outage,
            "outage_and_replay": world.outage_and_replay,
        }
        for op, *args in ops:
            result = steps[op](*args)
            if result is not None:
                await result
        # Drain: a clean restart, then let the new run replay all and close cleanly.
        service.abort_after, service.down = None, False
        await world.stop_and_start()
        await world.settle()
        run = world.run
        run.session.close()
        await asyncio.wait_for(run.task, WAIT_S)
        run.outbox.close()
        run.buffer.persist()
        run.spool.close()
        assert run.buffer.sent >= run.buffer.head
    return world


def covered(stretches: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether the stretches cover [start, end)."""
    for low, high in sorted(stretches):
        if low <= start < high:
            start = high
    return start >= end


def check(world: World) -> None:
    assert not world.premise_broken, (
        f"the test let audio sent and not acknowledged leave memory for nowhere "
        f"(a service that never answers): {world.premise_broken}")
    keys = [(stream, seq) for stream, seq, _ in world.published]
    assert len(keys) == len(set(keys)), "an outbox key was used twice"
    assert len({stream for stream, _ in keys}) <= 1, "the stream changed"
    words = [word for _, _, ws in world.published for word in ws]
    indexes = [k for k, _, _ in words]
    assert indexes == sorted(set(indexes)), f"a word twice or out of order: {indexes}"
    where = {c.word: c for c in world.captured}
    for k, start, end in words:
        true_end = where[k].start + WORD_LENGTH
        assert (start, end) == (where[k].start, true_end), (
            f"w{k} published at {start}..{end}, its audio was at {where[k].start}")
    published = set(indexes)
    for c in world.captured:
        if c.word in published:
            continue
        end = c.start + WORD_LENGTH
        if any(s < end and c.start < e for s, e in world.dropped):
            world.reach["word lost: counted drop"] = 1
            continue
        if c.run in world.killed_after and c.start >= world.killed_after[c.run]:
            continue  # live audio, in memory only, at a SIGKILL
        raise AssertionError(
            f"w{c.word} (stream {c.start}, run {c.run}) was never published; runs began at "
            f"{[run.position for run in world.runs]}, kills resumed at {world.killed_after}, "
            f"dropped {sorted(world.dropped)}")


def test_every_word_is_published_once_at_its_time_across_drops_and_restarts() -> None:
    totals: Counter[str] = Counter()
    examples = 0

    @settings(max_examples=200, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow])
    @given(OPERATIONS)
    def prop(ops: list[tuple[Any, ...]]) -> None:
        nonlocal examples
        with tempfile.TemporaryDirectory() as directory:
            world = asyncio.run(run_example(ops, Path(directory)))
        check(world)
        for name in sorted(world.reach):
            event(name)
        totals.update(world.reach)
        examples += 1

    # The test captures audio far faster than real time: paced at even the
    # highest `stt.replay_speed` (20x), sending it would take most of the
    # run. Pacing is `test_protocol.py`'s and `test_spool.py`'s to check.
    unpaced = functools.partial(ReplayPacer, burst_seconds=3600.0)
    with (mock.patch.object(spool_module, "SEGMENT_BYTES", SEGMENT_BYTES),
          mock.patch.object(session_module, "retry_delay", return_value=0.002),
          mock.patch.object(session_module, "connect", SERVICE.connect),
          mock.patch.object(session_module, "ReplayPacer", unpaced)):
        prop()
    shares = {name: totals[name] / examples for name in totals}
    print("reach:", {name: f"{share:.0%}" for name, share in sorted(shares.items())})
    for name in ("filter: duplicate dropped", "filter: an older final again",
                 "filter: straddle trimmed", "restart: clean",
                 "restart: SIGKILL", "restart: recovered a spooled backlog",
                 "restart: SIGKILL lost live audio", "drop: during replay",
                 "spool: segment rotated", "spool: size-limit drop",
                 "word lost: counted drop"):
        assert shares.get(name, 0) >= 0.05, (name, shares)  # each is seen 10-80% of the time
