"""scripts/bench: edged measured on this machine, beside a naive client.

Real mosquitto, real ALSA capture through the file plugin fed by a FIFO at a
fixed multiple of real time, and the test STT server (tone language, true
times). Prints one table; docs/performance.md keeps the latest.

    python scripts/lib/bench.py [--quick] [--only never-ack|fleet-reconnect]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.broker import Mosquitto, Subscriber  # noqa: E402
from tests.support.daemon import write_config  # noqa: E402
from tests.support.mic import FifoMic  # noqa: E402
from tests.support.mqtt_proxy import MqttProxy  # noqa: E402
from tests.support.notify import NotifySocket  # noqa: E402
from tests.support.stt_double import SttDouble  # noqa: E402
from tests.support.tonespeech import VOCABULARY, script  # noqa: E402

API_KEY = "bench-key"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(process: subprocess.Popen[bytes], mic: FifoMic) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    mic.stop()


def wake_ups(pid: int) -> int:
    """Voluntary context switches of all the process's threads: how often it woke."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def utterances(seconds: float) -> tuple[bytes, int]:
    """Utterances and pauses, like a room where people talk now and then: (audio, count)."""
    spoken = [[VOCABULARY[(i * 3 + j) % len(VOCABULARY)] for j in range(1 + i % 3)]
              for i in range(int(seconds / 3))]
    audio, _ = script(spoken, pause_s=1.8)
    return audio, len(spoken)


def speech(seconds: float) -> bytes:
    return utterances(seconds)[0]


def sparse_speech(seconds: float, share: float = 0.10) -> bytes:
    """A home's day in miniature: `share` of the time someone speaks."""
    spoken = [[VOCABULARY[(i * 5 + j) % len(VOCABULARY)] for j in range(3)]
              for i in range(max(int(seconds * share / 1.1), 1))]
    utterance_s = 3 * 0.3 + 2 * 0.1  # three words and two gaps
    pause = utterance_s / share - utterance_s
    audio, _ = script(spoken, pause_s=pause)
    return audio


@dataclass
class Run:
    cpu_s: float
    audio_s: float
    rss_start_mb: float
    rss_end_mb: float
    sent_s: float = 0.0
    rss_warm_mb: float = 0.0  # after a tenth of the run: caches and pools warmed up

    @property
    def sent_share(self) -> float:
        return self.sent_s / self.audio_s

    @property
    def cpu_per_audio_hour(self) -> float:
        return self.cpu_s / (self.audio_s / 3600)


@dataclass
class NeverAcknowledged:
    warm_finals: int
    rss_warm_mb: float
    finals: int
    rss_end_mb: float
    finals_per_s: float  # between the two measurements
    reached_broker: int  # transcripts the broker got (and never acknowledged)
    pubacks_dropped: int


@dataclass
class Comeback:
    """When each member of a fleet was back after an outage, in seconds from
    the service's return."""

    outage_s: float
    back_s: list[float]
    fleet: int

    @property
    def largest_share_in_a_second(self) -> float:
        """The most reconnects any one-second window holds, as a share of the fleet."""
        times = sorted(self.back_s)
        return max(sum(1 for t in times if start <= t < start + 1.0)
                   for start in times) / self.fleet

    @property
    def spread_s(self) -> float:
        return max(self.back_s) - min(self.back_s)

    @property
    def all_back_s(self) -> float:
        return max(self.back_s)


def connected_after(log: Path, since: float) -> float:
    """The wall-clock time of edged's first `mqtt.connected` at or after `since`."""
    for line in log.read_text(errors="replace").splitlines():
        if " mqtt.connected " in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at
    raise RuntimeError(f"no mqtt.connected after {since} in {log}")


class LogCounter:
    """Counts lines containing `needle` in a growing log file, reading only what is new."""

    def __init__(self, path: Path, needle: bytes):
        self.path, self.needle = path, needle
        self.count = 0
        self._offset = 0

    def update(self) -> int:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line being written waits for its end
        self._offset += len(complete)
        self.count += complete.count(self.needle)
        return self.count


