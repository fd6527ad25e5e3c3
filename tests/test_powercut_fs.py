"""The power-cut filesystem keeps exactly what was fsynced, and SQLite (WAL) runs on it."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.powercut_fs import PowerCutFs, _mounts_at, fsync_path

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounting a FUSE filesystem needs root and /dev/fuse")


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerCutFs]:
    with PowerCutFs(tmp_path / "mnt") as mounted:
        yield mounted


def write(path: Path, data: bytes, *, sync: bool) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        if sync:
            os.fsync(file.fileno())


def test_unsynced_new_file_vanishes(fs: PowerCutFs) -> None:
    write(fs.mountpoint / "new", b"data", sync=False)
    fsync_path(fs.mountpoint)  # the name is durable, the bytes are not
    write(fs.mountpoint / "unnamed", b"data", sync=False)

    assert fs.cut()["cuts"] == 1
    assert sorted(os.listdir(fs.mountpoint)) == ["new"]
    assert (fs.mountpoint / "new").read_bytes() == b""


def test_fsynced_file_in_unsynced_directory_vanishes(fs: PowerCutFs) -> None:
    write(fs.mountpoint / "file", b"data", sync=True)
    fs.cut()
    assert not (fs.mountpoint / "file").exists()


def test_fsynced_file_and_directory_survive_with_exactly_the_synced_bytes(
        fs: PowerCutFs) -> None:
    sub = fs.durable_mkdir("a/b")
    write(sub / "file", b"synced", sync=True)
    fsync_path(sub)
    fs.cut()
    assert (sub / "file").read_bytes() == b"synced"


def test_bytes_written_after_the_last_fsync_are_gone(fs: PowerCutFs) -> None:
    path = fs.mountpoint / "file"
    write(path, b"AAAA", sync=True)
    fsync_path(fs.mountpoint)
    with path.open("r+b") as file:
        file.write(b"BBBB")  # same size: only a fresh mtime makes the kernel drop its pages
        file.seek(0, os.SEEK_END)
        file.write(b"appended")
    assert path.read_bytes() == b"BBBBappended"  # now in the kernel's page cache too

    fs.cut()
    assert path.read_bytes() == b"AAAA"


def test_rename_without_a_directory_fsync_is_undone(fs: PowerCutFs) -> None:
    final, temporary = fs.mountpoint / "config", fs.mountpoint / "config.tmp"
    write(final, b"v1", sync=True)
    fsync_path(fs.mountpoint)
    write(temporary, b"v2", sync=True)
    os.replace(temporary, final)
    assert final.read_bytes() == b"v2"

    fs.cut()
    assert sorted(os.listdir(fs.mountpoint)) == ["config"]
    assert final.read_bytes() == b"v1"

    write(temporary, b"v2", sync=True)  # the same, done right
    os.replace(temporary, final)
    fsync_path(fs.mountpoint)
    fs.cut()
    assert sorted(os.listdir(fs.mountpoint)) == ["config"]
    assert final.read_bytes() == b"v2"


def test_the_filesystem_works_after_a_cut(fs: PowerCutFs) -> None:
    path = fs.mountpoint / "file"
    write(path, b"old", sync=True)
    fsync_path(fs.mountpoint)
    with path.open("r+b", buffering=0) as survivor:
        fs.cut()
        # A process cannot live through a power cut: its handles now fail loudly.
        with pytest.raises(OSError, match="Input/output error") as raised:
            survivor.write(b"zombie")
        assert raised.value.errno == errno.EIO

    with path.open("ab") as file:
        file.write(b"+new")
    assert path.read_bytes() == b"old+new"
    (fs.mountpoint / "dir").mkdir()
    write(fs.mountpoint / "dir" / "x", b"x", sync=True)
    fsync_path(fs.mountpoint / "dir")
    fsync_path(fs.mountpoint)
    fs.cut()
    assert (fs.mountpoint / "dir" / "x").read_bytes() == b"x"
    assert path.read_bytes() == b"old"
    assert fs.stats()["cuts"] == 2


def test_posix_metadata_links_and_open_unlinked_files(fs: PowerCutFs) -> None:
    path = fs.mountpoint / "file"
    write(path, b"content", sync=False)
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o600)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    info = path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o600)
    assert info.st_mtime_ns == 2_000_000_000

    os.link(path, fs.mountpoint / "alias")
    assert path.stat().st_nlink == 2
    assert (fs.mountpoint / "alias").stat().st_ino == info.st_ino
    write(fs.mountpoint / "other", b"replaced", sync=False)
    os.replace(fs.mountpoint / "other", fs.mountpoint / "alias")
    assert path.stat().st_nlink == 1

    with path.open("rb") as file:
        path.unlink()
        assert file.read() == b"content"
        assert os.fstat(file.fileno()).st_nlink == 0
    assert sorted(os.listdir(fs.mountpoint)) == ["alias"]  # no .fuse_hidden* left over


def test_a_full_disk_says_enospc(tmp_path: Path) -> None:
    with PowerCutFs(tmp_path / "mnt", capacity=64 * 1024) as fs:
        statvfs = os.statvfs(fs.mountpoint)
        assert statvfs.f_blocks * statvfs.f_frsize == 64 * 1024
        with pytest.raises(OSError, match="No space left") as raised:
            write(fs.mountpoint / "big", bytes(128 * 1024), sync=False)
        assert raised.value.errno == errno.ENOSPC
        fs.set_capacity(None)
        write(fs.mountpoint / "big", bytes(128 * 1024), sync=False)


# -- SQLite in WAL mode, written by a process that is killed as the power goes ----------------

WRITER = textwrap.dedent("""
    import os, sqlite3, sys, time
    path, synced, unsynced = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    fd = os.open(os.path.dirname(path), os.O_RDONLY)  # make the database's name durable
    os.fsync(fd)
    for n in range(synced):
        db.execute("INSERT INTO t VALUES (?)", (n,))
    db.execute("PRAGMA synchronous=OFF")
    for n in range(unsynced):
        db.execute("INSERT INTO t VALUES (?)", (synced + n,))
    print("ready", flush=True)
    time.sleep(60)
