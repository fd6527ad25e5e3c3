"""An in-memory FUSE filesystem that loses, on demand, whatever was not fsynced: a power cut.

In the spirit of LazyFS (used by Jepsen), but small, in Python (mfusepy over libfuse 3), and more
pessimistic about metadata:

* a file's durable state is its bytes, mode and owner as of its last fsync/fdatasync (before any:
  empty, with the mode and owner it was created with);
* a directory's durable state is its entries as of its last fsync (FUSE fsyncdir, which
  `os.fsync(os.open(dir, os.O_RDONLY))` triggers); before any, no entries;
* `cut()` reverts every reachable directory to its durable entries and every file to its durable
  bytes, starting from the root. A file fsynced in a directory that was not is gone; a file named by
  a synced directory but never fsynced itself comes back empty; a rename not followed by an fsync of
  the directories involved is undone (a file moved between two directories may reappear in both).
  Handles opened before the cut fail with EIO afterwards (release and close still work): a process
  must not outlive a power cut, so kill it (SIGKILL) before `cut()` and start a fresh one after.

It runs in its own process (the FUSE loop cannot live inside pytest) and is driven over a socket
pair: `PowerCutFs` starts it, cuts synchronously, and unmounts. If the test process dies, the
child sees the socket close and unmounts itself; `auto_unmount` covers the child dying too.

    with PowerCutFs(tmp_path / "mnt") as fs:
        state = fs.durable_mkdir("state")      # the directory itself must survive the cut
        ... run a process on `state`, SIGKILL it ...
        fs.cut()
        ... restart it: it sees what a machine would see after a power cut ...
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

BLOCK = 4096
DEFAULT_REPORTED_SIZE = 1 << 30  # what statfs says when no capacity is set
UTIME_NOW = (1 << 30) - 1  # libfuse passes these as tv_nsec with tv_sec = 0
UTIME_OMIT = (1 << 30) - 2
# libfuse renames an open file that is unlinked or replaced to this, and unlinks it on release.
# With hard_remove it would unlink it for real, but then fstat() on it fails with ESTALE.
HIDDEN = ".fuse_hidden"


@dataclass(eq=False)
class _Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    mtime: int = field(default_factory=time.time_ns)
    ctime: int = field(default_factory=time.time_ns)
    atime: int = field(default_factory=time.time_ns)
    durable_meta: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        # Creating an inode is durable (as part of its directory entry); later chmod/chown are not.
        self.durable_meta = (self.mode, self.uid, self.gid)

    def touch(self) -> None:
        self.mtime = self.ctime = time.time_ns()


@dataclass(eq=False)
class _File(_Inode):
    data: bytearray = field(default_factory=bytearray)
    durable_data: bytes = b""
    nlink: int = 1


@dataclass(eq=False)
class _Dir(_Inode):
    entries: dict[str, _Inode] = field(default_factory=dict)
    durable_entries: dict[str, _Inode] = field(default_factory=dict)
    hidden: dict[str, _File] = field(default_factory=dict)  # unlinked but open; never durable


@dataclass(eq=False)
class _Handle:
    inode: _Inode
    stale: bool = False  # opened before a cut: the process holding it "died" with the power


def _error(code: int) -> OSError:
    # mfusepy turns an OSError into -errno for the kernel.
    return OSError(code, os.strerror(code))


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[Concatenate[PowerCutOperations, P], R]
            ) -> Callable[Concatenate[PowerCutOperations, P], R]:
    """Serialise with the control thread; the FUSE loop itself runs single-threaded."""

    def wrapper(self: PowerCutOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._mutex:
            return method(self, *args, **kwargs)

    functools.update_wrapper(wrapper, method)  # mfusepy counts create()'s parameters
    return wrapper


class PowerCutOperations:
    """The filesystem itself (mfusepy operations); runs in the child process."""

    use_ns = True  # times in integer nanoseconds (mfusepy warns otherwise)

    def __init__(self, context: Callable[[], tuple[int, int, int]],
                 capacity: int | None = None) -> None:
        self._mutex = threading.Lock()  # not `lock`: mfusepy would take it for the FUSE op
        self._context = context  # (uid, gid, pid) of the calling process
        self.capacity = capacity
        self.cuts = 0
        self._next_ino = 2
        self._root = _Dir(1, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    # -- helpers -----------------------------------------------------------------------------

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino - 1

    def _resolve(self, path: str | None) -> _Inode:
        if path is None:  # libfuse lost track of the name (it does not hide directories)
            raise _error(errno.ENOENT)
        node: _Inode = self._root
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, _Dir):
                raise _error(errno.ENOTDIR)
            child = node.entries.get(part, node.hidden.get(part))
            if child is None:
                raise _error(errno.ENOENT)
            node = child
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._resolve(head)
        if not isinstance(parent, _Dir):
            raise _error(errno.ENOTDIR)
        return parent, name

    def _node(self, path: str | None, fh: int | None) -> _Inode:
        if fh:  # a handle wins over the path, which may have been renamed since
            return self._handle(fh).inode
        return self._resolve(path)

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise _error(errno.EBADF)
        if handle.stale:
            raise _error(errno.EIO)
        return handle

    def _file(self, path: str | None, fh: int | None) -> _File:
        node = self._node(path, fh)
        if not isinstance(node, _File):
            raise _error(errno.EISDIR)
        return node

    def _open(self, inode: _Inode) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(inode)
        return fh

    def _files(self) -> Iterator[_File]:
        """Every file that holds data, including unlinked ones still open (hidden)."""
        seen: set[int] = set()
        stack: list[_Inode] = [self._root]
        while stack:
            node = stack.pop()
            if node.ino in seen:
                continue
            seen.add(node.ino)
            if isinstance(node, _Dir):
                stack.extend([*node.entries.values(), *node.hidden.values()])
            elif isinstance(node, _File):
                yield node

    def used(self) -> int:
        return sum(len(f.data) for f in self._files())

    def _resize(self, node: _File, size: int) -> None:
        grow = size - len(node.data)
        if grow > 0 and self.capacity is not None and self.used() + grow > self.capacity:
            raise _error(errno.ENOSPC)
        if grow > 0:
            node.data.extend(bytes(grow))
        else:
            del node.data[size:]
        node.touch()

    def _link(self, parent: _Dir, name: str, inode: _Inode) -> None:
        if name in parent.entries:
            raise _error(errno.EEXIST)
        parent.entries[name] = inode
        parent.touch()

    # -- power cut ---------------------------------------------------------------------------

    def cut(self) -> None:
        """Revert to the durable state; the caller holds the lock."""
        self.cuts += 1
        for handle in self._handles.values():
            handle.stale = True
        now = time.time_ns()
        links: dict[int, int] = {}
        files: list[_File] = []
        seen: set[int] = set()
        stack: list[_Dir] = [self._root]
        while stack:
            directory = stack.pop()
            if directory.ino in seen:
                continue
            seen.add(directory.ino)
            directory.entries = dict(directory.durable_entries)
            directory.hidden.clear()  # their handles are stale; release() is all that can come
            directory.mode, directory.uid, directory.gid = directory.durable_meta
            directory.mtime = directory.ctime = now
            for child in directory.entries.values():
                if isinstance(child, _Dir):
                    stack.append(child)
                elif isinstance(child, _File):
                    if child.ino not in links:
                        files.append(child)
                    links[child.ino] = links.get(child.ino, 0) + 1
        for file in files:
            file.data = bytearray(file.durable_data)
            file.mode, file.uid, file.gid = file.durable_meta
            file.nlink = links[file.ino]
            # A new mtime makes the kernel drop cached pages of the file (auto_inval_data), even
            # if its size is unchanged: the page cache must not serve bytes the cut took away.
            file.mtime = file.ctime = now

    @_locked
    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request from the control socket: cut, stats or capacity."""
        op = request.get("op")
        if op == "cut":
            self.cut()
        elif op == "capacity":
            self.capacity = request.get("bytes")
        elif op != "stats":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "cuts": self.cuts, "used": self.used(), "capacity": self.capacity}

    # -- FUSE operations (names and signatures are mfusepy's) -------------------------------

    @_locked
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        node = self._handles[fh].inode if fh in self._handles else self._resolve(path)
        if isinstance(node, _File):
            size, nlink = len(node.data), node.nlink
        else:
            assert isinstance(node, _Dir)
            size = BLOCK
            nlink = 2 + sum(isinstance(c, _Dir) for c in node.entries.values())
        return {
            "st_ino": node.ino, "st_mode": node.mode, "st_nlink": nlink,
            "st_uid": node.uid, "st_gid": node.gid, "st_size": size,
            "st_blocks": (size + 511) // 512, "st_blksize": BLOCK,
            "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime,
        }

    @_locked
    def access(self, path: str, amode: int) -> int:
        self._resolve(path)  # permissions: the kernel checks them (default_permissions)
        return 0

    @_locked
    def statfs(self, path: str) -> dict[str, int]:
        total = (self.capacity if self.capacity is not None else DEFAULT_REPORTED_SIZE) // BLOCK
        free = max(0, total - (self.used() + BLOCK - 1) // BLOCK)
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": total, "f_bfree": free,
                "f_bavail": free, "f_files": 1 << 20, "f_ffree": 1 << 20, "f_favail": 1 << 20,
                "f_namemax": 255}

    @_locked
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        uid, gid, _ = self._context()
        self._link(parent, name, _Dir(self._new_ino(), stat.S_IFDIR | (mode & 0o7777), uid, gid))
        return 0

    @_locked
    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise _error(errno.ENOENT)
        if not isinstance(node, _Dir):
            raise _error(errno.ENOTDIR)
        if node.entries:
            raise _error(errno.ENOTEMPTY)
        del parent.entries[name]
        parent.touch()
        return 0

    @_locked
    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        if parent.hidden.pop(name, None) is None:  # else: the last close of an unlinked file
            self._unlink(parent, name)
        return 0

    def _unlink(self, parent: _Dir, name: str) -> _File:
        node = parent.entries.get(name)
        if node is None:
            raise _error(errno.ENOENT)
        if not isinstance(node, _File):
            raise _error(errno.EISDIR)
        del parent.entries[name]
        node.nlink -= 1
        node.ctime = time.time_ns()
        parent.touch()
        return node

    @_locked
    def link(self, target: str, source: str) -> int:
        """Hard link: `target` becomes another name of `source`."""
        node = self._resolve(source)
        if not isinstance(node, _File):
            raise _error(errno.EPERM)
        parent, name = self._parent(target)
        self._link(parent, name, node)
        node.nlink += 1
        node.ctime = time.time_ns()
        return 0

    @_locked
    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        node = old_parent.entries.get(old_name)
        if node is None:
            raise _error(errno.ENOENT)
        if new_name.startswith(HIDDEN) and isinstance(node, _File):
            # An unlink, as far as readdir, nlink and a cut can tell.
            new_parent.hidden[new_name] = self._unlink(old_parent, old_name)
            return 0
        victim = new_parent.entries.get(new_name)
        if victim is node:
            return 0  # two names of one file: POSIX says do nothing
        if victim is not None:
            if isinstance(victim, _Dir):
                if not isinstance(node, _Dir):
                    raise _error(errno.EISDIR)
                if victim.entries:
                    raise _error(errno.ENOTEMPTY)
            elif isinstance(node, _Dir):
                raise _error(errno.ENOTDIR)
            elif isinstance(victim, _File):
                victim.nlink -= 1
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        old_parent.touch()
        new_parent.touch()
        node.ctime = time.time_ns()
        return 0

    @_locked
    def chmod(self, path: str | None, mode: int) -> int:
        node = self._resolve(path)
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        node.ctime = time.time_ns()
        return 0

    @_locked
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        node = self._resolve(path)
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        node.ctime = time.time_ns()
        return 0

    @_locked
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        node = self._resolve(path)
        now = time.time_ns()
        atime, mtime = times or (UTIME_NOW, UTIME_NOW)
        if atime != UTIME_OMIT:
            node.atime = now if atime == UTIME_NOW else atime
        if mtime != UTIME_OMIT:
            node.mtime = now if mtime == UTIME_NOW else mtime
        node.ctime = now
        return 0

    @_locked
    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is not None:  # the kernel usually opens instead, but a race can land here
            if flags & os.O_EXCL:
                raise _error(errno.EEXIST)
            if not isinstance(node, _File):
                raise _error(errno.EISDIR)
            if flags & os.O_TRUNC:
                self._resize(node, 0)
            return self._open(node)
        uid, gid, _ = self._context()
        node = _File(self._new_ino(), stat.S_IFREG | (mode & 0o7777), uid, gid)
        self._link(parent, name, node)
        return self._open(node)

    @_locked
    def open(self, path: str, flags: int) -> int:
        node = self._resolve(path)
        if flags & os.O_TRUNC and isinstance(node, _File):  # libfuse 3 has atomic_o_trunc on
            self._resize(node, 0)
        return self._open(node)

    @_locked
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return bytes(self._file(path, fh).data[offset:offset + size])

    @_locked
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._file(path, fh)
        end = offset + len(data)
        if end > len(node.data):
            self._resize(node, end)
        node.data[offset:end] = data
        node.touch()
        return len(data)

    @_locked
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._resize(self._file(path, fh), length)
        return 0

    @_locked
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        if mode != 0:  # punching holes and friends: glibc's posix_fallocate falls back itself
            raise _error(errno.EOPNOTSUPP)
        node = self._file(path, fh)
        if offset + size > len(node.data):
            self._resize(node, offset + size)
        return 0

    @_locked
    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close() makes nothing durable

    @_locked
    def release(self, path: str | None, fh: int) -> int:
        self._handles.pop(fh, None)
        return 0

    @_locked
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._file(path, fh)
        node.durable_data = bytes(node.data)
        node.durable_meta = (node.mode, node.uid, node.gid)
        return 0

    @_locked
    def opendir(self, path: str) -> int:
        node = self._resolve(path)
        if not isinstance(node, _Dir):
            raise _error(errno.ENOTDIR)
        return self._open(node)

    @_locked
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        node = self._node(path, fh)
        assert isinstance(node, _Dir)
        return [(".", {"st_mode": node.mode}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0)] + [
            (name, {"st_mode": child.mode, "st_ino": child.ino}, 0)
            for name, child in node.entries.items()]

    @_locked
    def releasedir(self, path: str | None, fh: int) -> int:
        self._handles.pop(fh, None)
        return 0

    @_locked
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        assert isinstance(node, _Dir)
        node.durable_entries = dict(node.entries)
        node.durable_meta = (node.mode, node.uid, node.gid)
        return 0


