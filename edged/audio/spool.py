"""The disk spool: audio kept in segment files while the STT service is away.

An SD card must not be written at 32 KB/s all day, so audio reaches the disk
only while it cannot be sent: from the moment a session is lost until the
backlog has been sent again. The memory ring stays the fast path; the spool
holds what it cannot, and what a crash, a SIGKILL or a power cut would
otherwise take.

Files live in `<state_dir>/spool/`, named `<number>.spool`. Each starts with
a header (magic, the outbox's stream id) and holds one record per capture
hand-over (whole periods reaching `stt.frame_ms`: 300 ms by default):

    "EDGR" | start sample u64 | wall time f64 | length u32 | crc32 u32 | PCM

Durability. Each record is written as it arrives (a SIGKILL loses nothing
spooled), the file is fsynced about once a second (a power cut loses at most
about a second), and the directory is fsynced when a segment is created or
removed, as Vector's disk buffer does. Nothing is written while streaming
normally.

Damage. The CRC covers each record; a torn write or a bad sector is found on
start-up. The reader resynchronises on the next record magic past a damaged
record and keeps the rest. The readable records of a damaged file are copied
into a fresh segment and the file itself is quarantined (renamed aside),
never silently deleted.

Stream time. Records carry positions in the outbox's stream, which continues
across restarts: on start, records behind the durable transcription point
are skipped (trimmed by offset), the rest replayed from exactly that point.
Records of another stream (an outbox that was lost) are copied into this
one, after everything it has.

Limits. The spool stops at `max_bytes` (dropping its oldest segment,
counted) and before the filesystem's free space falls under the reserve. A
failing disk (full, read-only, unwritable) is reported to `StorageHealth`;
audio then stays in memory only, and `retry()` tries the disk again.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from edged.config import SAMPLE_RATE, SAMPLE_WIDTH
from edged.storage import StorageHealth, describe, fsync_directory, make_directory, quarantine
from edged.untrusted import loggable

log = logging.getLogger("edged.spool")

STORE = "spool"
MAGIC = b"EDGSPL02"
RECORD_MAGIC = b"EDGR"
_FILE_HEADER = struct.Struct("<8s16s")
_RECORD = struct.Struct("<4sQdII")
SEGMENT_BYTES = 32 * SAMPLE_RATE * SAMPLE_WIDTH  # about 32 s per file: the unit of deletion
_MAX_RECORD = 64 * SAMPLE_RATE * SAMPLE_WIDTH  # a length beyond this is corruption
SYNC_INTERVAL_S = 1.0  # during an outage: at most this much audio is lost to a power cut


@dataclass(frozen=True)
class Record:
    start: int  # stream time
    end: int
    wall: float  # capture wall time of `start`
    segment: int
    offset: int  # of the audio in the file
    length: int


@dataclass
class _Segment:
    number: int
    path: Path
    size: int
    damaged: bool = False  # quarantined, not deleted, when done
    records: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class _Found:
    """A readable record in a file being recovered."""

    start: int
    wall: float
    offset: int
    length: int


class Spool:
    def __init__(self, directory: Path, max_bytes: int, health: StorageHealth | None = None,
                 keep_free_bytes: int = 64 * 1024 * 1024, keep_free_ratio: float = 0.05):
        self.directory = directory
        self.max_bytes = max_bytes
        self.health = health or StorageHealth()
        self.keep_free_bytes = keep_free_bytes
        self.keep_free_ratio = keep_free_ratio
        self.enabled = max_bytes > 0
        self.dropped = 0  # samples of unacknowledged audio lost to the limits
        self.stream_id = bytes(16)
        self._segments: list[_Segment] = []
        self._starts: list[int] = []  # record starts, for bisect
        self._records: list[Record] = []
        self._writer: _Writer | None = None
        self._next_number = 1
        self._failing = False  # the disk refused a write: memory only until retry()
        self._at_reserve = False

    @property
    def last_error(self) -> str | None:
        return self.health.reason if self.health.degraded(STORE) else None

    # -- start-up ---------------------------------------------------------------

    def recover(self, stream_id: str, transcribed: int,
                previous: tuple[str, int] | None = None) -> int:
        """Load what earlier runs left; returns the stream position after it.

        `transcribed` is the durable point of stream `stream_id`: audio
        before it is done. `previous` is (id, point) of a stream whose outbox
        was lost: its audio after its point is kept, moved into this stream.
        """
        self.stream_id = bytes.fromhex(stream_id)
        if not self.enabled:
            return transcribed
        try:
            make_directory(self.directory)
            paths = sorted(self.directory.glob("*.spool"), key=_number_of)
        except OSError as error:
            self._fail(error, "recover")
            return transcribed
        ours: list[tuple[Record, _Segment]] = []
        adopt: list[tuple[Path, bytes, list[_Found], bool]] = []  # copied into this stream
        for path in paths:
            self._next_number = max(self._next_number, _number_of(path) + 1)
            header_stream, found, damage = self._scan(path)
            if header_stream is None and not found:
                if damage and path.exists():  # nothing readable: aside, once, not every start
                    quarantine(path, "no readable record")
                continue
            if header_stream == self.stream_id:
                # Read in place, damaged or not: positions are ours already. A
                # damaged file is quarantined, not deleted, once it is done.
                segment = _Segment(_number_of(path), path, _size(path), damaged=damage)
                for item in found:
                    if item.start + item.length // SAMPLE_WIDTH > transcribed:
                        ours.append((self._record(segment, item), segment))
                self._segments.append(segment)
            else:
                adopt.append((path, header_stream or b"", found, damage))
        for record, segment in sorted(ours, key=lambda pair: pair[0].start):
            segment.records.append(record)
            if not self._records or record.start >= self._records[-1].end:
                self._index(record)
        position = max(transcribed, self._records[-1].end if self._records else 0)
        done = [segment for segment in self._segments if not segment.records]
        if done:  # wholly behind the transcription point
            self._remove_segments(done)
        if adopt:
            position = self._adopt(adopt, position, previous)
        if self._records:
            seconds = sum(r.end - r.start for r in self._records) / SAMPLE_RATE
            log.info("spool.recovered seconds=%.1f segments=%d resume_from=%.3fs", seconds,
                     len(self._segments), max(self._records[0].start, transcribed) / SAMPLE_RATE)
        return position

    def _record(self, segment: _Segment, item: _Found) -> Record:
        return Record(item.start, item.start + item.length // SAMPLE_WIDTH, item.wall,
                      segment.number, item.offset, item.length)

    def _scan(self, path: Path) -> tuple[bytes | None, list[_Found], bool]:
        """(stream id from the header, readable records, whether anything was damaged)."""
        try:
            data = path.read_bytes()
        except OSError as error:
            log.warning("spool.unreadable file=%s error=%s", loggable(path.name),
                        loggable(describe(error)))
            return None, [], True
        if len(data) <= _FILE_HEADER.size and data[: len(MAGIC)] in (MAGIC, MAGIC[: len(data)]):
            # Created and cut off before its first record: nothing in it.
            self._drop_file(path)
            return None, [], False
        stream: bytes | None = None
        damage = False
        offset = _FILE_HEADER.size
        if data[: len(MAGIC)] == MAGIC:
            stream = _FILE_HEADER.unpack_from(data)[1]
        else:
            log.warning("spool.corrupt file=%s reason=bad_header", loggable(path.name))
            damage, offset = True, 0
        found: list[_Found] = []
        while offset < len(data):
            problem = _check_record(data, offset)
            if problem is None:
                _, start, wall, length, _ = _RECORD.unpack_from(data, offset)
                found.append(_Found(start, wall, offset + _RECORD.size, length))
                offset += _RECORD.size + length
                continue
            damage = True
            resume = data.find(RECORD_MAGIC, offset + 1)
            while resume != -1 and _check_record(data, resume) is not None:
                resume = data.find(RECORD_MAGIC, resume + 1)
            skipped = (len(data) if resume == -1 else resume) - offset
            log.warning("spool.corrupt file=%s offset=%d reason=%s skipped_bytes=%d",
                        loggable(path.name), offset, problem, skipped)
            self.dropped += skipped // SAMPLE_WIDTH  # about: headers count too
            if resume == -1:
                break
            offset = resume
        return stream, found, damage

    def _adopt(self, files: list[tuple[Path, bytes, list[_Found], bool]], position: int,
               previous: tuple[str, int] | None) -> int:
        """Copy the readable records of other streams (and of files whose header
        is unreadable) into this stream, after `position`; then quarantine the
        damaged originals and remove the intact ones."""
        lost_stream = bytes.fromhex(previous[0]) if previous else None
        base: dict[bytes, int] = {}
        copied = 0
        for path, stream, found, _ in files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for item in found:
                end = item.start + item.length // SAMPLE_WIDTH
                if stream == lost_stream and previous is not None and end <= previous[1]:
                    continue  # the lost stream had transcribed it
                else:
                    if stream not in base:
                        base[stream] = position - item.start
                    start = item.start + base[stream]
                if start < position:
                    continue  # overlaps what is kept already
                audio = data[item.offset : item.offset + item.length]
                self.append(start, audio, item.wall)
                if self._failing:
                    return position  # the originals stay where they are
                position = start + len(audio) // SAMPLE_WIDTH
                copied += len(audio) // SAMPLE_WIDTH
        self.sync()
        for path, stream, _, damage in files:
            if damage:
                quarantine(path, "damaged records")
            else:
                log.info("spool.adopted file=%s from_stream=%s", loggable(path.name), stream.hex())
                self._drop_file(path)
        log.info("spool.salvaged seconds=%.1f files=%d", copied / SAMPLE_RATE, len(files))
        return position

    # -- writing ----------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """What is spooled, in stream order."""
        return self._records

    @property
    def start(self) -> int | None:
        return self._records[0].start if self._records else None

    @property
    def end(self) -> int:
        """Stream time just after the last sample spooled."""
        return self._records[-1].end if self._records else 0

    @property
    def size(self) -> int:
        return sum(segment.size for segment in self._segments)

    def append(self, start: int, data: bytes, wall: float) -> None:
        """Spool audio starting at stream sample `start` (after what is spooled)."""
        if not self.enabled or not data or self._failing:
            return
        if start < self.end:  # already spooled (re-spooling after a reconnect)
            skip = (self.end - start) * SAMPLE_WIDTH
            if skip >= len(data):
                return
            data, start = data[skip:], self.end
            wall += skip / SAMPLE_WIDTH / SAMPLE_RATE
        if not self._make_room(_RECORD.size + len(data)):
            return
        try:
            self._write_record(start, wall, data)
        except OSError as error:
            self._fail(error, "write")

    def _write_record(self, start: int, wall: float, data: bytes) -> None:
        if not self._records:  # a backlog begins: say that the card is written
            log.info("spool.writing from=%.3fs reason=untranscribed_audio_while_offline",
                     start / SAMPLE_RATE)
        writer = self._writer
        if writer is None or writer.segment.size >= SEGMENT_BYTES:
            writer = self._open_segment()
        header = _RECORD.pack(RECORD_MAGIC, start, wall, len(data), 0)
        crc = zlib.crc32(data, zlib.crc32(header[:-4]))
        record_bytes = header[:-4] + struct.pack("<I", crc) + data
        try:
            _write_all(writer.fd, record_bytes)  # in the kernel: survives a SIGKILL
        except OSError:
            # A torn record would hide the ones after it until the next start:
            # cut it off, and begin a new segment next time.
            with contextlib.suppress(OSError):
                os.ftruncate(writer.fd, writer.segment.size)
            self._close_writer()
            raise
        record = Record(start, start + len(data) // SAMPLE_WIDTH, wall, writer.segment.number,
                        writer.segment.size + _RECORD.size, len(data))
        writer.segment.size += len(record_bytes)
        writer.segment.records.append(record)
        writer.dirty = True
        self._index(record)
        if time.monotonic() - writer.synced_at >= SYNC_INTERVAL_S:
            self._sync(writer)

    def _open_segment(self) -> _Writer:
        self._close_writer()
        make_directory(self.directory)
        path = self.directory / f"{self._next_number:08d}.spool"
        self._next_number += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _FILE_HEADER.pack(MAGIC, self.stream_id))
            os.fsync(fd)
            fsync_directory(self.directory)  # the new file survives a power cut
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment = _Segment(_number_of(path), path, _FILE_HEADER.size)
        self._segments.append(segment)
        self._writer = _Writer(segment, fd, time.monotonic())
        return self._writer

    def _make_room(self, size: int) -> bool:
        """Whether `size` more bytes may be written: within `max_bytes` and the
        filesystem's free-space reserve, dropping the oldest segments if need be."""
        while True:
            over_limit = self.size + size > self.max_bytes
            reserve_short = self._reserve_short(size)
            if not over_limit and not reserve_short:
                if self._at_reserve:
                    self._at_reserve = False
                    self.health.recovered(STORE)
                return True
            if len(self._segments) > 1 or (self._segments and self._writer is None):
                self._drop_oldest("spool_max_mb" if over_limit else "keep_free")
                continue
            if not self._at_reserve:
                self._at_reserve = True
                self.health.full(STORE, "free space at the reserve: audio kept in memory only")
            return False

    def _reserve_short(self, size: int) -> bool:
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            return False  # the write itself will say what is wrong
        reserve = max(self.keep_free_bytes, int(stats.f_blocks * stats.f_frsize
                                                * self.keep_free_ratio))
        # No reserve: the disk's own "full" (ENOSPC) is the limit.
        return reserve > 0 and stats.f_bavail * stats.f_frsize - size < reserve

    def _drop_oldest(self, limit: str) -> None:
        segment = self._segments[0]
        seconds = sum(r.end - r.start for r in segment.records)
        self.dropped += seconds
        log.warning("spool.full dropped_s=%.1f limit=%s", seconds / SAMPLE_RATE, limit)
        self._remove_segments([segment])

    def _index(self, record: Record) -> None:
        self._records.append(record)
        self._starts.append(record.start)

    def _fail(self, error: OSError, doing: str) -> None:
        self._failing = True
        self.health.failed(STORE, error, doing, self.directory.parent)

    def retry(self) -> bool:
        """Try the disk again after a failure: whether it can be written now.
        The caller then puts what memory holds back on disk."""
        if not self._failing:
            return True
        try:
            make_directory(self.directory)
            probe = self.directory / ".probe"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, bytes(_RECORD.size))
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as error:
            self.health.failed(STORE, error, "retry", self.directory.parent)
            return False
        self._failing = False
        self.health.recovered(STORE)
        return True

    # -- reading and releasing --------------------------------------------------------

    def read(self, start: int, max_bytes: int) -> tuple[int, bytes]:
        """Audio from the record holding `start` (or the next one): (start, data)."""
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while index < len(self._records) and self._records[index].end <= start:
            index += 1
        if index >= len(self._records):
            return start, b""
        record = self._records[index]
        start = max(start, record.start)
        skip = (start - record.start) * SAMPLE_WIDTH
        length = min(record.length - skip, max_bytes - max_bytes % SAMPLE_WIDTH)
        segment = self._segment(record.segment)
        try:
            with segment.path.open("rb") as handle:
                handle.seek(record.offset + skip)
                data = handle.read(length)
        except OSError as error:
            log.warning("spool.read_failed file=%s error=%s", loggable(segment.path.name),
                        loggable(describe(error)))
            return record.end, b""
        return start, data

    def release(self, end: int) -> None:
        """Audio before `end` is durably transcribed: delete segments wholly before it."""
        done: list[_Segment] = []
        for segment in self._segments:
            if segment is self._current_segment() and not (
                    self._records and self._records[-1].end <= end):
                break
            if segment.records and segment.records[-1].end > end:
                break
            done.append(segment)
        if done:
            self._remove_segments(done)
            if not self._records:
                log.info("spool.emptied up_to=%.3fs", end / SAMPLE_RATE)

    def _current_segment(self) -> _Segment | None:
        return self._writer.segment if self._writer else None

    def _remove_segments(self, segments: list[_Segment]) -> None:
        for segment in segments:
            if self._writer is not None and self._writer.segment is segment:
                self._close_writer()
            self._segments.remove(segment)
        gone = {segment.number for segment in segments}
        self._records = [record for record in self._records if record.segment not in gone]
        self._starts = [record.start for record in self._records]
        for segment in segments:
            if segment.damaged:
                quarantine(segment.path, "damaged records")
            else:
                self._drop_file(segment.path)
        with contextlib.suppress(OSError):
            fsync_directory(self.directory)

    def _drop_file(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("spool.unlink_failed file=%s error=%s", loggable(path.name),
                        loggable(describe(error)))

    def _segment(self, number: int) -> _Segment:
        for segment in self._segments:
            if segment.number == number:
                return segment
        raise KeyError(number)

    def sync(self) -> None:
        """Make what is written durable now (leaving an outage, stopping)."""
        if self._writer is not None and self._writer.dirty:
            self._sync(self._writer)

    def _sync(self, writer: _Writer) -> None:
        try:
            os.fsync(writer.fd)
        except OSError as error:
            self._close_writer()
            self._fail(error, "sync")
            return
        writer.dirty = False
        writer.synced_at = time.monotonic()

    def _close_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                os.close(self._writer.fd)
            self._writer = None

    def close(self) -> None:
        self.sync()
        self._close_writer()
        if self._records:
            seconds = sum(r.end - r.start for r in self._records) / SAMPLE_RATE
            log.info("spool.kept seconds=%.1f files=%d replayed_on_next_start=true", seconds,
                     len(self._segments))


@dataclass
class _Writer:
    segment: _Segment
    fd: int
    synced_at: float
    dirty: bool = False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _number_of(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0


def _check_record(data: bytes, offset: int) -> str | None:
    if offset + _RECORD.size > len(data):
        return "truncated_header"
    magic, _, _wall, length, crc = _RECORD.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        return "bad_magic"
    if length == 0 or length > _MAX_RECORD or length % SAMPLE_WIDTH:
        return "bad_length"
    end = offset + _RECORD.size + length
    if end > len(data):
        return "truncated_audio"
    header = data[offset : offset + _RECORD.size - 4]
    if zlib.crc32(data[offset + _RECORD.size : end], zlib.crc32(header)) != crc:
        return "bad_checksum"
    return None
