"""The file-system side of the FUSE protocol layer: what a file system implements.

The session (session.py) decodes requests into these calls and encodes their
results; a file system never sees protocol bytes. Every method may raise
OSError, whose errno becomes the reply's error; the default for anything a
file system does not implement is ENOSYS, which the kernel remembers for most
operations and then handles itself (locks, access, copy_file_range...).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

# READ replies above this size may use buffers shared between workers: the session
# calls Operations.read_done() after each such READ.
BIG_READ = 256 * 1024


class Context(NamedTuple):
    """Who made the request."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class SetattrRequest:
    """A setattr call; fields are None when the kernel did not ask to change them.

    Under FUSE_HANDLE_KILLPRIV_V2 the file system clears set-ID bits on chown and
    truncate itself, and a request that asks for nothing is a chown(f, -1, -1)."""

    fh: int | None
    mode: int | None
    uid: int | None
    gid: int | None
    size: int | None
    atime_ns: int | None  # os.utime semantics: None = leave alone
    mtime_ns: int | None
    atime_now: bool
    mtime_now: bool
    # FATTR_KILL_SUIDGID: clear set-ID bits as a truncate (or chown) by ctx would
    kill_suidgid: bool = False


class DirEntry(NamedTuple):
    name: bytes
    ino: int
    dtype: int  # DT_* (st_mode >> 12)
    next_offset: int  # offset to resume after this entry


def _nosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


class ReadWorker(Protocol):
    """Reads the next request into a buffer, serving some READs on its own."""

    asked: bool  # the request left is a READ whose lender said it has no valid copy

    def next(self, fd: int, buf: mmap.mmap) -> int:
        """0: a request was served; -1: unmounted; else the size of the request left
        in `buf` for the session. OSError for a failed read."""
        ...


class Operations:
    """Base class; override what the file system supports."""

    def init(self, session: object) -> None:
        """Called once the kernel handshake is done."""

    def destroy(self) -> None:
        """Called when the session ends (unmount)."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        raise OSError(errno.ENOENT, "not found")

    def forget(self, nodeid: int, nlookup: int) -> None:
        pass

    def forget_many(self, pairs: Sequence[int]) -> None:
        """forget() of each (nodeid, nlookup) in `pairs`, given flat: n0, l0, n1, l1..."""
        for i in range(0, len(pairs), 2):
            self.forget(pairs[i], pairs[i + 1])

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        raise _nosys()

    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest) -> os.stat_result:
        raise _nosys()

    def readlink(self, nodeid: int) -> bytes:
        raise _nosys()

    def symlink(
        self, ctx: Context, parent: int, name: bytes, target: bytes
    ) -> tuple[int, os.stat_result]:
        raise _nosys()

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int
    ) -> tuple[int, os.stat_result]:
        raise _nosys()

    def mkdir(
        self, ctx: Context, parent: int, name: bytes, mode: int
    ) -> tuple[int, os.stat_result]:
        raise _nosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _nosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _nosys()

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        raise _nosys()

    def link(
        self, ctx: Context, nodeid: int, newparent: int, newname: bytes
    ) -> tuple[int, os.stat_result]:
        raise _nosys()

    def open(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        """Return (fh, FOPEN_* flags)."""
        raise _nosys()

    def backing_id(self, fh: int) -> int:
        """The backing id (Session.backing_open) of a handle opened with
        FOPEN_PASSTHROUGH: the kernel then reads and writes that file itself."""
        raise OSError(errno.EIO, "no backing file")

    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        kill_suidgid: bool = False,
    ) -> tuple[int, os.stat_result, int, int]:
        """Return (nodeid, stat, fh, FOPEN_* flags). `kill_suidgid`: if the file
        exists already and O_TRUNC truncates it, clear its set-ID bits as
        kill_suidgid() does."""
        raise _nosys()

    def read(
        self, nodeid: int, fh: int, offset: int, size: int, asked: bool = False
    ) -> Sequence[bytes | memoryview]:
        """`asked`: a C read path (fast_reads) already asked the lender for this READ's
        one block and got no valid copy."""
        raise _nosys()

    def read_done(self) -> None:
        """A READ of more than BIG_READ bytes by this thread is over (its reply written
        or failed): buffers it used may be reused. Called by the session."""

    def read_worker(self) -> ReadWorker | None:
        """A worker thread's reader of /dev/fuse that serves some READs itself (a C
        read path), or None: the session reads requests with readv."""
        return None

    def write(self, nodeid: int, fh: int, offset: int, data: memoryview) -> int:
        raise _nosys()

    def kill_suidgid(self, ctx: Context, nodeid: int, fh: int | None) -> None:
        """A write or truncation by `ctx`, who lacks CAP_FSETID, is about to change
        this file (FUSE_WRITE_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID): clear its
        set-user-ID bit, and its set-group-ID bit, as a local file system would. The
        session negotiates FUSE_HANDLE_KILLPRIV_V2 only with a file system that
        overrides this (which must then also clear them in setattr: SetattrRequest);
        without it the kernel clears the bits of a truncated or chowned file itself
        (with a SETATTR of the mode), but never those of a written one."""

    def flush(self, nodeid: int, fh: int) -> None:
        pass

    def release(self, nodeid: int, fh: int) -> None:
        pass

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        raise _nosys()

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        raise _nosys()

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise _nosys()

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> int:
        return 0

    def readdir(self, nodeid: int, fh: int, offset: int) -> Iterable[DirEntry]:
        raise _nosys()

    def releasedir(self, nodeid: int, fh: int) -> None:
        pass

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        raise _nosys()

    def statfs(self, nodeid: int) -> os.statvfs_result:
        raise _nosys()

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        raise _nosys()

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        raise _nosys()

    def listxattr(self, nodeid: int) -> list[bytes]:
        raise _nosys()

    def removexattr(self, nodeid: int, name: bytes) -> None:
        raise _nosys()
