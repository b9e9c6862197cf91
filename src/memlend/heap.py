"""Heap memory Python has freed, given back to the system (glibc malloc_trim).

The mount daemon's memory is charged to the VM it serves, beside the page cache the
application uses: every MiB it holds is a MiB less cache. Blocks read from the disk
and lent pass through it as 16 KiB objects, allocated and freed by several threads,
and glibc keeps what they free in its arenas (one per thread that allocated). After
1 GB read through a kernel-tier mount with a lender the daemon held 79 MB of
anonymous memory against 19.5 MB before, spread over a dozen arenas of 3-7 MB
(docs/benchmarks.md, "Postmark is bound by the disk's IOPS here"), and in the testbed's
Postmark that cost disk reads. Two arenas instead of one per thread, and
malloc_trim(0) every EVERY seconds, which returns the free pages of every arena:
46 MB after the same read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

EVERY = 2.0  # s between trims; one took 1.0-1.2 ms with 25 MB of heap, 4.0-4.6 ms with 100
ARENAS = 2  # glibc's default is 8 per CPU: one per thread here, each keeping its free
M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _libc_function(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):  # not glibc (musl has neither): nothing to do
        return None


_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas for the threads started from now on (the FUSE
    workers would each get one, and keep in it what they freed); False without glibc."""
    return _mallopt is not None and bool(_mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Give the free pages of the C heap back to the system; False where there is no
    malloc_trim."""
    if _trim is None:
        return False
    _trim(0)
    return True


class Trimmer:
    """Trims the heap every `every` seconds from a thread of its own, while running."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self.trims = 0
        self.seconds = 0.0  # spent trimming, in all
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)

    def start(self) -> Trimmer:
        if _trim is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            t = time.perf_counter()
            trim()
            self.seconds += time.perf_counter() - t
            self.trims += 1

    def stop(self) -> None:
        self._stop.set()
