"""Fixed-size block slots in one preallocated anonymous mapping.

The arena is the only place block data lives, so its size is a hard memory
limit: nothing grows with the workload. Slots are page aligned (slot size is a
power of two >= 4 KiB), so a slot can be the target of an O_DIRECT read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


MADV_POPULATE_WRITE = 23  # Linux 5.14+; not in Python 3.11's mmap module
_POPULATE_CHUNK = 32 << 20


class Arena:
    def __init__(self, slots: int, slot_size: int, *, populate: bool = False) -> None:
        if slots < 1:
            raise ValueError("an arena needs at least one slot")
        if slot_size < mmap.PAGESIZE or slot_size & (slot_size - 1):
            raise ValueError(f"slot size must be a power of two >= {mmap.PAGESIZE}")
        self.slots = slots
        self.slot_size = slot_size
        # MAP_PRIVATE|MAP_ANONYMOUS: pages are taken on first touch, never beyond
        # slots * slot_size, and given back at once by release().
        self._map = mmap.mmap(-1, slots * slot_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Huge pages: first touch of a 4 KiB page costs a fault and zeroing, which
        # made filling the cache the slowest part of a cold sequential read
        # (docs/benchmarks.md); a 2 MiB page takes one fault for 512 of them.
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # THP disabled: plain pages still work
        self.view = memoryview(self._map)
        self._free = list(range(slots - 1, -1, -1))
        self._closed = False
        if populate:
            threading.Thread(target=self._populate, name="arena-populate", daemon=True).start()

    def _populate(self) -> None:
        """Fault the whole arena in now, in the background, so that filling the cache
        later costs a copy, not a page fault and zeroing under the GIL (measured:
        about 11 us per 16 KiB block; docs/benchmarks.md). ctypes releases the GIL."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        total = len(self._map)
        for off in range(0, total, _POPULATE_CHUNK):
            if self._closed:
                return
            size = min(_POPULATE_CHUNK, total - off)
            if _libc.madvise(ctypes.c_void_p(addr + off), size, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel: pages come on first touch instead

    def alloc(self) -> int | None:
        """A free slot number, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def release(self, slot: int) -> None:
        """Free `slot` and hand its pages back to the kernel (MADV_DONTNEED)."""
        self._map.madvise(mmap.MADV_DONTNEED, slot * self.slot_size, self.slot_size)
        self._free.append(slot)

    def slot(self, slot: int) -> memoryview:
        start = slot * self.slot_size
        return self.view[start : start + self.slot_size]

    def close(self) -> None:
        self._closed = True
        self.view.release()
        self._map.close()
