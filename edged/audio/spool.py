"""The disk spool: audio kept in segment files while the STT service is away.

An SD card must not be written at 32 KB/s all day, so audio reaches the disk
only while it cannot be sent: from the moment a session is lost until the
backlog on disk has been acknowledged again. The memory ring stays the fast
path; the spool holds what it cannot.

Files live in `<state_dir>/spool/`, named `<number>.spool`. Each starts with
a header (magic, run id) and holds records of about a second:

    start sample u64 | wall time f64 | length u32 | crc32 u32 | PCM

The CRC covers the record header and its audio, so a torn write (power cut,
SIGKILL) or a corrupt sector is detected on start-up; the segment is read up
to the first bad record and the rest skipped, with a log line, never a crash.

Audio recovered from an earlier run is replayed first: it takes the start of
this run's stream time, in the order it was captured, and keeps its wall
clock for the `time` field of transcripts. A full disk degrades the spool to
nothing (memory only), reported; the size limit drops the oldest segment,
counted.
"""

from __future__ import annotations

import bisect
import logging
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edged.config import SAMPLE_RATE, SAMPLE_WIDTH

log = logging.getLogger("edged.spool")

MAGIC = b"EDGSPL01"
_FILE_HEADER = struct.Struct("<8s16s")
_RECORD = struct.Struct("<QdII")
RECORD_BYTES = SAMPLE_RATE * SAMPLE_WIDTH  # about one second per record
SEGMENT_BYTES = 32 * RECORD_BYTES  # about 32 s per file: the unit of deletion
_MAX_RECORD = 64 * RECORD_BYTES  # a length beyond this is corruption


@dataclass(frozen=True)
class Record:
    start: int  # this run's stream time
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
    records: list[Record]