""")


def crash_after_writing(db: Path, synced: int, unsynced: int) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(synced), str(unsynced)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
    finally:
        writer.kill()  # SIGKILL: no clean close, no checkpoint
        writer.wait()


def rows(db: Path) -> list[int]:
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        found = [n for (n,) in connection.execute("SELECT n FROM t ORDER BY n")]
    connection.close()
    return found


def test_sqlite_wal_commits_with_synchronous_full_survive(fs: PowerCutFs) -> None:
    db = fs.durable_mkdir("state") / "outbox.db"
    crash_after_writing(db, synced=20, unsynced=0)
    fs.cut()
    assert rows(db) == list(range(20))


def test_sqlite_wal_commits_with_synchronous_off_are_lost(fs: PowerCutFs) -> None:
    db = fs.durable_mkdir("state") / "outbox.db"
    crash_after_writing(db, synced=5, unsynced=15)
    fs.cut()
    assert rows(db) == list(range(5))
    crash_after_writing(db, synced=3, unsynced=0)  # and it goes on after recovery
    fs.cut()
    assert rows(db) == [0, 0, 1, 1, 2, 2, 3, 4]


def test_sqlite_two_processes_share_locks_and_the_wal_index(fs: PowerCutFs) -> None:
    db = fs.durable_mkdir("state") / "outbox.db"
    crash_after_writing(db, synced=1, unsynced=0)
    insert = textwrap.dedent("""
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
        try:
            db.execute("INSERT INTO t VALUES (42)")
        except sqlite3.OperationalError as error:
            print(error)
        else:
            print("inserted")
    """)

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", insert, str(db)], capture_output=True,
                              text=True, check=True).stdout.strip()

    mine = sqlite3.connect(db, isolation_level=None)
    try:
        mine.execute("BEGIN IMMEDIATE")  # the WAL write lock: a POSIX lock on the -shm file
        assert other_process() == "database is locked"
        mine.execute("COMMIT")
        assert other_process() == "inserted"
        # The other process's commit reached this one through the shared-memory wal-index.
        assert mine.execute("SELECT count(*) FROM t").fetchone() == (2,)
    finally:
        mine.close()


def test_the_mount_goes_away_when_the_test_process_dies(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    orphan = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from tests.support.powercut_fs import PowerCutFs
        PowerCutFs(Path({str(mountpoint)!r})).start()
        os._exit(0)  # no stop(): the child must notice and unmount by itself
    """)
    subprocess.run([sys.executable, "-c", orphan], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 10
    while _mounts_at(mountpoint.resolve()):
        assert time.monotonic() < deadline, "stale mount left behind"
        time.sleep(0.02)