class Bench:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.broker = Mosquitto(workdir / "mosquitto").start()
        self.stt = SttDouble(api_key=API_KEY).start()
        self.count = 0

    def close(self) -> None:
        self.stt.stop()
        self.broker.stop()

    def home(self) -> Path:
        self.count += 1
        home = self.workdir / f"run{self.count}"
        home.mkdir()
        return home

    def edged(self, home: Path, extra_env: dict[str, str] | None = None,
              state_dir: Path | None = None,
              **sections: dict[str, object]) -> subprocess.Popen[bytes]:
        config: dict[str, dict[str, object]] = {
            "device": {"id": "bench"},
            "audio": {"device": "testmic"},
            "stt": {"url": self.stt.url, "replay_speed": 20.0},
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        path = write_config(home / "edged.toml", config,
                            top={"state_dir": str(state_dir or home / "state")})
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        env.update({"HOME": str(home), "EDGED_STT__API_KEY": API_KEY, **(extra_env or {})})
        return subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(path)],
                                env=env, stdout=(home / "log").open("wb"),
                                stderr=subprocess.STDOUT)

    def naive(self, home: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "HOME": str(home)}
        return subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/lib/naive_client.py"),
             f"{self.stt.url}?provider=deepgram&encoding=pcm_s16le&sample_rate=16000", API_KEY,
             "testmic"], env=env, stdout=(home / "log").open("wb"), stderr=subprocess.STDOUT)

    def measure(self, start: Callable[[Path], subprocess.Popen[bytes]], audio_s: float,
                speed: float, period_ms: int = 100,
                audio: Callable[[float], bytes] = speech) -> Run:
        home = self.home()
        mic = FifoMic(home, speed=speed, period_ms=period_ms)
        process = start(home)
        try:
            time.sleep(2.0)  # start-up is not what this measures
            rss_start = rss_mb(process.pid)
            cpu_start = cpu_seconds(process.pid)
            written_start = mic.stream_seconds
            sent_start = sum(session.bytes_received for session in self.stt.sessions)
            mic.play(audio(audio_s))
            while mic.stream_seconds - written_start < audio_s / 10:
                time.sleep(0.1)
            rss_warm = rss_mb(process.pid)
            mic.wait_idle(timeout=audio_s / speed * 3 + 60)
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} died; see {home / 'log'}")
            time.sleep(1.0)  # the last frames reach the server
            cpu = cpu_seconds(process.pid) - cpu_start
            captured = mic.stream_seconds - written_start
            sent = (sum(session.bytes_received for session in self.stt.sessions)
                    - sent_start) / 32000
            return Run(cpu, captured, rss_start, rss_mb(process.pid), sent, rss_warm)
        finally:
            stop(process, mic)

    def latency(self, audio_s: float) -> list[float]:
        """Server's send of a final to the subscriber's receipt, at real time."""
        home = self.home()
        mic = FifoMic(home, speed=1.0)
        subscriber = Subscriber(self.broker.port, "edged/bench/transcript")
        sent_before = len(self.stt.finals_sent_at)
        process = self.edged(home)
        try:
            time.sleep(1.0)
            utterances = [[VOCABULARY[i % 8]] for i in range(int(audio_s / 1.2))]
            audio, _ = script(utterances, pause_s=0.8)
            mic.play(audio)
            received = [subscriber.next("edged/bench/transcript", timeout=60).received_at
                        for _ in utterances]
            sent = self.stt.finals_sent_at[sent_before:sent_before + len(received)]
            return [(r - s) * 1000 for r, s in zip(received, sent, strict=True)]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
            subscriber.close()
            mic.stop()

    def catch_up(self, outage_s: float) -> tuple[float, int, int, float]:
        """Seconds to drain the backlog of an outage at the default replay speed,
        the live utterances spoken during the drain that were transcribed, and
        the resident memory at the end of the outage (the backlog in memory)."""
        home = self.home()
        mic = FifoMic(home, speed=1.0)
        subscriber = Subscriber(self.broker.port, "edged/bench/#")
        process = self.edged(home, stt={"replay_speed": 1.25})
        try:
            time.sleep(1.0)
            self.stt.faults.refuse_status, self.stt.faults.refuse_count = 503, 10**6
            self.stt.abort_connections()
            during_outage, outage_utterances = utterances(outage_s)
            mic.play(during_outage)
            time.sleep(len(during_outage) / 32000)
            rss_outage = rss_mb(process.pid)
            self.stt.faults.refuse_count = 0
            restored = time.monotonic()
            # People talk on while the backlog drains (at 1.25x it gains 0.25 s a
            # second), and a while after, so the drain is seen to end.
            live, spoken = utterances(outage_s * 4 + 60)
            mic.play(live)
            finals = 0
            drained = 0.0
            while finals < outage_utterances + spoken:
                message = subscriber.next(timeout=600)
                if message.topic.endswith("/transcript"):
                    finals += 1
                elif message.topic.endswith("/state") and not drained:
                    state = message.json()
                    # The backlog shows in buffered_s from the reconnect on; a
                    # state sent before the service came back does not count.
                    if (message.received_at > restored + 1.0 and state["status"] == "streaming"
                            and state["buffered_s"] == 0.0):
                        drained = message.received_at - restored
            return drained, finals - outage_utterances, spoken, rss_outage
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            subscriber.close()
            mic.stop()

    def real_time(self, start: Callable[[Path], subprocess.Popen[bytes]], seconds: float,
                  period_ms: int = 100) -> tuple[float, float]:
        """At real time, as on a device: (CPU % of one core, wake-ups a second).
        Wake-ups are voluntary context switches of all threads."""
        home = self.home()
        mic = FifoMic(home, speed=1.0, period_ms=period_ms)
        process = start(home)
        try:
            mic.play(speech(seconds + 10))
            time.sleep(5.0)  # start-up is not what this measures
            cpu, wakes = cpu_seconds(process.pid), wake_ups(process.pid)
            time.sleep(seconds)
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} died; see {home / 'log'}")
            return ((cpu_seconds(process.pid) - cpu) / seconds * 100,
                    (wake_ups(process.pid) - wakes) / seconds)
        finally:
            stop(process, mic)

    def never_acknowledged(self, finals: int = 10_000, warm_up: int = 500,
                           finals_per_frame: int = 5, speed: float = 4.0) -> NeverAcknowledged:
        """A broker that takes every QoS 1 message and never acknowledges one (a
        proxy drops its PUBACKs), while the STT double answers each audio frame
        (250 ms, `speed` x real time, silence) with `finals_per_frame` finals:
        edged's resident memory after `warm_up` finals and after `finals`."""
        home = self.home()
        # The outbox on a tmpfs when there is one: SQLite's syncs are not what this measures.
        shm = Path("/dev/shm")  # noqa: S108 (mkdtemp below: a private new directory)
        state = (Path(tempfile.mkdtemp(prefix="edged-bench-state-", dir=shm)) if shm.is_dir()
                 else home / "state")
        proxy = MqttProxy(self.broker.port, drop_pubacks=True).start()
        subscriber = Subscriber(self.broker.port, "edged/bench/transcript")
        mic = FifoMic(home, speed=speed)  # nothing played: silence, so no tone-language finals
        self.stt.faults.finals_per_frame = finals_per_frame
        process = self.edged(home, state_dir=state, mqtt={"port": proxy.port})
        counter = LogCounter(home / "log", b" transcript seq=")

        def wait_for(count: int) -> tuple[float, int, float]:
            deadline = time.monotonic() + 300
            while counter.update() < count:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (home / "log").read_text(errors="replace").splitlines()[-20:]
                    raise RuntimeError(f"{counter.count} of {count} finals, edged "
                                       f"{'died' if process.poll() is not None else 'lives'}; "
                                       "its log ends:\n" + "\n".join(tail))
                time.sleep(0.05)
            return time.monotonic(), counter.count, rss_mb(process.pid)

        try:
            warm_at, warm_finals, rss_warm = wait_for(warm_up)
            end_at, end_finals, rss_end = wait_for(finals)
            reached = 0
            while not subscriber.messages.empty():
                subscriber.messages.get()
                reached += 1
            return NeverAcknowledged(warm_finals, rss_warm, end_finals, rss_end,
                                     (end_finals - warm_finals) / (end_at - warm_at), reached,
                                     proxy.pubacks_dropped)
        finally:
            self.stt.faults.finals_per_frame = 0
            stop(process, mic)
            subscriber.close()
            proxy.stop()
            if state != home / "state":
                shutil.rmtree(state, ignore_errors=True)

    def fleet_reconnect(self, daemons: int = 50, outage_s: float = 20.0,
                        ) -> tuple[Comeback, Comeback, Comeback]:
        """`daemons` edged processes on one mosquitto and one STT double, each
        with its FIFO microphone at real time (silence, 250 ms periods), through
        a broker restart without a pause, a broker outage of `outage_s` (stopped,
        then started again on the same port) and an STT outage as long
        (connections cut, handshakes refused with 503). Back means: the
        daemon logs `mqtt.connected` (its CONNACK, to the millisecond; a
        subscriber that joined as the broker came back must also see every
        daemon's `online`); the STT double opens a new session."""
        homes = [self.home() for _ in range(daemons)]
        mics = [FifoMic(home, speed=1.0, period_ms=250) for home in homes]
        devices = [f"fleet-{number:02d}" for number in range(daemons)]
        processes = [self.edged(home, device={"id": device}, audio={"chunk_ms": 250},
                                stt={"replay_speed": 1.25})
                     for home, device in zip(homes, devices, strict=True)]
        try:
            watcher = Subscriber(self.broker.port, "edged/+/availability")
            self.availability(watcher, devices, timeout=180)
            watcher.close()
            deadline = time.monotonic() + 60
            while len(self.stt.sessions) < daemons:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(self.stt.sessions)} of {daemons} STT sessions")
                time.sleep(0.1)
            self.check_alive(processes, homes)
            print(f"{daemons} daemons online; the broker restarts", flush=True)
            restart = self.broker_outage(homes, devices, 0.0)
            time.sleep(35)  # connections stable again: the backoff starts afresh
            print(f"the broker goes for {outage_s:.0f} s", flush=True)
            broker = self.broker_outage(homes, devices, outage_s)
            self.check_alive(processes, homes)
            print(f"the STT service goes for {outage_s:.0f} s", flush=True)
            stt = self.stt_outage(daemons, outage_s)
            self.check_alive(processes, homes)
            return restart, broker, stt
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            for mic in mics:
                mic.stop()

    @staticmethod
    def check_alive(processes: list[subprocess.Popen[bytes]], homes: list[Path]) -> None:
        for process, home in zip(processes, homes, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"edged died; see {home / 'log'}")

    @staticmethod
    def availability(watcher: Subscriber, devices: list[str], timeout: float,
                     ) -> dict[str, float]:
        """When each device's `online` arrived (time.monotonic())."""
        online: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(online) < len(devices):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(devices) - set(online))
                raise RuntimeError(f"not back online after {timeout:.0f} s: {missing}")
            try:
                message = watcher.next(timeout=remaining)
            except TimeoutError:
                continue
            device = message.topic.split("/")[1]
            if message.payload == b"online":
                online.setdefault(device, message.received_at)
        return online

    def broker_outage(self, homes: list[Path], devices: list[str], outage_s: float) -> Comeback:
        self.broker.stop()
        time.sleep(outage_s)
        starting = time.time()
        self.broker.start()  # the same port
        returned = time.time()  # it listens
        # Subscribed before most daemons are back (mosquitto keeps no retained
        # messages across a restart here); one back sooner still shows, its
        # retained `online` arriving with the subscription.
        watcher = Subscriber(self.broker.port, "edged/+/availability")
        try:
            self.availability(watcher, devices, timeout=300)
        finally:
            watcher.close()
        back = [connected_after(home / "log", starting) - returned for home in homes]
        return Comeback(outage_s, back, len(devices))

    def stt_outage(self, daemons: int, outage_s: float) -> Comeback:
        before = len(self.stt.sessions)
        self.stt.faults.refuse_status, self.stt.faults.refuse_count = 503, 10**6
        self.stt.abort_connections()
        time.sleep(outage_s)
        self.stt.faults.refuse_count = 0
        returned = time.monotonic()
        deadline = returned + 300
        while len(self.stt.sessions) - before < daemons:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.stt.sessions) - before} of {daemons} "
                                   "STT sessions back")
            time.sleep(0.1)
        opened = [s.opened_at - returned for s in self.stt.sessions[before:before + daemons]]
        return Comeback(outage_s, opened, daemons)

    def startup(self) -> float:
        home = self.home()
        mic = FifoMic(home, speed=1.0)
        notify = NotifySocket(home / "notify.sock")
        started = time.monotonic()
        process = self.edged(home, extra_env={"NOTIFY_SOCKET": str(home / "notify.sock")})
        try:
            return notify.wait_for("READY", "1", timeout=30) - started
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
            notify.close()
            mic.stop()


