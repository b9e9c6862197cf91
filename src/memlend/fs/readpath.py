"""The read path: local cache first, then the backing store with O_DIRECT.

Each FUSE worker thread owns one page-aligned buffer for replies up to BIG_READ
plus a block on each side; bigger replies borrow one from a small shared pool until
the session calls read_done(). Cached blocks are copied into the buffer
under the cache lock; misses are read from the backing store straight into
it (contiguous misses as one aligned preadv), then inserted into the cache.
The reply is one memoryview slice of that buffer: no further copies.

Race with writers: a reader notes the file's version before going to disk
and inserts what it read only if the version is unchanged afterwards, so a
block read before a concurrent write can never be cached after it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from typing import TYPE_CHECKING

from memlend.fs.cache import BLOCK_MASK, FILE_SHIFT, BlockCache
from memlend.fs.stream import STREAM_AFTER, STREAM_MIN, ReadAhead, Stream, Window
from memlend.fs.stream_gate import StreamGate
from memlend.fuse.api import BIG_READ
from memlend.stats import MountStats

if TYPE_CHECKING:
    from memlend.fs.fast_read import FastReads
    from memlend.fs.passthrough import FileState
    from memlend.remote.tier import RemoteTier

log = logging.getLogger("memlend.fs")
_REMOTE_KEY = struct.Struct(">8sQQQ")


def remote_key(epoch: bytes, file_id: int, version: int, block: int) -> bytes:
    """A block's name on the lenders: this mount run, the file, its version, the block.

    The version makes every copy lent before a change of the file unreachable, so no
    lender ever has to be told about writes (DESIGN.md invariant 1)."""
    return _REMOTE_KEY.pack(epoch, file_id, version, block)


def valid_end(lens: list[int], bs: int) -> int:
    """Where the data of a request's blocks ends: at the first short block (EOF)."""
    for i, n in enumerate(lens):
        if n < bs:
            return i * bs + n
    return len(lens) * bs


_BIG_POOL = 4  # idle big reply buffers kept (resident) for the next big reads


