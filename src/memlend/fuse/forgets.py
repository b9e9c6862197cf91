"""FORGETs served in batches, off the path of the requests that follow them.

The kernel sends a FORGET (or BATCH_FORGET) when it drops an inode: after every
unlink, beside the request the program makes next. Served by a second FUSE worker,
it fought that request's worker for the GIL, a few hand-overs across the CPUs per
unlink, which doubled an unlink's time unpinned (docs/benchmarks.md, "FORGET in
batches"). With the C extension the workers' read loop queues FORGETs in C
without the GIL (memlend._native next_request/read_next), and this one thread
takes the queue whole, WINDOW after the first one arrived: one GIL hold and one
batch of closes for all of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType

log = logging.getLogger("memlend.fuse")

WINDOW = 0.01  # s: the forgets of ~100 unlinks per batch; the kernel waits for none


class ForgetQueue:
    """The daemon's end of the C FORGET queue of one /dev/fuse descriptor."""

    def __init__(
        self, lib: ModuleType, fuse_fd: int, forget_many: Callable[[Sequence[int]], None]
    ) -> None:
        self._lib = lib
        self._fuse_fd = fuse_fd
        self._forget_many = forget_many
        self._efd = os.eventfd(0, os.EFD_CLOEXEC)
        self._stop = False
        self.active = bool(lib.forget_setup(fuse_fd, self._efd))
        if not self.active:  # another mount of this process has the queue
            os.close(self._efd)
            return
        self._thread = threading.Thread(target=self._run, name="fuse-forget", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            os.eventfd_read(self._efd)  # blocks (no GIL) until the queue fills again
            if self._stop:
                return
            time.sleep(WINDOW)
            self.drain()

    def drain(self) -> None:
        """Serve what is queued now: (nodeid, nlookup) pairs, flat."""
        data = self._lib.forgets_take()
        if not data:
            return
        pairs = memoryview(data).cast("Q")
        try:
            self._forget_many(pairs)
        except Exception:  # a bad batch must not end the thread: later ones still come
            log.exception("forgetting %d inodes failed", len(pairs) // 2)

    def close(self) -> None:
        """Stop taking FORGETs (the session ends) and serve what was queued."""
        if not self.active:
            return
        self.active = False
        self._lib.forget_setup(self._fuse_fd, -1)
        self._stop = True
        os.eventfd_write(self._efd, 1)
        self._thread.join()
        os.close(self._efd)
        self.drain()