Row = tuple[str, str, str, str]


def never_acknowledged_rows(run: NeverAcknowledged) -> list[Row]:
    return [
        (f"never-acknowledging broker: RSS after {run.warm_finals} / {run.finals} finals, MB",
         f"{run.rss_warm_mb:.1f} / {run.rss_end_mb:.1f}", "", ""),
        ("never-acknowledging broker: RSS growth, MB",
         f"{run.rss_end_mb - run.rss_warm_mb:+.1f}", "", ""),
        ("never-acknowledging broker: finals a second",
         f"{run.finals_per_s:.0f}", "", ""),
        ("never-acknowledging broker: transcripts the broker got / PUBACKs dropped",
         f"{run.reached_broker} / {run.pubacks_dropped}", "", ""),
    ]


def comeback_rows(name: str, comeback: Comeback) -> list[Row]:
    return [
        (f"{name}: largest share of the fleet's reconnects in one second",
         f"{comeback.largest_share_in_a_second:.0%}", "", ""),
        (f"{name}: spread, first to last reconnect, s", f"{comeback.spread_s:.1f}", "", ""),
        (f"{name}: until every daemon is back, s from the return",
         f"{comeback.all_back_s:.1f}", "", ""),
    ]


def fleet_rows(daemons: int, restart: Comeback, broker: Comeback, stt: Comeback) -> list[Row]:
    return [
        *comeback_rows(f"{daemons} daemons, broker restarted at once", restart),
        *comeback_rows(f"{daemons} daemons, broker gone {broker.outage_s:.0f} s", broker),
        *comeback_rows(f"{daemons} daemons, STT service gone {stt.outage_s:.0f} s", stt),
    ]


