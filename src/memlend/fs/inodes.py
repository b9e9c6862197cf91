"""Inode identities: file handles, with a bounded cache of open O_PATH descriptors.

An inode the kernel knows is identified by its file handle (name_to_handle_at(2):
a few bytes naming the inode on its file system, generation included), not by
an open descriptor, so the daemon holds no descriptor per known inode (DESIGN.md
invariant 7). Operations still work on descriptors (*at() calls, /proc/self/fd/N
paths): at most `capacity` O_PATH descriptors stay open, least recently used
first out, and an evicted one is reopened by handle (open_by_handle_at(2), which
needs CAP_DAC_READ_SEARCH and a descriptor on the same mount) when next needed.

Pinning: `Inode.fd` pins the descriptor it returns; the pin lasts until the same
thread has pinned PINS_PER_THREAD other inodes. A FUSE worker serves one request
at a time and one request uses at most three inodes, so a descriptor is never
closed under the request that uses it, and callers need no try/finally (the
passthrough's call sites stay `os.fstat(inode.fd)`). The cost: up to
threads * PINS_PER_THREAD descriptors beyond `capacity`.

A backing store without file handles (name_to_handle_at or open_by_handle_at
refused at start, e.g. some FUSE or overlay file systems, or no
CAP_DAC_READ_SEARCH) keeps the old way: one O_PATH descriptor held per known
inode, with one warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from memlend import native

log = logging.getLogger("memlend.fs")

MAX_HANDLE_SZ = 128  # bytes of f_handle the kernel may need (linux/exportfs.h)
AT_EMPTY_PATH = 0x1000
PINS_PER_THREAD = 4  # > the inodes one request uses (rename, link: 2-3)
MAX_PATH_FDS = 4096  # the cache's size when the descriptor limit allows it
_HEAD = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type
_OPEN_FLAGS = os.O_PATH | os.O_CLOEXEC

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.name_to_handle_at.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int,
]  # fmt: skip
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def _mount_fd(fd: int) -> int:
    """A descriptor open_by_handle_at accepts for the mount of directory `fd` (O_PATH
    ones it refuses with EBADF)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def name_to_handle(fd: int) -> tuple[bytes, int]:
    """(file handle, mount id) of the inode open as `fd` (any kind, O_PATH is fine)."""
    buf = ctypes.create_string_buffer(_HEAD.size + MAX_HANDLE_SZ)
    _HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}")
    size = _HEAD.unpack_from(buf)[0]
    return buf.raw[: _HEAD.size + size], mount_id.value


def open_by_handle(mount_fd: int, handle: bytes, flags: int = _OPEN_FLAGS) -> int:
    """Open the inode named by `handle` (ESTALE once it is deleted and closed)."""
    fd = _libc.open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    return fd


def close_all(fds: list[int]) -> None:
    """close(2) each of `fds`; with the C extension, the GIL released once for all."""
    if native.lib is not None and len(fds) > 1:
        native.lib.close_fds(fds)
    else:
        for fd in fds:
            os.close(fd)


