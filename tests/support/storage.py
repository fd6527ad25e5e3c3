"""Real storage faults: a small tmpfs that fills up, a read-only bind mount,
files owned by somebody else. Mounting needs root (CI runs as root); tests
skip with that reason otherwise."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534  # uid and gid of nobody/nogroup


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root (CI runs as root)")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True)
    if result.returncode != 0:  # busy (a daemon killed a moment ago): detach it
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A real tmpfs of `size_kb` mounted at `path`."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem holding `path` to the brim (less `leave_bytes`)."""
    filler = path / "filler"
    with filler.open("wb") as handle:
        chunk = bytes(64 * 1024)
        with contextlib.suppress(OSError):
            while True:
                stats = os.statvfs(path)
                room = stats.f_bavail * stats.f_frsize - leave_bytes
                if room <= 0:
                    break
                handle.write(chunk[: min(len(chunk), room)])
                handle.flush()
    return filler


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` bound onto itself read-only: what ext4 does after errors."""
    need_root()
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _umount(path)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)
    os.lchown(path, uid, gid)