def print_table(rows: list[Row]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'figure'.ljust(width)} | edged | naive client | ratio |")
    print(f"|{'-' * (width + 2)}|-------|--------------|-------|")
    for name, ours, theirs, ratio in rows:
        print(f"| {name.ljust(width)} | {ours} | {theirs} | {ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher figures")
    parser.add_argument("--only", choices=["never-ack", "fleet-reconnect"],
                        help="run one scenario: never-ack, a broker that never sends PUBACK; "
                             "fleet-reconnect, 50 daemons through broker and STT outages")
    parser.add_argument("--daemons", type=int, default=50, help="fleet-reconnect: how many")
    args = parser.parse_args()
    if args.only == "fleet-reconnect":
        with tempfile.TemporaryDirectory(prefix="edged-bench-") as directory:
            bench = Bench(Path(directory))
            try:
                print(f"fleet: {args.daemons} daemons on one broker", flush=True)
                print_table(fleet_rows(args.daemons,
                                       *bench.fleet_reconnect(daemons=args.daemons)))
            finally:
                bench.close()
        return 0
    if args.only == "never-ack":
        with tempfile.TemporaryDirectory(prefix="edged-bench-") as directory:
            bench = Bench(Path(directory))
            try:
                print("never-acknowledging broker: 10,000 finals", flush=True)
                print_table(never_acknowledged_rows(bench.never_acknowledged()))
            finally:
                bench.close()
        return 0
    ab_audio_s = 300.0 if args.quick else 1200.0
    long_audio_s = 1800.0 if args.quick else 7200.0
    outage_s = 20.0 if args.quick else 60.0
    real_time_s = 20.0 if args.quick else 60.0
    speed = 20.0

    with tempfile.TemporaryDirectory(prefix="edged-bench-") as directory:
        bench = Bench(Path(directory))
        try:
            print(f"A/B: {ab_audio_s:.0f} s of audio per run at {speed:.0f}x real time", flush=True)
            edged_runs, naive_runs, edged_250 = [], [], []
            for _ in range(2):  # A/B/A/B
                edged_runs.append(bench.measure(bench.edged, ab_audio_s, speed))
                # The same capture period as the naive client, for a like-for-like figure.
                edged_250.append(bench.measure(
                    lambda home: bench.edged(home, audio={"chunk_ms": 250}), ab_audio_s, speed,
                    period_ms=250))
                # The naive client reads 4,000-frame periods: the feeder writes those.
                naive_runs.append(bench.measure(bench.naive, ab_audio_s, speed, period_ms=250))
            print("voice-activity gating: a day with 10% speech", flush=True)
            gated = bench.measure(
                lambda home: bench.edged(home, vad={"enabled": True}), ab_audio_s, speed,
                audio=sparse_speech)
            continuous = bench.measure(bench.edged, ab_audio_s, speed, audio=sparse_speech)
            # At 40x the test server cannot keep up: the run would measure a
            # backlog going to the spool, not hours of streaming.
            print(f"long run: {long_audio_s / 3600:.1f} h of audio at {speed:.0f}x", flush=True)
            long_run = bench.measure(bench.edged, long_audio_s, speed)
            print(f"real time: {real_time_s:.0f} s each, A/B/A/B", flush=True)
            edged_rt, naive_rt = [], []
            for _ in range(2):
                edged_rt.append(bench.real_time(bench.edged, real_time_s))
                naive_rt.append(bench.real_time(bench.naive, real_time_s, period_ms=250))
            print("latency, catch-up, start-up ...", flush=True)
            latencies = bench.latency(40.0 if args.quick else 120.0)
            drained, live, spoken, rss_outage = bench.catch_up(outage_s)
            startups = [bench.startup() for _ in range(3)]
            print("never-acknowledging broker: 10,000 finals", flush=True)
            never_acked = bench.never_acknowledged()
        finally:
            bench.close()

    edged_cpu = statistics.mean(r.cpu_per_audio_hour for r in edged_runs)
    naive_cpu = statistics.mean(r.cpu_per_audio_hour for r in naive_runs)
    quantiles = statistics.quantiles(latencies, n=100)
    edged_cpu_rt, edged_wakes = (statistics.mean(r[i] for r in edged_rt) for i in (0, 1))
    naive_cpu_rt, naive_wakes = (statistics.mean(r[i] for r in naive_rt) for i in (0, 1))
    rows: list[Row] = [
        ("CPU s per hour of audio", f"{edged_cpu:.1f}", f"{naive_cpu:.1f}",
         f"{edged_cpu / naive_cpu:.2f}"),
        ("  runs (A/B/A/B)", " ".join(f"{r.cpu_per_audio_hour:.1f}" for r in edged_runs),
         " ".join(f"{r.cpu_per_audio_hour:.1f}" for r in naive_runs), ""),
        ("CPU s per hour, edged with 250 ms periods like the naive client",
         f"{statistics.mean(r.cpu_per_audio_hour for r in edged_250):.1f}", f"{naive_cpu:.1f}",
         f"{statistics.mean(r.cpu_per_audio_hour for r in edged_250) / naive_cpu:.2f}"),
        ("RSS after start-up, MB", f"{edged_runs[0].rss_start_mb:.1f}",
         f"{naive_runs[0].rss_start_mb:.1f}", ""),
        (f"RSS after {long_audio_s / 3600:.1f} h of audio, MB", f"{long_run.rss_end_mb:.1f}",
         "", ""),
        (f"RSS at the end of a {outage_s:.0f} s outage (its audio held in memory), MB",
         f"{rss_outage:.1f}", "", ""),
        ("RSS growth over the long run, MB (from start-up / after the first tenth)",
         f"{long_run.rss_end_mb - long_run.rss_start_mb:+.1f} / "
         f"{long_run.rss_end_mb - long_run.rss_warm_mb:+.1f}", "", ""),
        ("real time: CPU % of one core", f"{edged_cpu_rt:.2f}", f"{naive_cpu_rt:.2f}",
         f"{edged_cpu_rt / naive_cpu_rt:.2f}"),
        ("real time: wake-ups a second, all threads", f"{edged_wakes:.1f}", f"{naive_wakes:.1f}",
         f"{edged_wakes / naive_wakes:.2f}"),
        ("final-to-MQTT latency p50 / p99, ms", f"{quantiles[49]:.1f} / {quantiles[98]:.1f}",
         "", ""),
        (f"drain a {outage_s:.0f} s backlog at 1.25x, s", f"{drained:.1f}", "", ""),
        ("live utterances during the drain, transcribed", f"{live} of {spoken}", "", ""),
        ("start-up to READY=1, s (3 runs)", " ".join(f"{s:.2f}" for s in startups), "", ""),
        ("10% speech: share of audio sent, VAD on / off",
         f"{gated.sent_share:.1%} / {continuous.sent_share:.1%}", "", ""),
        ("10% speech: CPU s per hour of audio, VAD on / off",
         f"{gated.cpu_per_audio_hour:.1f} / {continuous.cpu_per_audio_hour:.1f}", "", ""),
        ("10% speech: minutes billed per 30 days, VAD on / off",
         f"{43200 * gated.sent_share:.0f} / {43200 * continuous.sent_share:.0f}", "", ""),
        *never_acknowledged_rows(never_acked),
    ]
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
