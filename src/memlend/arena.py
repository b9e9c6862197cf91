"""Fixed-size block slots in one preallocated anonymous mapping.

The arena is the only place block data lives, so its size is a hard memory
limit: nothing grows with the workload. Slots are page aligned (slot size is a
power of two >= 4 KiB), so a slot can be the target of an O_DIRECT read.
"""

from __future__ import annotations

import mmap


class Arena:
    def __init__(self, slots: int, slot_size: int) -> None:
        if slots < 1:
            raise ValueError("an arena needs at least one slot")
        if slot_size < mmap.PAGESIZE or slot_size & (slot_size - 1):
            raise ValueError(f"slot size must be a power of two >= {mmap.PAGESIZE}")
        self.slots = slots
        self.slot_size = slot_size
        # MAP_PRIVATE|MAP_ANONYMOUS: pages are taken on first touch, never beyond
        # slots * slot_size, and given back at once by release().
        self._map = mmap.mmap(-1, slots * slot_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)
        self._free = list(range(slots - 1, -1, -1))

    def alloc(self) -> int | None:
        """A free slot number, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def release(self, slot: int) -> None:
        """Free `slot` and hand its pages back to the kernel (MADV_DONTNEED)."""
        self._map.madvise(mmap.MADV_DONTNEED, slot * self.slot_size, self.slot_size)
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def slot(self, slot: int) -> memoryview:
        start = slot * self.slot_size
        return self.view[start : start + self.slot_size]

    def close(self) -> None:
        self.view.release()
        self._map.close()