class ReadPath:
    def __init__(self, cache: BlockCache, stats: MountStats, *, direct_io: bool = True) -> None:
        self.cache = cache
        self.stats = stats
        self.bs = cache.block_size
        self.shift = self.bs.bit_length() - 1
        self.direct_io = direct_io
        self.max_request = 1 << 20
        self.readahead = ReadAhead(cache, stats, self.max_request, self._fill_window)
        self.gate = StreamGate()  # do streams ask the lenders? (measured)
        self.remote: RemoteTier | None = None  # set by the daemon when lenders are given
        self.fast: FastReads | None = None  # the C read path (kernel tier), set by the daemon
        self.epoch = os.urandom(8)  # this mount's run: remote keys never outlive it
        self._local = threading.local()
        self._big_pool: list[mmap.mmap] = []  # list.pop/append: atomic, no lock
        self._warned = False

    def open_for_reading(self, path_fd: int, fallback_fd: int) -> int:
        """An O_DIRECT descriptor of the backing file, or `fallback_fd` if refused."""
        if self.direct_io:
            try:
                return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                if not self._warned:
                    log.warning("backing store refuses O_DIRECT: buffered reads, pages dropped")
                    self._warned = True
        return fallback_fd

    def _map(self, reply: int) -> mmap.mmap:
        """A buffer for replies of up to `reply` bytes plus a block on each side; mmap:
        page aligned, so slices at block offsets suit O_DIRECT."""
        return mmap.mmap(-1, reply + 2 * self.bs, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def _new_buffer(self) -> memoryview:
        """This worker thread's buffer for small replies, made on its first read."""
        buf = self._local.buf = memoryview(self._map(BIG_READ))
        return buf

    def _big_buffer(self) -> memoryview:
        """A buffer for a reply above BIG_READ, from the shared pool: the kernel hands
        requests to workers in turn, so per-thread big buffers kept one MiB resident in
        every worker (16 MiB and more, measured). read_done() gives it back."""
        local = self._local
        if getattr(local, "big", None) is None:
            try:
                local.big = self._big_pool.pop()
            except IndexError:
                local.big = self._map(self.max_request)
        return memoryview(local.big)

    def reply_buffer(self, size: int) -> memoryview:
        """This thread's buffer for a reply of `size` bytes (read() inlines this: it is
        the hot path of every cached read)."""
        if size <= BIG_READ:
            try:
                return self._local.buf
            except AttributeError:
                return self._new_buffer()
        return self._big_buffer()

    def read_done(self) -> None:
        """The big reply of this thread's last read is sent: its buffer may be reused."""
        m = getattr(self._local, "big", None)
        if m is not None:
            self._local.big = None
            if len(self._big_pool) < _BIG_POOL:
                self._big_pool.append(m)  # resident: the next big read costs no faults
            else:  # its pages go back now; the map itself when the last view of it does
                m.madvise(mmap.MADV_DONTNEED)

    def read(
        self,
        fd: int,
        state: FileState,
        offset: int,
        size: int,
        buffered: bool = False,
        stream: Stream | None = None,
        asked: bool = False,
    ) -> list[memoryview]:
        # Nothing is read, nor counted as a miss, past the end of file as last seen
        # (at open, getattr, or our own write): readers probe it on every file.
        # (Plain comparisons, not min(): this is the hot path of every cached read.)
        if size > state.size - offset:
            size = state.size - offset
        if size > self.max_request:
            size = self.max_request
        if size <= 0:
            return []
        if stream is not None:
            # Stream detection, inline for the same reason. A small request that
            # continues a stream (the kernel splits unaligned buffers) neither starts
            # nor breaks one.
            if offset != stream.next:
                stream.run = 0
            elif size >= STREAM_MIN:
                stream.run += 1
            stream.next = offset + size
            if (
                stream.run >= STREAM_AFTER
                and not buffered
                and stream.lock.acquire(blocking=False)  # one request of a stream at a time
            ):
                try:
                    parts = self.readahead.serve(fd, state, offset, size, stream)
                finally:
                    stream.lock.release()
                if parts is not None:
                    return parts
        bs, shift, cache = self.bs, self.shift, self.cache
        first, last = offset >> shift, (offset + size - 1) >> shift
        if size <= BIG_READ:
            try:
                out = self._local.buf
            except AttributeError:
                out = self._new_buffer()
        else:
            out = self._big_buffer()
        start = offset - (first << shift)
        with cache.lock:
            version = state.version
            base = state.file_id << FILE_SHIFT
            if first == last:  # the common small read: one block, no lists
                n = cache.copy_one(base | first, start, start + size, out)
                if n >= 0:
                    end = min(n, start + size)
                    return [out[start:end]] if end > start else []
            else:
                lens = cache.copy_out(base, first, last, out, start, start + size)
        if first == last:  # a one-block miss, filled outside the lock
            n = self._fill_one(fd, state, version, base | first, out, buffered)
            end = min(n, start + size)
            return [out[start:end]] if end > start else []
        if -1 in lens:
            self._fill_misses(fd, state, version, base, first, lens, out, buffered)
        end = min(valid_end(lens, bs), start + size)
        return [out[start:end]] if end > start else []

    def _read_disk(self, fd: int, into: memoryview, offset: int, buffered: bool) -> int:
        n = os.preadv(fd, [into], offset)
        if buffered:  # no O_DIRECT here: keep the page cache from holding a copy
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        self.stats.add("disk_reads")
        self.stats.add("disk_read_bytes", n)
        return n

    def _fill_one(
        self, fd: int, state: FileState, version: int, key: int, out: memoryview, buffered: bool
    ) -> int:
        """_fill_misses for the commonest miss, one block: from a lender if one has it,
        else from the backing store; cached unless a write raced with us. Returns the
        block's valid length."""
        bs, block = self.bs, key & BLOCK_MASK
        n = -1
        if self.remote is not None:
            key_bytes = _REMOTE_KEY.pack(self.epoch, state.file_id, version, block)
            n = self.remote.get_one(key_bytes, out[:bs])  # -1: no lender has it
        if n < 0:
            t0 = time.monotonic()
            n = self._read_disk(fd, out[:bs], block * bs, buffered)
            if self.remote is not None:
                self.remote.disk_read_took(time.monotonic() - t0)
        if n:
            with self.cache.lock:
                if state.version == version:  # else a write raced with us: cache nothing
                    self.cache.insert(key, out[:n])
        return n

    def _ask_remote(
        self,
        file_id: int,
        version: int,
        first: int,
        lens: list[int],
        out: memoryview,
        fetched: list[tuple[int, int]],
        budget: float = 0.0,
    ) -> None:
        """Fill what the lenders hold of the missing blocks: one batch for them all
        (`budget`: RemoteTier.get_many_into's)."""
        bs, epoch = self.bs, self.epoch
        wanted = {
            remote_key(epoch, file_id, version, first + k): k for k, n in enumerate(lens) if n < 0
        }
        into = {key: out[k * bs : (k + 1) * bs] for key, k in wanted.items()}
        for key, n in self.remote.get_many_into(into, budget).items():
            k = wanted[key]
            lens[k] = n
            fetched.append((k, n))

    def _fill_window(self, fd: int, state: FileState, w: Window) -> int:
        """A read-ahead window: the blocks the lenders hold, while they deliver faster
        than the disk, and the rest from the disk. Returns the window's valid bytes."""
        first = w.offset >> self.shift
        lens = [-1] * (w.size >> self.shift)
        remote = self.remote
        if remote is not None and self.gate.ask():
            self._ask_remote_timed(state.file_id, w.version, first, lens, w.view)
        if -1 in lens:
            t0 = time.monotonic()
            read = self._read_runs(fd, first, lens, w.view, False)
            self.gate.disk_took(time.monotonic() - t0, len(read))
        return valid_end(lens, self.bs)

    def _ask_remote_timed(
        self, file_id: int, version: int, first: int, lens: list[int], out: memoryview
    ) -> None:
        """_ask_remote for a stream's request, timed per block found for the gate. The
        lenders may take as long as the disk would for these blocks: beyond that, the
        disk is the faster source anyway."""
        t0 = time.monotonic()
        got: list[tuple[int, int]] = []
        budget = self.gate.disk_block_seconds * lens.count(-1)
        self._ask_remote(file_id, version, first, lens, out, got, budget)
        self.gate.remote_took(time.monotonic() - t0, len(got))

    def _fill_misses(
        self,
        fd: int,
        state: FileState,
        version: int,
        base: int,
        first: int,
        lens: list[int],
        out: memoryview,
        buffered: bool,
    ) -> None:
        fetched: list[tuple[int, int]] = []  # (index in request, valid bytes)
        if self.remote is not None:
            self._ask_remote(state.file_id, version, first, lens, out, fetched)
        fetched += self._read_runs(fd, first, lens, out, buffered)
        if not fetched:
            return
        bs = self.bs
        with self.cache.lock:
            if state.version != version:
                return  # a write raced with us: serve what we read, cache none of it
            for k, got in fetched:
                if got:
                    self.cache.insert(base | (first + k), out[k * bs : k * bs + got])

    def _read_runs(
        self, fd: int, first: int, lens: list[int], out: memoryview, buffered: bool
    ) -> list[tuple[int, int]]:
        """Read the missing blocks (lens[k] < 0) of a request from the backing store,
        each run of them as one aligned read; fill in lens; return (index, valid bytes)
        of each block read."""
        bs = self.bs
        i, count = 0, len(lens)
        fetched: list[tuple[int, int]] = []
        while i < count:
            if lens[i] >= 0:
                i += 1
                continue
            j = i
            while j < count and lens[j] < 0:
                j += 1
            n = self._read_disk(fd, out[i * bs : j * bs], (first + i) * bs, buffered)
            for k in range(i, j):
                got = max(0, min(bs, n - (k - i) * bs))
                lens[k] = got
                fetched.append((k, got))
            if n < (j - i) * bs:  # end of file: nothing beyond is worth reading
                for k in range(j, count):
                    lens[k] = 0
                break
            i = j
        return fetched