class Spool:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self.dropped = 0  # samples of unacknowledged audio lost to the size limit
        self.last_error: str | None = None
        self._segments: list[_Segment] = []
        self._starts: list[int] = []  # record starts, for bisect
        self._records: list[Record] = []
        self._run_id = uuid.uuid4().bytes
        self._writer: _Writer | None = None
        self._pending = bytearray()
        self._pending_start = 0
        self._pending_wall = 0.0
        self._next_number = 1

    # -- start-up ---------------------------------------------------------------

    def recover(self, on_record: Callable[[Record], None] | None = None) -> int:
        """Load segments left by earlier runs; returns the samples recovered.

        They are laid end to end from stream time 0, earlier runs first.
        """
        if not self.enabled:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        position = 0
        run_base: dict[bytes, int] = {}
        for path in sorted(self.directory.glob("*.spool"), key=_number_of):
            segment, run_id, records = self._read_segment(path)
            if segment is None:
                continue
            for old_start, wall, offset, length in records:
                if run_id not in run_base:
                    run_base[run_id] = position - old_start
                start = old_start + run_base[run_id]
                if start < position:  # overlaps what came before: keep the first copy
                    continue
                self.dropped += start - position  # a damaged record left a hole
                record = Record(start, start + length // SAMPLE_WIDTH, wall, segment.number,
                                offset, length)
                segment.records.append(record)
                self._index(record)
                position = record.end
                if on_record is not None:
                    on_record(record)
            self._segments.append(segment)
            self._next_number = max(self._next_number, segment.number + 1)
        if position:
            log.info("spool.recovered seconds=%.1f segments=%d", position / SAMPLE_RATE,
                     len(self._segments))
        return position

    def _read_segment(
        self, path: Path
    ) -> tuple[_Segment | None, bytes, list[tuple[int, float, int, int]]]:
        records: list[tuple[int, float, int, int]] = []
        try:
            data = path.read_bytes()
        except OSError as error:
            log.warning("spool.unreadable file=%s error=%s", path.name, error.strerror)
            return None, b"", records
        if len(data) < _FILE_HEADER.size or data[:8] != MAGIC:
            log.warning("spool.corrupt file=%s reason=bad_header skipped=all", path.name)
            path.unlink(missing_ok=True)
            return None, b"", records
        _, run_id = _FILE_HEADER.unpack_from(data)
        offset = _FILE_HEADER.size
        while offset < len(data):
            problem = _check_record(data, offset)
            if problem:
                log.warning("spool.corrupt file=%s offset=%d reason=%s skipped_bytes=%d",
                            path.name, offset, problem, len(data) - offset)
                break
            start, wall, length, _ = _RECORD.unpack_from(data, offset)
            records.append((start, wall, offset + _RECORD.size, length))
            offset += _RECORD.size + length
        segment = _Segment(_number_of(path), path, offset, [])
        return segment, run_id, records

    # -- writing ----------------------------------------------------------------

    @property
    def start(self) -> int | None:
        if self._records:
            return self._records[0].start
        return self._pending_start if self._pending else None

    @property
    def end(self) -> int:
        """Stream time just after the last sample spooled (pending included)."""
        if self._pending:
            return self._pending_start + len(self._pending) // SAMPLE_WIDTH
        return self._records[-1].end if self._records else 0

    @property
    def size(self) -> int:
        return sum(segment.size for segment in self._segments)

    def append(self, start: int, data: bytes, wall: float) -> None:
        """Spool audio starting at stream sample `start` (after what is spooled)."""
        if not self.enabled or not data:
            return
        if start < self.end:  # already spooled (re-spooling after a reconnect)
            skip = (self.end - start) * SAMPLE_WIDTH
            if skip >= len(data):
                return
            data, start = data[skip:], self.end
            wall += skip / SAMPLE_WIDTH / SAMPLE_RATE
        if self._pending and start != self.end:
            self.flush()  # a gap: records are contiguous inside
        if not self._pending:
            self._pending_start, self._pending_wall = start, wall
        self._pending += data
        if len(self._pending) >= RECORD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._pending or not self.enabled:
            return
        data, start, wall = bytes(self._pending), self._pending_start, self._pending_wall
        self._pending.clear()
        try:
            self._write_record(start, wall, data)
        except OSError as error:
            self._disable(error)
            return
        self._enforce_limit()

    def _write_record(self, start: int, wall: float, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.segment.size >= SEGMENT_BYTES:
            writer = self._open_segment()
        header = _RECORD.pack(start, wall, len(data), 0)
        crc = zlib.crc32(data, zlib.crc32(header[:-4]))
        header = header[:-4] + struct.pack("<I", crc)
        writer.handle.write(header + data)
        writer.handle.flush()  # to the page cache: survives a crash of the process
        record = Record(start, start + len(data) // SAMPLE_WIDTH, wall, writer.segment.number,
                        writer.segment.size + _RECORD.size, len(data))
        writer.segment.size += _RECORD.size + len(data)
        writer.segment.records.append(record)
        self._index(record)

    def _open_segment(self) -> _Writer:
        if self._writer is not None:
            self._writer.handle.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self._next_number:08d}.spool"
        self._next_number += 1
        handle = path.open("wb")
        handle.write(_FILE_HEADER.pack(MAGIC, self._run_id))
        segment = _Segment(_number_of(path), path, _FILE_HEADER.size, [])
        self._segments.append(segment)
        self._writer = _Writer(segment, handle)
        return self._writer

    def _index(self, record: Record) -> None:
        self._records.append(record)
        self._starts.append(record.start)

    def _disable(self, error: OSError) -> None:
        self.enabled = False
        self.last_error = f"spool: {error.strerror or error}"
        log.error("spool.disabled error=%s fallback=memory", error.strerror or error)

    def _enforce_limit(self) -> None:
        while self.size > self.max_bytes and len(self._segments) > 1:
            segment = self._segments[0]
            self.dropped += sum(r.end - r.start for r in segment.records)
            log.warning("spool.full dropped_s=%.1f max_mb=%d",
                        sum(r.end - r.start for r in segment.records) / SAMPLE_RATE,
                        self.max_bytes // (1024 * 1024))
            self._remove_segment(segment)

    # -- reading and releasing --------------------------------------------------------

    def read(self, start: int, max_bytes: int) -> tuple[int, bytes]:
        """Audio from the record holding `start` (or the next one): (start, data)."""
        index = bisect.bisect_right(self._starts, start) - 1
        if index < 0:
            index = 0
        while index < len(self._records) and self._records[index].end <= start:
            index += 1
        if index >= len(self._records):
            return self._read_pending(start, max_bytes)
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
            log.warning("spool.read_failed file=%s error=%s", segment.path.name, error.strerror)
            return record.end, b""
        return start, data

    def _read_pending(self, start: int, max_bytes: int) -> tuple[int, bytes]:
        """Audio not yet in a record (the newest second) is read from memory."""
        if not self._pending or start >= self.end:
            return start, b""
        start = max(start, self._pending_start)
        skip = (start - self._pending_start) * SAMPLE_WIDTH
        return start, bytes(self._pending[skip : skip + max_bytes - max_bytes % SAMPLE_WIDTH])

    def release(self, end: int) -> None:
        """Audio before `end` is acknowledged: delete segments wholly before it."""
        while self._segments and self._segments[0] is not self._current_segment():
            segment = self._segments[0]
            if segment.records and segment.records[-1].end > end:
                break
            self._remove_segment(segment)
        if self._records and self._records[-1].end <= end and not self._pending:
            # Everything spooled is acknowledged: close the file, the backlog is gone.
            if self._writer is not None:
                self._writer.handle.close()
                self._writer = None
            for segment in list(self._segments):
                self._remove_segment(segment)

    def _current_segment(self) -> _Segment | None:
        return self._writer.segment if self._writer else None

    def _remove_segment(self, segment: _Segment) -> None:
        if self._writer is not None and self._writer.segment is segment:
            self._writer.handle.close()
            self._writer = None
        self._segments.remove(segment)
        gone = {id(record) for record in segment.records}
        kept = [record for record in self._records if id(record) not in gone]
        self._records = kept
        self._starts = [record.start for record in kept]
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("spool.unlink_failed file=%s error=%s", segment.path.name, error.strerror)

    def _segment(self, number: int) -> _Segment:
        for segment in self._segments:
            if segment.number == number:
                return segment
        raise KeyError(number)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.handle.close()
            self._writer = None


@dataclass
class _Writer:
    segment: _Segment
    handle: BinaryIO


def _number_of(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0


def _check_record(data: bytes, offset: int) -> str | None:
    if offset + _RECORD.size > len(data):
        return "truncated_header"
    _, _, length, crc = _RECORD.unpack_from(data, offset)
    if length == 0 or length > _MAX_RECORD or length % SAMPLE_WIDTH:
        return "bad_length"
    end = offset + _RECORD.size + length
    if end > len(data):
        return "truncated_audio"
    header = data[offset : offset + _RECORD.size - 4]
    if zlib.crc32(data[offset + _RECORD.size : end], zlib.crc32(header)) != crc:
        return "bad_checksum"
    return None