def default_capacity() -> int:
    """A quarter of the descriptor limit, at most MAX_PATH_FDS: the rest is for open
    files (two descriptors each), directories, /dev/fuse and lender sockets."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_PATH_FDS
    return max(16, min(MAX_PATH_FDS, soft // 4))


@dataclass(slots=True, eq=False)  # eq=False: compared and hashed by identity
class Inode:
    key: tuple[int, int]  # (st_dev, st_ino)
    handle: bytes | None  # file handle; None: path_fd is held for the inode's life
    mount_fd: int  # a descriptor on the handle's mount (open_by_handle_at needs it)
    fds: PathFds | None  # the cache path_fd belongs to (None when handle is None)
    path_fd: int = -1  # the open O_PATH descriptor, or -1 (reopened when needed)
    pins: int = 0  # threads that may be using path_fd: eviction skips it meanwhile
    nlookup: int = 1

    @property
    def fd(self) -> int:
        """An O_PATH descriptor of the inode, open at least until this thread's request
        is done (see the module's note on pinning)."""
        if self.fds is None:
            return self.path_fd
        return self.fds.pin(self)


class PathFds:
    """The bounded LRU cache of the O_PATH descriptors of handle-identified inodes."""

    def __init__(
        self, root_fd: int, capacity: int, stale: Callable[[Inode], int] | None = None
    ) -> None:
        self.capacity = capacity
        self.lock = threading.Lock()
        self._lru: OrderedDict[Inode, None] = OrderedDict()  # unpinned are evictable
        self._local = threading.local()  # .ring: the inodes this thread pinned last
        # Called (without locks) for an inode whose handle is stale (deleted): may give
        # an O_PATH descriptor another way (an open file of it), or raise.
        self._stale = stale
        self._mounts: dict[int, int] = {}  # mount id -> a descriptor on that mount
        self._warned = False
        self.reopened = 0
        self.enabled = self._probe(root_fd)

    def _probe(self, root_fd: int) -> bool:
        mount_fd = -1
        try:
            handle, mount_id = name_to_handle(root_fd)
            mount_fd = _mount_fd(root_fd)
            os.close(open_by_handle(mount_fd, handle))
        except OSError as e:
            if mount_fd >= 0:
                os.close(mount_fd)
            log.warning("the backing store has no usable file handles (%s): one descriptor "
                        "is held per known inode, as many as the descriptor limit", e)  # fmt: skip
            return False
        self._mounts[mount_id] = mount_fd
        log.info("inodes known by file handle, at most %d of their descriptors open",
                 self.capacity)  # fmt: skip
        return True

    def identify(self, key: tuple[int, int], fd: int) -> Inode:
        """A new Inode for the inode open (O_PATH) as `fd`; it takes `fd` over."""
        if self.enabled:
            try:
                handle, mount_id = name_to_handle(fd)
                with self.lock:
                    mount_fd = self._mounts.get(mount_id)
                    if mount_fd is None:
                        # A mount inside the backing directory: one descriptor each, of
                        # its root (the first inode of it a lookup meets).
                        mount_fd = self._mounts[mount_id] = _mount_fd(fd)
            except OSError as e:
                if not self._warned:
                    log.warning("no file handle for an inode (%s): its descriptor is held", e)
                    self._warned = True
            else:
                inode = Inode(key, handle, mount_fd, self)
                self.adopt(inode, fd)
                return inode
        return Inode(key, None, -1, None, path_fd=fd)

    def adopt(self, inode: Inode, fd: int) -> None:
        """Keep `fd` (just opened, O_PATH) as the inode's cached descriptor, or close it."""
        if inode.fds is None:
            if fd != inode.path_fd:
                os.close(fd)
            return
        with self.lock:
            if inode.path_fd >= 0 or inode.nlookup <= 0:
                victims = [fd]
            else:
                inode.path_fd = fd
                self._lru[inode] = None
                victims = self._evict()
        for v in victims:
            os.close(v)

    def pin(self, inode: Inode) -> int:
        local = self._local
        try:
            ring = local.ring
        except AttributeError:
            ring = local.ring = []
        if inode in ring:  # pinned by this thread already: path_fd cannot change
            return inode.path_fd
        with self.lock:
            fd = inode.path_fd
            if fd >= 0:
                inode.pins += 1
                if inode in self._lru:
                    self._lru.move_to_end(inode)
        victims: list[int] = []
        if fd < 0:
            new = self._open(inode)  # a system call: outside the lock
            with self.lock:
                fd = inode.path_fd
                if fd >= 0:  # another thread reopened it meanwhile
                    victims.append(new)
                else:
                    fd = inode.path_fd = new
                    self._lru[inode] = None
                inode.pins += 1  # before evicting: never evict the one we return
                victims += self._evict()
        ring.append(inode)
        if len(ring) > PINS_PER_THREAD:
            self._unpin(ring.pop(0))
        for v in victims:
            os.close(v)
        return fd

    def _open(self, inode: Inode) -> int:
        assert inode.handle is not None
        try:
            fd = open_by_handle(inode.mount_fd, inode.handle)
        except OSError as e:
            if e.errno != errno.ESTALE or self._stale is None:
                raise
            fd = self._stale(inode)
        self.reopened += 1
        return fd

    def _unpin(self, inode: Inode) -> None:
        with self.lock:
            inode.pins -= 1

    def _evict(self) -> list[int]:
        """Take the least recently used unpinned descriptors beyond capacity out of the
        cache (lock held); the caller closes them once the lock is released."""
        lru, victims = self._lru, []
        for _ in range(len(lru) - self.capacity):
            inode, _ = lru.popitem(last=False)
            if inode.pins:
                lru[inode] = None  # in use: stays, at the young end
            else:
                victims.append(inode.path_fd)
                inode.path_fd = -1
        return victims

    def drop(self, inodes: Iterable[Inode]) -> None:
        """The kernel forgot `inodes`: close their descriptors now, pinned or not.

        No request can be using them: the kernel forgets an inode only once nothing
        refers to it, requests included (the same guarantee that let the daemon close
        at forget before this cache existed). A pin left in a thread's ring would
        otherwise keep a deleted file's blocks allocated until that thread moves on.
        The closes are made together, outside the lock (the last close of a deleted
        file is when its backing file system frees it)."""
        fds = []
        with self.lock:
            for inode in inodes:
                if inode.fds is not None:
                    self._lru.pop(inode, None)
                fd, inode.path_fd = inode.path_fd, -1
                if fd >= 0:
                    fds.append(fd)
        close_all(fds)

    def open_count(self) -> int:
        """Descriptors of handle-identified inodes open now (pinned ones included)."""
        return len(self._lru)
