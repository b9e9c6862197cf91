"""The read path when the kernel page cache is memlend's first tier (--local-tier kernel).

The mount then does not use direct I/O: the kernel keeps the hot pages and serves
their hits itself (about 1 µs, against about 14 µs through memlend's own cache), and
only its misses reach the daemon. memlend keeps no block of its own: a miss is
asked of the lenders, and what they do not hold is read from the backing store with
O_DIRECT (so the backing file system's page cache holds no second copy). Every block
read from the disk is lent: the kernel does not tell user space what it evicts, but in
steady state what is read equals what is evicted, so this is the put rate of Puma's
eviction hook. A block read back from a lender is not sent again (inclusive).

Lent copies are named by the file's version (remote_key), noted before the read: a
block read while a write raced with it is lent under a version that is already
dead, so no lender ever serves a stale block. And since nothing else can be on a
lender, a file none of whose blocks were lent at its current version is not asked
for: a first read costs no round trip.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from memlend.fs.readpath import ReadPath, remote_key, valid_end

if TYPE_CHECKING:
    from memlend.fs.passthrough import FileState
    from memlend.fs.stream import Stream


class KernelReadPath(ReadPath):
    """Serves the kernel's page-cache misses: lenders, then O_DIRECT reads."""

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
        """`asked`: the C read path asked the lender for this one block already and got
        no valid copy (fs/fast_read.py): only the put queue may still have it."""
        # No clamp to the size last seen: the kernel asks only below its own idea of
        # the end of file, and a short reply would shrink it (fuse_short_read).
        if size > self.max_request:
            size = self.max_request
        if size <= 0:
            return []
        bs, shift = self.bs, self.shift
        first, last = offset >> shift, (offset + size - 1) >> shift
        out = self.reply_buffer(size)
        count = last - first + 1
        self.stats.add("local_misses", count)  # every block here missed the page cache
        version = state.version  # before any read: see the module's docstring
        lens = [-1] * count
        remote = self.remote
        # Lenders can hold a block only if some were lent at this version of the file.
        if remote is not None and state.lent_version == version:
            if count == 1:
                key = remote_key(self.epoch, state.file_id, version, first)
                if asked:  # the lender said no already: only the put queue is left
                    queued = remote.queued(key, out[:bs])
                    lens[0] = -1 if queued is None else queued
                else:
                    lens[0] = remote.get_one(key, out[:bs])
            elif self.gate.ask():
                self._ask_remote_timed(state.file_id, version, first, lens, out)
        if -1 in lens:
            t0 = time.monotonic()
            read = self._read_runs(fd, first, lens, out, buffered)
            took = time.monotonic() - t0
            if remote is not None and read:
                if count == 1:
                    remote.disk_read_took(took)
                self.gate.disk_took(took, len(read))
                remote.wait_for_room(len(read), len(read) * bs)
                if state.lent_version != version:
                    state.lent_version = version
                    if self.fast is not None:  # the C read path may ask for it now
                        self.fast.sync(state)
                for k, n in read:
                    if n:
                        key = remote_key(self.epoch, state.file_id, version, first + k)
                        remote.put(key, out[k * bs : k * bs + n])
        start = offset - (first << shift)
        end = min(valid_end(lens, bs), start + size)
        return [out[start:end]] if end > start else []
