"""Lending files the kernel wrote in passthrough (the kernel tier, with lenders).

A small file written through the mount is written by the kernel itself on the backing
file (FUSE passthrough): the daemon never sees its bytes, so it could never lend them,
and once the backing store's page cache drops them the next read goes to the disk.
Puma lends a page when the page cache evicts it; user space is not told, so the file
is lent when its last passthrough handle closes, read from the backing store's page
cache where it still is (RWF_NOWAIT: a page already gone is not read from the disk,
the lend stops there). Its blocks are named by the version that close gave the file,
so a later change (a new version) is never served a lent old copy.

It is done by the worker that serves the RELEASE (the kernel does not wait for that
reply: close(2) has returned), so a burst of closes is paced by the workers, with no
queue of descriptors to bound.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from memlend.fs.readpath import remote_key

if TYPE_CHECKING:
    from memlend.fs.passthrough import FileState
    from memlend.remote.tier import RemoteTier
    from memlend.stats import MountStats

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 64  # blocks read and queued at once (1 MiB at 16 KiB)
# Bigger files are not lent at close (a worker would spend seconds on one); their
# reads then stay in passthrough, as before. Passthrough writers are files below 1 MiB
# when opened (passthrough.PASSTHROUGH_MAX), so this takes a file grown by 63 MiB.
MAX_BYTES = 64 << 20


class WrittenLender:
    """Lends a passthrough-written file once its last passthrough handle closes."""

    def __init__(
        self,
        remote: RemoteTier,
        epoch: bytes,
        block_size: int,
        stats: MountStats,
        lent: Callable[[FileState, int], None],
    ) -> None:
        """`lent(state, version)`: called once the blocks of that version were queued."""
        self.remote = remote
        self.epoch = epoch
        self.bs = block_size
        self.stats = stats
        self._lent = lent

    def lend(self, fd: int, state: FileState, version: int) -> None:
        """Lend the file open as `fd` (left open) at `version`: what of it the backing
        store's page cache holds, from the start. Never raises: an error only means
        nothing more is lent (the file's reads then go to the disk as before)."""
        try:
            self._lend(fd, state, version)
        except OSError as e:  # unlinked meanwhile, its file system...
            log.debug("lending a written file: %s", e)
        except Exception:  # a bug here must not fail the RELEASE
            log.exception("lending a written file failed")

    def _lend(self, fd: int, state: FileState, version: int) -> None:
        if state.size > MAX_BYTES or state.version != version:
            return  # changed since its close: that change's version is what counts
        # The release took these from an fstat of `fd` just now; a change since shows
        # in the fstat after the read, which decides.
        seen = (state.size, state.mtime_ns, state.ctime_ns)
        # The handle may have been write-only: read through a descriptor of our own.
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            blocks = self._send(rfd, state.file_id, version, state.size)
            if blocks and _stamp(os.fstat(rfd)) == seen and state.version == version:
                self._lent(state, version)
                self.stats.add("written_lent_blocks", blocks)
        finally:
            os.close(rfd)

    def _send(self, fd: int, file_id: int, version: int, size: int) -> int:
        """Queue the file's blocks for the lenders, as far as the backing store's page
        cache holds them; returns how many."""
        bs, remote = self.bs, self.remote
        chunk = CHUNK_BLOCKS * bs
        view = memoryview(bytearray(min(size, chunk)))
        sent = 0
        for off in range(0, size, chunk):
            want = min(chunk, size - off)
            nblocks = -(-want // bs)
            remote.wait_for_room(nblocks, want)
            try:
                n = os.preadv(fd, [view[:want]], off, os.RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EAGAIN:  # not all in memory: no disk read for this
                    n = 0
                else:
                    raise
            whole = n if off + n >= size else n - n % bs  # a block cut short is not sent
            for b in range(0, whole, bs):
                key = remote_key(self.epoch, file_id, version, (off + b) // bs)
                remote.put(key, bytes(view[b : min(b + bs, whole)]))
                sent += 1
            if n < want:
                break
        return sent


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
