"""The passthrough file system: mirrors a backing directory, reads through the cache.

Every inode the kernel knows is identified by the backing inode's file handle,
with a bounded cache of O_PATH descriptors reopened by handle (fs/inodes.py), so
renames and hard links need no path bookkeeping, operations use *at() calls or
/proc/self/fd/N paths, and the daemon holds no descriptor per known inode.

Data path: reads are served by fs/readpath.py (cache, then backing store with
O_DIRECT); writes go straight to the backing file (write-through) and drop the
cached copies of the blocks they touch. Each file's cache identity
(FileState) is keyed by the backing (st_dev, st_ino) and checked against the
backing file's size/mtime/ctime at open and getattr (close-to-open, like NFS),
so changes made outside the mount are never served stale.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memlend import native
from memlend.fs.cache import BLOCK_MASK, FILE_SHIFT, BlockCache, NoCache
from memlend.fs.fast_read import FastReads, FastWorker, why_not
from memlend.fs.inodes import Inode, PathFds, default_capacity
from memlend.fs.kernel_tier import KernelReadPath
from memlend.fs.page_dropper import PageDropper
from memlend.fs.readpath import ReadPath, remote_key
from memlend.fs.stream import Stream
from memlend.fs.written import WrittenLender
from memlend.fuse import wire
from memlend.fuse.api import Context, DirEntry, Operations, SetattrRequest
from memlend.fuse.mount import fs_type
from memlend.stats import MountStats

if TYPE_CHECKING:
    from memlend.fuse.session import Session
    from memlend.remote.tier import RemoteTier

log = logging.getLogger("memlend.fs")

STATS_XATTR = b"user.memlend.stats"
# Passthrough (the kernel tier): files opened for writing below this size, and from
# then on every open of them, are read and written by the kernel on the backing file
# itself: no round trip per write(2), and one copy of their pages (the backing file's)
# instead of two. Bigger files stay on the page cache tier, whose misses the lenders
# serve (a database file, a data set). docs/design-choices.md has the measurements.
PASSTHROUGH_MAX = 1 << 20
# Files the kernel forgot whose blocks may be on the lenders (the kernel tier): their
# identity (file id, version, digest of handle and stat), kept so that the next lookup
# finds them: 132 bytes each (an int key, one packed int; tracemalloc), so 8.3 MiB at
# most (9.5 while the dict grows), the oldest dropped first.
MAX_LENT_FILES = 65_536
_ID_BITS = 48
_ID_MASK = (1 << _ID_BITS) - 1
# Flags that make no sense (or harm) when reopening the backing inode.
_REOPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_NOFOLLOW | os.O_DIRECT)
_BIG_RANGE = 1 << 16  # above this many blocks, re-key a file instead of dropping one by one
# Known inodes beyond which the kernel is asked to forget the oldest: each costs about
# 950 bytes of resident memory (measured), so 16,384 take ~15 MiB of the 64 MiB the
# daemon may use beyond its cache.
MAX_INODES = 16_384
_PRUNE_EVERY = 512  # while over: every 512 new inodes, ask it to forget the 1,024 oldest

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_SYS_CACHESTAT = 451  # x86_64 and most others (Linux 6.5)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recent")]


_cachestat_ok = [True]


def backing_cached(fd: int) -> bool:
    """Does the backing store's page cache hold pages of `fd` (cachestat(2), 1.5 µs)?
    False where the call is missing (before Linux 6.5)."""
    if not _cachestat_ok[0]:
        return False
    c = _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(c), 0):
        _cachestat_ok[0] = ctypes.get_errno() != errno.ENOSYS
        return False
    return c.cache > 0


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# File systems whose files have no flush operation: close(2) of a descriptor of theirs
# reports nothing and does nothing a FLUSH could be for (NFS, CIFS, FUSE and f2fs do).
NO_FLUSH_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs"})


@dataclass(slots=True)
class FileState:
    """What the cache knows of one backing file."""

    file_id: int
    size: int
    mtime_ns: int
    ctime_ns: int
    version: int = 0  # bumped on every change; readers insert only if unchanged
    outside: int = 0  # changes found made outside the mount
    outside_at_open: int = 0  # `outside` when the kernel last opened it with its pages
    lent_version: int = -1  # the kernel tier: last version some blocks were lent under
    key: tuple[int, int] = (0, 0)  # (st_dev, st_ino): its entry in Passthrough._files
    passed: bool = False  # written by the kernel through passthrough: its pages are the backing's
    slot: int = 0  # the C read path's slot of this file while handles are open (fs/fast_read.py)
    slot_handles: int = 0


@dataclass(slots=True)
class Handle:
    fd: int  # the backing file opened with the caller's flags
    inode: Inode
    state: FileState
    append: bool
    readable: bool
    direct_fd: int = -1  # O_DIRECT descriptor for cached reads, opened on first read
    stream: Stream = field(default_factory=Stream)  # sequential read-ahead state
    backing: int = 0  # passthrough: the kernel's id of `fd`; reads and writes skip us
    writes: bool = False  # opened for writing
    slot: int = 0  # its file's slot in the C read path (0: none)


@dataclass(slots=True)
class IoMode:
    """How the kernel does a file's I/O now: the kernel takes every handle of an inode
    either through its page cache (cached) or through one backing file (passthrough),
    and refuses an open of the other kind while one is open (EIO)."""

    cached: int = 0  # handles open through the page cache
    passed: int = 0  # handles open in passthrough
    backing: int = 0  # the backing id they share


@dataclass(slots=True)
class DirHandle:
    fd: int
    entries: list[DirEntry] = field(default_factory=list)


class Passthrough(Operations):
    def __init__(
        self,
        backing: str,
        cache: BlockCache | NoCache,
        stats: MountStats,
        *,
        direct_io: bool = True,
        local_tier: str = "memlend",
        path_fds: int = 0,  # O_PATH descriptors kept open; 0: sized from the fd limit
        max_inodes: int = MAX_INODES,
    ) -> None:
        self.backing = backing
        self.cache = cache
        self.stats = stats
        self.bs = cache.block_size
        self.shift = self.bs.bit_length() - 1
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        self._root = Inode(
            (st.st_dev, st.st_ino), None, root_fd, None, path_fd=root_fd, nlookup=1 << 62
        )
        self._fds = PathFds(root_fd, path_fds or default_capacity(), self._stale_fd)
        # Writers of files on this device close without a FLUSH (FOPEN_NOFLUSH): one
        # round trip fewer per written file (Postmark: 6,049 of ~46,600 requests).
        self._noflush_dev = st.st_dev if fs_type(st.st_dev) in NO_FLUSH_FS else None
        self._inodes: dict[int, Inode] = {wire.ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], int] = {self._root.key: wire.ROOT_ID}
        self._files: dict[tuple[int, int], FileState] = {}
        self._by_file_id: dict[int, FileState] = {}
        self._orphans: list[int] = []  # file ids whose last block left, inode forgotten
        self._lent_files: dict[int, int] = {}  # st_ino (root's device) -> _remember_lent's
        self._handles: dict[int, Handle | DirHandle] = {}
        self._ids = itertools.count(wire.ROOT_ID + 1)
        self._fhs = itertools.count(1)
        # The C read path (fs/fast_read.py, set by the daemon before mounting): file
        # handles then carry their file's slot in their low bits.
        self.fast: FastReads | None = None
        self._slot_bits = 0
        self._file_ids = itertools.count(1)
        self._lock = threading.Lock()  # inode table, file states, handles
        self._euid = os.geteuid()
        # The kernel tier: no direct I/O, the page cache keeps the pages (kernel_tier.py).
        self.kernel_tier = local_tier == "kernel"
        reader = KernelReadPath if self.kernel_tier else ReadPath
        self.reader = reader(cache, stats, direct_io=direct_io)
        self.writeback = False  # set by the daemon when the kernel grants its writeback cache
        # Set by the daemon when the kernel grants passthrough (root, Linux 6.9+): the
        # session that registers backing files (see _io_mode).
        self.passthrough: Session | None = None
        self._session: Session | None = None  # the same, kept if passthrough is refused
        self._io: dict[tuple[int, int], IoMode] = {}
        self.dropper = PageDropper()  # the backing store's copy of written pages, later
        # Set by the daemon: called (nodeid) when open finds the backing file changed.
        self.on_outside_change: Callable[[int], None] | None = None
        # Set by the daemon: called (nodeids) to ask the kernel to forget these inodes.
        self.on_too_many: Callable[[list[int]], None] | None = None
        self.max_inodes = max_inodes
        self.remote: RemoteTier | None = None
        self.written: WrittenLender | None = None  # the kernel tier's lender of written files
        cache.on_file_gone = self._file_gone

    # ---- the remote tier ----------------------------------------------------

    def attach_remote(self, tier: RemoteTier) -> None:
        """Lend evicted blocks to `tier` and ask it before the disk."""
        self.remote = tier
        self.reader.remote = self.reader.readahead.remote = tier
        lib = native.lib
        why = why_not(lib, tier, self.kernel_tier)
        if lib is not None and not why:
            fast = FastReads(lib, tier, self.shift, self.reader.epoch, self.stats)
            self.fast = self.reader.fast = fast
            self._slot_bits = lib.SLOT_BITS
        self.stats.read_path = f"python: {why}" if why else "native (one-block lender hits in C)"
        if not self.kernel_tier:  # the kernel tier lends what it reads from disk instead
            self.cache.on_evict = self._evicted
        else:  # ...and what the kernel wrote in passthrough (fs/written.py)
            self.written = WrittenLender(tier, self.reader.epoch, self.bs, self.stats, self._lent)

    def _lent(self, state: FileState, version: int) -> None:
        """The blocks of `version` of the file went to the lenders: readers may ask."""
        with self.cache.lock:
            if state.version == version and state.lent_version != version:
                state.lent_version = version
                if self.fast is not None:
                    self.fast.sync(state)

    def _evicted(self, key: int, data: memoryview) -> None:
        # Under the cache lock, so the file's version is the one `data` belongs to.
        state = self._by_file_id.get(key >> FILE_SHIFT)
        if state is not None and self.remote is not None:
            rkey = remote_key(self.reader.epoch, state.file_id, state.version, key & BLOCK_MASK)
            self.remote.put(rkey, data)

    # ---- inodes -----------------------------------------------------------

    def _inode(self, nodeid: int) -> Inode:
        try:
            return self._inodes[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown node") from None

    def _remember(self, fd: int, st: os.stat_result) -> int:
        """Register a looked-up backing inode (consumes `fd`); return its nodeid."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            nodeid = self._by_key.get(key)
            if nodeid is None:
                state = self._files.get(key)
                if state is not None:
                    key = state.key  # one key tuple per file, not two: memory per inode
                nodeid = next(self._ids)
                self._inodes[nodeid] = self._fds.identify(key, fd)
                self._by_key[key] = nodeid
                oldest = self._oldest(nodeid)
            else:
                inode = self._inodes[nodeid]
                inode.nlookup += 1
                oldest = None
        if oldest is None:
            self._fds.adopt(inode, fd)  # saves a reopen if its descriptor was evicted
        elif oldest and self.on_too_many is not None:
            self.on_too_many(oldest)
        return nodeid

    def _oldest(self, nodeid: int) -> list[int]:
        """Over max_inodes, at every _PRUNE_EVERY-th new inode: the nodeids known the
        longest, for the kernel to forget (lock held). They move to the young end, so
        those it keeps (in use) are not asked for again at once. Oldest, not least
        recently used: no bookkeeping on every request for a bound rarely reached."""
        if len(self._inodes) <= self.max_inodes or nodeid % _PRUNE_EVERY:
            return []
        old = itertools.islice((n for n in self._inodes if n != wire.ROOT_ID), 2 * _PRUNE_EVERY)
        ids = list(old)
        for n in ids:
            self._inodes[n] = self._inodes.pop(n)
        return ids

    def _stale_fd(self, inode: Inode) -> int:
        """An O_PATH descriptor of a deleted inode (its handle is stale), taken from a
        file of it still open; ENOENT if none is."""
        with self._lock:  # held: release() cannot close h.fd meanwhile
            for h in self._handles.values():
                if isinstance(h, Handle) and h.inode is inode:
                    return os.open(_proc(h.fd), os.O_PATH | os.O_CLOEXEC)
        raise OSError(errno.ENOENT, "deleted")

    def _lookup_at(self, parent: Inode, name: bytes) -> tuple[int, os.stat_result]:
        # An inode known already (ls -l, a path walked again) is found by what a stat
        # of the name says, one system call; only a new one is opened, to identify it.
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        with self._lock:
            nodeid = self._by_key.get((st.st_dev, st.st_ino))
            if nodeid is not None:
                self._inodes[nodeid].nlookup += 1
        if nodeid is not None:
            if stat.S_ISREG(st.st_mode):
                self._validate(st)
            return nodeid, st
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        nodeid = self._remember(fd, st)
        if stat.S_ISREG(st.st_mode):
            self._validate(st, self._inodes[nodeid].handle)
        return nodeid, st

    def lookup(self, ctx: Context, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        return self._lookup_at(self._inode(parent), name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.forget_many((nodeid, nlookup))

    def forget_many(self, pairs: Sequence[int]) -> None:
        gone = []
        with self._lock:
            for i in range(0, len(pairs), 2):
                inode = self._inodes.get(pairs[i])
                if inode is None:
                    continue
                inode.nlookup -= pairs[i + 1]
                if inode.nlookup > 0:
                    continue
                del self._inodes[pairs[i]]
                del self._by_key[inode.key]
                state = self._files.get(inode.key)
                if state is not None:
                    self._drop_if_unused(state)
                if state is not None and inode.handle is not None:
                    self._remember_lent(state, inode.handle)
                gone.append(inode)
            while self._orphans:
                state = self._by_file_id.get(self._orphans.pop())
                if state is not None:
                    self._drop_if_unused(state)
        if gone:
            self._fds.drop(gone)

    def _file_gone(self, file_id: int) -> None:
        # The cache's last block of file_id left (cache lock held, so no lock of ours:
        # forget() drops the state if the kernel forgot the file). O(1), not O(files).
        state = self._by_file_id.get(file_id)
        if state is not None and state.key not in self._by_key:
            self._orphans.append(file_id)

    def _drop_if_unused(self, state: FileState) -> None:
        # A file's state outlives its inode while the cache holds its blocks, so a
        # file the kernel forgot keeps its cached data; once both are gone, so is it.
        if state.key in self._by_key or self.cache.resident(state.file_id):
            return
        if self._files.get(state.key) is state:
            del self._files[state.key]
        self._by_file_id.pop(state.file_id, None)

    def _remember_lent(self, state: FileState, handle: bytes) -> None:
        """The kernel forgot the file of `state`: if its blocks may be on the lenders,
        keep its identity so that the next lookup takes it back (under self._lock)."""
        if state.lent_version != state.version or state.key[0] != self._root.key[0]:
            return
        if state.key in self._files:  # still in use (its cached blocks)
            return
        lent = self._lent_files
        if len(lent) >= MAX_LENT_FILES:
            del lent[next(iter(lent))]
        digest = _digest(handle, state.size, state.mtime_ns, state.ctime_ns)
        lent[state.key[1]] = state.file_id | state.version << _ID_BITS | digest << 2 * _ID_BITS

    # ---- cache consistency -----------------------------------------------

    def _validate(self, st: os.stat_result, handle: bytes | None = None) -> FileState:
        """The file's cache state, its blocks dropped if the backing file changed.
        `handle`: its file handle, when the kernel has just looked it up anew."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            state = self._files.get(key)
            if state is None:
                state = self._lent_state(st, handle) or FileState(
                    next(self._file_ids), st.st_size, st.st_mtime_ns, st.st_ctime_ns, key=key
                )
                self._files[key] = state
                self._by_file_id[state.file_id] = state
                return state
        if (state.size, state.mtime_ns, state.ctime_ns) != (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ):
            state.outside += 1
            self._changed(state, 0, max(state.size, st.st_size), st)
        return state

    def _lent_state(self, st: os.stat_result, handle: bytes | None) -> FileState | None:
        """The state of a forgotten file with lent blocks, if it is the same file (its
        handle holds the inode's generation: a reused inode number is another file),
        unchanged since."""
        if not self._lent_files or handle is None or st.st_dev != self._root.key[0]:
            return None
        packed = self._lent_files.pop(st.st_ino, None)
        digest = _digest(handle, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if packed is None or packed >> 2 * _ID_BITS != digest:
            return None
        version = packed >> _ID_BITS & _ID_MASK
        return FileState(
            packed & _ID_MASK, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            version=version, lent_version=version, key=(st.st_dev, st.st_ino),
        )  # fmt: skip

    def _changed(self, state: FileState, start: int, end: int, st: os.stat_result) -> None:
        """Bytes start..end of the file changed (and it now has stat `st`): drop them.

        A size change also drops the block holding the old end of file, whose cached
        copy was short and would now read as EOF too early.
        """
        old_size = state.size
        if st.st_size != old_size:
            start = min(start, old_size, st.st_size)
            end = max(end, old_size, st.st_size)
        with self.cache.lock:
            state.version += 1
            if self.fast is not None:  # not lent at this version: C stops asking for it
                self.fast.sync(state)
            state.size, state.mtime_ns, state.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns
            if end <= start:
                return
            first, last = start >> self.shift, (end - 1) >> self.shift
            if last - first > _BIG_RANGE:
                # Cheaper to give the file a new identity; old blocks age out.
                self._by_file_id.pop(state.file_id, None)
                state.file_id = next(self._file_ids)
                self._by_file_id[state.file_id] = state
            else:
                self.cache.drop_range(state.file_id, first, last)

    def _refresh_after_write(self, h: Handle, start: int, end: int) -> None:
        self._changed(h.state, start, end, os.fstat(h.fd))

    # ---- attributes -------------------------------------------------------

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        # fstat(2) of an open file names it: its descriptor works even once unlinked.
        h = self._handles.get(fh) if fh is not None else None
        st = os.fstat(h.fd if h is not None else self._inode(nodeid).fd)
        if stat.S_ISREG(st.st_mode):
            self._validate(st)
        return st

    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest) -> os.stat_result:
        inode = self._inode(nodeid)
        h = self._handles.get(req.fh) if req.fh is not None else None
        fd = h.fd if isinstance(h, Handle) else None
        path = _proc(inode.fd)
        before = os.fstat(inode.fd)
        # Changes made outside the mount are found before ours are made; after them,
        # the file's new times are recorded as ours (_ours), not as an outside change.
        state = self._validate(before) if stat.S_ISREG(before.st_mode) else None
        if req.mode is not None:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(req.mode))
            else:
                os.chmod(path, stat.S_IMODE(req.mode))
        # Under FUSE_HANDLE_KILLPRIV_V2 the kernel turns chown(f, -1, -1) into a SETATTR
        # asking for nothing, and leaves the set-ID bits it clears to us.
        asked = (req.mode, req.uid, req.gid, req.size, req.atime_ns, req.mtime_ns)
        noop = asked == (None,) * 6 and not (req.atime_now or req.mtime_now)
        if req.uid is not None or req.gid is not None or noop:
            self._chown(ctx, inode, req, noop)
        if req.size is not None:
            if req.kill_suidgid:
                self._kill_suidgid(ctx, path if fd is None else fd)
            if fd is not None:
                os.ftruncate(fd, req.size)
            else:
                os.truncate(path, req.size)
            if state is not None:
                self._changed(state, req.size, req.size, os.fstat(inode.fd))
        if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
            self._utimens(inode, req)
        st = os.fstat(inode.fd)
        if state is not None:
            self._ours(state, st)
        return st

    def _ours(self, state: FileState, st: os.stat_result) -> None:
        """Record `st` as the file's stat after a change of our own that left its data
        alone (times, mode, owner): the next open must not take it for an outside change
        and drop the file's cached pages or blocks."""
        with self.cache.lock:
            state.size, state.mtime_ns, state.ctime_ns = st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _chown(self, ctx: Context, inode: Inode, req: SetattrRequest, noop: bool) -> None:
        path = _proc(inode.fd)
        before = os.fstat(inode.fd)
        # chown clears set-ID bits of non-directories (even root's chown). The daemon's
        # own, as root, clears all but a set-group-ID bit without group-execute.
        kill = 0
        if not stat.S_ISDIR(before.st_mode):
            kill = _setid_to_clear(ctx, before, capable=ctx.uid == 0)
        # An empty SETATTR is also how a page-cache write (the kernel tier) asks for the
        # bits to go (file_remove_privs): it must not fail for a non-owner who may write.
        # So chown(f, -1, -1) by a non-owner clears them too, where ext4 says EPERM.
        uid = -1 if req.uid is None else req.uid
        gid = -1 if req.gid is None else req.gid
        os.chown(path, uid, gid, follow_symlinks=True)
        mode = os.fstat(inode.fd).st_mode
        if mode & kill:
            os.chmod(path, stat.S_IMODE(mode) & ~kill)

    def _utimens(self, inode: Inode, req: SetattrRequest) -> None:
        now = time.time_ns()
        cur = os.fstat(inode.fd)
        atime = now if req.atime_now else req.atime_ns
        mtime = now if req.mtime_now else req.mtime_ns
        # os.utime cannot leave one of the two alone (UTIME_OMIT): keep its value.
        atime = cur.st_atime_ns if atime is None else atime
        mtime = cur.st_mtime_ns if mtime is None else mtime
        os.utime(_proc(inode.fd), ns=(atime, mtime))

    def readlink(self, nodeid: int) -> bytes:
        return os.readlink(b"", dir_fd=self._inode(nodeid).fd)

    def statfs(self, nodeid: int) -> os.statvfs_result:
        return os.fstatvfs(self._inode(nodeid).fd)

    # ---- creating names ---------------------------------------------------

    def _created(
        self, ctx: Context, parent: Inode, name: bytes, mode: int | None = None
    ) -> tuple[int, os.stat_result]:
        """Give a node we just created the caller's ownership, then look it up.

        The daemon creates as root; like a local file system, the node belongs to
        the caller, and to the parent's group when the parent is set-group-ID.
        """
        pst = os.fstat(parent.fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        if ctx.uid != self._euid or gid != os.getegid():
            os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False)
            if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
                # chown clears set-ID bits on files; the creator asked for them.
                os.chmod(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        return self._lookup_at(parent, name)

    def _undo_create(self, parent: Inode, name: bytes, is_dir: bool) -> None:
        try:
            if is_dir:
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
        except OSError:
            pass

    def mkdir(
        self, ctx: Context, parent: int, name: bytes, mode: int
    ) -> tuple[int, os.stat_result]:
        p = self._inode(parent)
        os.mkdir(name, mode, dir_fd=p.fd)
        try:
            return self._created(ctx, p, name, mode)
        except OSError:
            self._undo_create(p, name, True)
            raise

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int
    ) -> tuple[int, os.stat_result]:
        p = self._inode(parent)
        os.mknod(name, mode, rdev, dir_fd=p.fd)
        try:
            return self._created(ctx, p, name, mode)
        except OSError:
            self._undo_create(p, name, False)
            raise

    def symlink(
        self, ctx: Context, parent: int, name: bytes, target: bytes
    ) -> tuple[int, os.stat_result]:
        p = self._inode(parent)
        os.symlink(target, name, dir_fd=p.fd)
        try:
            return self._created(ctx, p, name)
        except OSError:
            self._undo_create(p, name, False)
            raise

    def link(
        self, ctx: Context, nodeid: int, newparent: int, newname: bytes
    ) -> tuple[int, os.stat_result]:
        inode, p = self._inode(nodeid), self._inode(newparent)
        os.link(_proc(inode.fd), newname, dst_dir_fd=p.fd, follow_symlinks=True)
        return self._lookup_at(p, newname)

    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        kill_suidgid: bool = False,
    ) -> tuple[int, os.stat_result, int, int]:
        p = self._inode(parent)
        flags = self._backing_flags(flags) & ~(os.O_DIRECT | os.O_NOCTTY)
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=p.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Created behind the kernel's back meanwhile: open it, it is not ours to chown.
            fd = os.open(name, flags & ~os.O_CREAT, dir_fd=p.fd)
            try:
                if kill_suidgid:  # O_TRUNC truncated it
                    self._kill_suidgid(ctx, fd)
                nodeid, st = self._lookup_at(p, name)
            except OSError:
                os.close(fd)
                raise
        else:
            try:
                nodeid, st = self._created(ctx, p, name, mode)
            except OSError:
                os.close(fd)
                self._undo_create(p, name, False)
                raise
        fh, open_flags = self._new_handle(fd, self._inodes[nodeid], st, flags, nodeid)
        return nodeid, st, fh, open_flags

    # ---- removing and renaming names --------------------------------------

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        fd = self._inode(parent).fd
        self._let_go(fd, name)
        os.unlink(name, dir_fd=fd)

    def _let_go(self, dir_fd: int, name: bytes) -> None:
        """A file about to lose a name: its descriptors waiting for a page drop are
        closed first, or they would keep a removed file's blocks allocated."""
        if self.dropper.waiting():
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                return
            self.dropper.forget((st.st_dev, st.st_ino))

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        os.rmdir(name, dir_fd=self._inode(parent).fd)

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        old, new = self._inode(parent), self._inode(newparent)
        self._let_go(new.fd, newname)  # the file a rename replaces
        if flags == 0:
            os.rename(name, newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)
            return
        _check(_libc.renameat2(old.fd, name, new.fd, newname, flags), "renameat2")

    # ---- files ------------------------------------------------------------

    def _new_handle(
        self, fd: int, inode: Inode, st: os.stat_result, flags: int, nodeid: int
    ) -> tuple[int, int]:
        version = self._files[inode.key].version if inode.key in self._files else -1
        state = self._validate(st)
        if version not in (-1, state.version) and self.on_outside_change is not None:
            # Changed behind our back: the kernel's cached size/times are stale too.
            self.on_outside_change(nodeid)
        accmode = flags & os.O_ACCMODE
        h = Handle(fd, inode, state, bool(flags & os.O_APPEND), accmode != os.O_WRONLY)
        h.writes = accmode != os.O_RDONLY
        if self.fast is not None:
            h.slot = self.fast.attach(state)
        with self._lock:
            fh = next(self._fhs) << self._slot_bits | h.slot
            self._handles[fh] = h
        # A read-only handle has nothing to flush (no written data, no deferred write
        # error, locks are the kernel's), nor has a file whose file system has no flush
        # operation: its close(2) costs no round trip.
        noflush = accmode == os.O_RDONLY or st.st_dev == self._noflush_dev
        open_flags = wire.FOPEN_NOFLUSH if noflush else 0
        if not self.kernel_tier:
            return fh, open_flags | wire.FOPEN_DIRECT_IO | wire.FOPEN_PARALLEL_DIRECT_WRITES
        if self.passthrough is not None and self._io_mode(h, st):
            return fh, open_flags | wire.FOPEN_PASSTHROUGH
        # Close-to-open: the kernel keeps the file's cached pages across this open only
        # if nothing changed it outside the mount since it cached them; otherwise it
        # drops them now (fuse_finish_open). Its own writes went through those pages.
        if state.outside != state.outside_at_open:
            state.outside_at_open = state.outside
            return fh, open_flags
        return fh, open_flags | wire.FOPEN_KEEP_CACHE

    def _io_mode(self, h: Handle, st: os.stat_result) -> bool:
        """Open `h` in passthrough? Small files (PASSTHROUGH_MAX) opened for writing or
        whose pages the backing store's page cache holds (written before, through the
        mount or not: reading them through ours would cache them twice, and an O_DIRECT
        read of a dirty page waits for its write-back), and files written so before
        (unless lent since and no longer cached: then read through the lenders),
        unless handles of the inode are open through the page cache; and every handle
        of an inode that has one open in passthrough, as the kernel requires. Set-ID
        files stay with the daemon, which clears their bits on a write by another user.
        Counts the handle in its inode's IoMode."""
        state = h.state
        small = st.st_size < PASSTHROUGH_MAX
        suits = not st.st_mode & (stat.S_ISUID | stat.S_ISGID) and (
            state.passed or (small and (h.writes or backing_cached(h.fd)))
        )
        if suits and not h.writes and state.lent_version == state.version and state.passed:
            # Written here and lent since (fs/written.py): once the backing store's
            # page cache has dropped it, the lenders serve its reads, not the disk.
            suits = backing_cached(h.fd)
        with self._lock:
            m = self._io.get(state.key)
            if m is None:
                m = self._io[state.key] = IoMode()
            want = m.passed > 0 or (m.cached == 0 and suits)
            if want and not m.backing:
                try:
                    m.backing = self.passthrough.backing_open(h.fd)  # type: ignore[union-attr]
                except OSError as e:  # a stacked backing store, no CAP_SYS_ADMIN...
                    log.warning("passthrough refused (%s): the daemon serves all I/O", e)
                    self.passthrough = None
                    want = False
            if not want:
                m.cached += 1
                return False
            m.passed += 1
            self.stats.add("passthrough_opens")
            h.backing = m.backing
            if h.writes:
                state.passed = True
        return True

    def use_passthrough(self, session: Session) -> None:
        """The kernel granted passthrough: `session` registers backing files."""
        self.passthrough = self._session = session

    def backing_id(self, fh: int) -> int:
        return self._handle(fh).backing

    def _io_release(self, h: Handle, session: Session | None) -> bool:
        """`h` is closed: its inode's IoMode, and the backing id if it was the last.
        True if `h` was the last of its file's handles in passthrough."""
        close = 0
        with self._lock:
            m = self._io.get(h.state.key)
            if m is None:
                return False
            if h.backing:
                m.passed -= 1
                if not m.passed:
                    close, m.backing = m.backing, 0
            else:
                m.cached -= 1
            if not (m.cached or m.passed):
                del self._io[h.state.key]
        if close and session is not None:
            session.backing_close(close)
        if h.backing and h.writes:
            # The kernel wrote the file behind our back: a new version (nothing lent
            # before is served again), and pages the kernel cached before are stale.
            st = os.fstat(h.fd)
            self._changed(h.state, 0, max(h.state.size, st.st_size), st)
            h.state.outside += 1
        return close != 0

    def _backing_flags(self, flags: int) -> int:
        if self.writeback:
            # The kernel may read to fill a page it writes only part of, and it places
            # appends itself (it knows the size of the file: its cache is ahead of ours).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = flags & ~os.O_ACCMODE | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def open(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        inode = self._inode(nodeid)
        flags = self._backing_flags(flags)
        fd = os.open(_proc(inode.fd), flags & _REOPEN_MASK)
        try:
            return self._new_handle(fd, inode, os.fstat(fd), flags, nodeid)
        except OSError:
            os.close(fd)
            raise

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if not isinstance(h, Handle):
            raise OSError(errno.EBADF, "bad file handle")
        return h

    def read(
        self, nodeid: int, fh: int, offset: int, size: int, asked: bool = False
    ) -> list[memoryview]:
        h = self._handles.get(fh)
        if type(h) is not Handle:  # _handle(), inline: the hot path
            raise OSError(errno.EBADF, "bad file handle")
        if h.direct_fd < 0:
            h.direct_fd = self.reader.open_for_reading(h.inode.fd, h.fd)
        return self.reader.read(
            h.direct_fd, h.state, offset, size, h.direct_fd == h.fd, h.stream, asked
        )

    def read_done(self) -> None:
        self.reader.read_done()

    def read_worker(self) -> FastWorker | None:
        return self.fast.worker() if self.fast is not None else None

    def kill_suidgid(self, ctx: Context, nodeid: int, fh: int | None) -> None:
        h = self._handles.get(fh) if fh is not None else None
        self._kill_suidgid(ctx, h.fd if isinstance(h, Handle) else _proc(self._inode(nodeid).fd))

    def _kill_suidgid(self, ctx: Context, target: int | str) -> None:
        # The kernel asks only for callers without CAP_FSETID. The daemon writes as
        # root (CAP_FSETID), so its own writes clear nothing: clear the bits here.
        st = os.stat(target)
        kill = _setid_to_clear(ctx, st, capable=False) if stat.S_ISREG(st.st_mode) else 0
        if kill:
            os.chmod(target, stat.S_IMODE(st.st_mode) & ~kill)

    def write(self, nodeid: int, fh: int, offset: int, data: memoryview) -> int:
        h = self._handle(fh)
        n = os.pwrite(h.fd, data, offset)
        if h.append:  # pwrite ignores the offset on O_APPEND files
            end = os.fstat(h.fd).st_size
            offset = end - n
        self.stats.add("writes")
        self.stats.add("write_bytes", n)
        self._refresh_after_write(h, offset, offset + n)
        return n

    def flush(self, nodeid: int, fh: int) -> None:
        h = self._handle(fh)
        # As close(2) of a dup: lets the backing store report deferred errors.
        os.close(os.dup(h.fd))

    def release(self, nodeid: int, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
        if not isinstance(h, Handle):
            return
        self.reader.readahead.close(h.stream)  # before its descriptor goes
        if h.slot:
            self.fast.detach(h.state)  # type: ignore[union-attr]
        if h.direct_fd >= 0 and h.direct_fd != h.fd:
            os.close(h.direct_fd)
        last = h.state.key in self._io and self._io_release(h, self._session)
        if h.backing:
            # Its pages are the only copy now: the kernel keeps them. Lent, if written:
            # the page cache may drop them before the next read (fs/written.py).
            if last and h.writes and self.written is not None:
                self.written.lend(h.fd, h.state, h.state.version)
            os.close(h.fd)
        elif not h.readable or h.state.version:
            # Written pages sit in the backing store's page cache: dropped once the
            # flusher has written them back (fs/page_dropper.py), not now.
            self.dropper.later(h.fd, h.state.key)
        else:
            os.close(h.fd)

    def fsync(self, nodeid: int, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        h = self._handle(fh)
        _check(_libc.fallocate(h.fd, mode, offset, length), "fallocate")
        self._refresh_after_write(h, offset, offset + length)

    def lseek(self, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return os.lseek(self._handle(fh).fd, offset, whence)

    # ---- directories ------------------------------------------------------

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> int:
        fd = os.open(_proc(self._inode(nodeid).fd), os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            fh = next(self._fhs) << self._slot_bits
            self._handles[fh] = DirHandle(fd)
        return fh

    def readdir(self, nodeid: int, fh: int, offset: int) -> list[DirEntry]:
        d = self._handles.get(fh)
        if not isinstance(d, DirHandle):
            raise OSError(errno.EBADF, "bad directory handle")
        if offset == 0:  # (re)start: take a snapshot, offsets index into it
            st = os.fstat(d.fd)
            up = os.stat(b"..", dir_fd=d.fd, follow_symlinks=False)
            names: list[tuple[bytes, int, int]] = [(b".", st.st_ino, 4), (b"..", up.st_ino, 4)]
            with os.scandir(d.fd) as it:
                for e in it:
                    names.append((os.fsencode(e.name), e.inode(), _dtype(e)))
            d.entries = [DirEntry(n, i, t, k + 1) for k, (n, i, t) in enumerate(names)]
        return d.entries[offset:]

    def releasedir(self, nodeid: int, fh: int) -> None:
        with self._lock:
            d = self._handles.pop(fh, None)
        if isinstance(d, DirHandle):
            os.close(d.fd)

    def fsyncdir(self, nodeid: int, fh: int, datasync: bool) -> None:
        d = self._handles.get(fh)
        if isinstance(d, DirHandle):
            os.fsync(d.fd)

    # ---- extended attributes ----------------------------------------------

    def stats_snapshot(self) -> dict:
        """Every counter and setting: `memlend stats --json` and the metrics endpoint."""
        stats = self.stats.as_dict()
        stats.update(inodes=len(self._inodes), inode_fds=self._fds.open_count(),
                     inode_reopens=self._fds.reopened,
                     lent_files_forgotten=len(self._lent_files))  # fmt: skip
        with self.cache.lock:
            stats["curve"] = self.cache.curve_snapshot()
        if self.remote is not None:
            stats.update(self.remote.snapshot())
            stats["remote_curve"] = self.remote.curve_snapshot(self.bs)
        return stats

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        if nodeid == wire.ROOT_ID and name == STATS_XATTR:
            return json.dumps(self.stats_snapshot()).encode()
        return os.getxattr(_proc(self._inode(nodeid).fd), name)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        os.setxattr(_proc(self._inode(nodeid).fd), name, value, flags)

    def listxattr(self, nodeid: int) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(_proc(self._inode(nodeid).fd))]

    def removexattr(self, nodeid: int, name: bytes) -> None:
        os.removexattr(_proc(self._inode(nodeid).fd), name)

    def destroy(self) -> None:
        for h in list(self._handles.values()):
            os.close(h.fd)
            if isinstance(h, Handle) and h.direct_fd >= 0 and h.direct_fd != h.fd:
                os.close(h.direct_fd)
        self._handles.clear()
        self.dropper.close()


def _digest(handle: bytes, size: int, mtime_ns: int, ctime_ns: int) -> int:
    """64 bits that tell one version of one file from another (salted per process, as
    Python's hash of bytes is: the records never outlive the daemon)."""
    return hash((handle, size, mtime_ns, ctime_ns)) & 0xFFFF_FFFF_FFFF_FFFF


def _setid_to_clear(ctx: Context, st: os.stat_result, capable: bool) -> int:
    """The set-ID bits a local file system clears when `ctx` writes, truncates or
    chowns the file (the kernel's setattr_should_drop_suidgid() and _sgid()):
    set-user-ID always; set-group-ID if group-executable, or if the caller is neither
    in the file's group nor `capable` (CAP_FSETID)."""
    mode = st.st_mode
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not (capable or _in_group(ctx, st.st_gid))):
        kill |= stat.S_ISGID
    return kill


def _in_group(ctx: Context, gid: int) -> bool:
    """Is `gid` the caller's file-system group or one of its supplementary groups?"""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass  # the caller is gone (or pid 0): say no, clearing the bit is the safe side
    return False


def _dtype(e: os.DirEntry[str]) -> int:
    if e.is_symlink():
        return 10  # DT_LNK
    if e.is_dir(follow_symlinks=False):
        return 4  # DT_DIR
    if e.is_file(follow_symlinks=False):
        return 8  # DT_REG
    return 0  # DT_UNKNOWN: the kernel stats it when asked