# -- the child process -------------------------------------------------------------------------


def _unmount(mountpoint: str, *, lazy: bool) -> bool:
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False).returncode == 0


def _serve_control(sock: socket.socket, fs: PowerCutOperations, mountpoint: str) -> None:
    with sock, sock.makefile("rwb") as stream:
        for line in stream:
            try:
                reply = fs.control(json.loads(line))
            except Exception as exc:  # report it to the test rather than die silently
                reply = {"ok": False, "error": repr(exc)}
            stream.write(json.dumps(reply).encode() + b"\n")
            stream.flush()
    # The other end closed: stop() ran, or the test process died. Either way, do not outlive it.
    _unmount(mountpoint, lazy=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--capacity", type=int, default=None, help="bytes; ENOSPC beyond")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="powercut_fs: %(levelname)s %(message)s")

    import mfusepy  # type: ignore[import-untyped]  # here, not at the top: only the child needs libfuse

    fs = PowerCutOperations(mfusepy.fuse_get_context, capacity=args.capacity)
    control = socket.socket(fileno=args.control_fd)
    threading.Thread(target=_serve_control, args=(control, fs, args.mountpoint),
                     daemon=True).start()
    mfusepy.FUSE(
        fs, args.mountpoint, foreground=True,
        nothreads=True,  # one FUSE thread; `lock` only guards against the control thread
        fsname="powercut", subtype="powercut",
        allow_other=True,  # a daemon under test may run as another user
        default_permissions=True,  # the kernel checks modes and owners
        auto_unmount=True,  # fusermount3 unmounts even if this process is killed
        use_ino=True,  # st_ino is ours, so hard links share it
        # The kernel must not answer from its own caches after a cut: no cached names, negative
        # lookups or attributes. Page cache is dropped on open (no kernel_cache) and when
        # size/mtime change (auto_inval_data).
        entry_timeout=0, negative_timeout=0, attr_timeout=0,
    )


# -- the test side -----------------------------------------------------------------------------


def _mounts_at(mountpoint: Path) -> int:
    """How many mounts sit on this path (mountinfo escapes spaces and such as octal)."""
    target = str(mountpoint)
    count = 0
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split(" ")[4])
        count += point == target
    return count


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (for a directory, this makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PowerCutFs:
    """A mounted `PowerCutOperations` in a child process, for tests.

    `start()` waits for the mount; `cut()` returns once the revert is done; `stop()` (also on
    leaving the `with` block) unmounts and never leaves a stale mount behind.
    """

    def __init__(self, mountpoint: Path, *, capacity: int | None = None,
                 timeout: float = 10.0) -> None:
        self.mountpoint = Path(os.path.realpath(mountpoint))
        self.capacity = capacity
        self.timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._stream: Any = None
        self._mounts_before = 0
        self._lock = threading.Lock()

    def __enter__(self) -> PowerCutFs:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> PowerCutFs:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._mounts_before = _mounts_at(self.mountpoint)
        ours, theirs = socket.socketpair()
        # -P: tests/support must not shadow the standard library when run as a script.
        command = [sys.executable, "-P", str(Path(__file__).resolve()), str(self.mountpoint),
                   "--control-fd", str(theirs.fileno())]
        if self.capacity is not None:
            command += ["--capacity", str(self.capacity)]
        # Own session: a Ctrl-C meant for pytest must not unmount before the fixtures clean up.
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        ours.settimeout(self.timeout)
        self._control, self._stream = ours, ours.makefile("rwb")
        deadline = time.monotonic() + self.timeout
        while _mounts_at(self.mountpoint) <= self._mounts_before:
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with {code}" if code is not None else f"not up in {self.timeout}s"
                raise RuntimeError(f"powercut_fs on {self.mountpoint}: {why} (stderr above)")
            time.sleep(0.01)
        os.stat(self.mountpoint)  # blocks until the FUSE loop has answered the kernel's INIT
        self.stats()
        return self

    def _request(self, **request: Any) -> dict[str, Any]:
        if self._stream is None:
            raise RuntimeError("powercut_fs is not running")
        with self._lock:
            self._stream.write(json.dumps(request).encode() + b"\n")
            self._stream.flush()
            line = self._stream.readline()
        if not line:
            raise RuntimeError("powercut_fs closed its control socket (did it crash?)")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"powercut_fs: {reply['error']}")
        return reply

    def cut(self) -> dict[str, Any]:
        """Lose everything not made durable; returns the stats after the cut."""
        return self._request(op="cut")

    def stats(self) -> dict[str, Any]:
        """{"cuts": how many so far, "used": bytes in files, "capacity": bytes or None}."""
        return self._request(op="stats")

    def set_capacity(self, capacity: int | None) -> None:
        """Writes that would grow the data past `capacity` bytes fail with ENOSPC."""
        self._request(op="capacity", bytes=capacity)

    def durable_mkdir(self, relative: str) -> Path:
        """mkdir -p inside the mount, each level fsynced so that it survives cuts."""
        path = self.mountpoint
        for part in Path(relative).parts:
            if not (path / part).exists():
                (path / part).mkdir()
                fsync_path(path / part)
                fsync_path(path)
            path = path / part
        return path

    def stop(self) -> None:
        idle = _mounts_at(self.mountpoint) <= self._mounts_before or \
            _unmount(str(self.mountpoint), lazy=False)
        if not idle:  # busy: detach it now; the child would serve its users until they leave
            _unmount(str(self.mountpoint), lazy=True)
        for closable in (self._stream, self._control):
            if closable is not None:
                closable.close()  # the child also unmounts when it sees this
        self._stream = self._control = None
        if self._process is not None:
            try:
                self._process.wait(self.timeout if idle else 1.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        deadline = time.monotonic() + self.timeout
        while _mounts_at(self.mountpoint) > self._mounts_before:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
                break
            time.sleep(0.01)


if __name__ == "__main__":
    main()
