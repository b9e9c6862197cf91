"""Read-ahead for sequential streams.

A FUSE read is synchronous: the application asks for 1 MiB, waits, asks for
the next. Served one at a time, a cold sequential read through memlend costs
the disk read *plus* the Python work and the FUSE transfer, and falls well
behind reading the backing file with O_DIRECT directly (docs/benchmarks.md).
So, once a handle has read two large, aligned, back-to-back requests, memlend
reads the next window ahead in a background thread, into one of two buffers
of that stream: the disk works on windows k+1 and k+2 while window k is sent. A
window's blocks come from the lenders instead while they deliver faster than the
disk (ReadPath._fill_window, fs/stream_gate.py). The
prefetch thread then also inserts what it read into the cache (off the
application's path); the scan-resistant policy keeps such one-pass data from
pushing out the hot set.

Consistency: a window is used only if the file's version is the one it was
read under, and its blocks are inserted only under that same check, exactly
as on the ordinary miss path.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memlend.fs.cache import FILE_SHIFT, BlockCache
from memlend.stats import MountStats

if TYPE_CHECKING:
    from memlend.fs.passthrough import FileState
    from memlend.remote.tier import RemoteTier

STREAM_MIN = 128 * 1024  # smaller requests are not worth reading ahead
STREAM_AFTER = 2  # back-to-back requests before a handle counts as a stream
DEPTH = 2  # windows read ahead: two disk reads in flight beat one (docs/benchmarks.md)
NBUF = DEPTH + 1  # and the window being sent
MAX_STREAMS = 4  # streams holding buffers at once (NBUF x max request each)


@dataclass(eq=False)
class Window:
    offset: int
    size: int
    version: int
    view: memoryview
    ready: threading.Event = field(default_factory=threading.Event)
    nbytes: int = -1  # bytes read; -1 if the read failed or was skipped


class Stream:
    """Sequential-read state of one open file handle."""

    def __init__(self) -> None:
        self.next = -1
        self.run = 0
        self.lock = threading.Lock()
        self.ahead: deque[Window] = deque()  # windows in flight, in file order
        self.maps: list[mmap.mmap] = []
        self.done: list[Future | None] = [None] * NBUF  # last task per buffer
        self.turn = 0


class ReadAhead:
    def __init__(
        self,
        cache: BlockCache,
        stats: MountStats,
        max_request: int,
        fill: Callable[[int, FileState, Window], int],
    ) -> None:
        # fill(fd, state, window) -> bytes: the window's blocks from the lenders (while
        # they are faster than the disk) and the rest from the disk (ReadPath).
        self.fill = fill
        self.remote: RemoteTier | None = None  # set with ReadPath.remote
        self.cache = cache
        self.stats = stats
        self.bs = cache.block_size
        self.shift = self.bs.bit_length() - 1
        self.max_request = max_request
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readahead")
        self._slots = threading.BoundedSemaphore(MAX_STREAMS)

    def _cached(self, base: int, block: int) -> bool:
        with self.cache.lock:
            return self.cache.has(base | block)

    def serve(
        self, fd: int, state: FileState, offset: int, size: int, stream: Stream
    ) -> list[memoryview] | None:
        """Serve a sequential request from its read-ahead window and keep DEPTH windows
        ahead in flight; None when the ordinary path should serve it (cached data, a
        request across two windows, no buffers)."""
        wsize = self.max_request  # windows are aligned: the kernel may split requests
        start = offset - offset % wsize
        if (offset + size - 1) // wsize != offset // wsize:
            return None
        ahead = stream.ahead
        while ahead and ahead[0].offset < start:
            ahead.popleft()  # windows the reader has moved past
        mine = bool(ahead) and ahead[0].offset == start
        # Without a window of its own, a request for cached data is a re-read: the cache
        # is faster than any disk, and reading ahead would only re-read it. (With one,
        # the window serves it even if its blocks reached the cache meanwhile, or the
        # read-ahead would stall every time its own inserts got there first.)
        if not mine and self._cached(state.file_id << FILE_SHIFT, offset >> self.shift):
            return None
        if not stream.maps:
            if not self._slots.acquire(blocking=False):
                return None  # too many streams already: no buffers for this one
            stream.maps = [
                mmap.mmap(-1, wsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                for _ in range(NBUF)
            ]
        if ahead and ahead[0].offset not in (start, start + wsize):
            # A jump back: start over from here. (The window right after this one is
            # where read-ahead starts while the reader is still in the window that
            # made it a stream, or in one served from the cache: keep it, or every
            # request of that window would read the windows after it again.)
            ahead.clear()
        result = None
        if ahead and ahead[0].offset == start:
            w = ahead[0]
            w.ready.wait()
            if w.nbytes >= 0 and w.version == state.version:
                lo = offset - start
                result = [w.view[lo : min(lo + size, w.nbytes)]]
                self.stats.add("local_misses")
                n = len(result[0])
                if n:
                    first, last = offset >> self.shift, (offset + n - 1) >> self.shift
                    self.cache.streamed(state.file_id << FILE_SHIFT, first, last)
        nxt = ahead[-1].offset + wsize if ahead else start + wsize
        while len(ahead) <= DEPTH and nxt < state.size:
            self._start(fd, state, nxt, wsize, stream)
            nxt += wsize
        return result

    def _start(self, fd: int, state: FileState, offset: int, size: int, stream: Stream) -> None:
        turn = stream.turn = (stream.turn + 1) % NBUF
        previous = stream.done[turn]
        if previous is not None:
            previous.result()  # that buffer may still be read by its insert
        view = memoryview(stream.maps[turn])[:size]
        w = Window(offset, size, state.version, view)
        stream.ahead.append(w)
        stream.done[turn] = self._pool.submit(self._fetch, fd, state, w)

    def _fetch(self, fd: int, state: FileState, w: Window) -> None:
        bs = self.bs
        base = state.file_id << FILE_SHIFT
        try:
            w.nbytes = self.fill(fd, state, w)
        except OSError:
            w.nbytes = -1
        finally:
            w.ready.set()
        if w.nbytes <= 0:
            return
        if self.remote is not None:  # the inserts below evict as many blocks, all lent
            self.remote.wait_for_room(-(-w.nbytes // bs), w.nbytes)
        first = w.offset >> self.shift
        with self.cache.lock:
            if state.version != w.version:
                return  # written meanwhile: what we read may be stale
            for i in range(0, w.nbytes, bs):
                key = base | (first + i // bs)
                if not self.cache.has(key):
                    self.cache.insert(key, w.view[i : min(i + bs, w.nbytes)])

    def close(self, stream: Stream) -> None:
        """Forget the stream: wait for its reads, give its buffers back."""
        for f in stream.done:
            if f is not None:
                f.result()
        stream.ahead.clear()
        if stream.maps:
            for m in stream.maps:
                m.madvise(mmap.MADV_DONTNEED)  # the pages go back now, whatever holds a view
            stream.maps = []
            self._slots.release()
