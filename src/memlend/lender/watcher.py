"""The host-memory watcher: the lender gives memory back when its host needs it.

A memory source is any callable returning the bytes the host (or the lender's
memory cgroup) still has available; tests inject their own. Each check compares
it with the reserve: below, the store drops enough blocks to cover the shortfall
and returns their pages to the kernel at once; comfortably above (a hysteresis of
an eighth of the reserve, so it does not flap), the store may grow back.
"""

from __future__ import annotations

from collections.abc import Callable

from memlend.lender import cgroup
from memlend.lender.store import Store

MemorySource = Callable[[], int]


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/meminfo has no {field}")


def meminfo_available() -> int:
    return _meminfo("MemAvailable")


def host_limit() -> int:
    """The memory this lender's 'machine' has: MemTotal, or its cgroup's limit if lower."""
    total = _meminfo("MemTotal")
    cg = cgroup.find()
    if cg:
        try:
            limit = cg.limit()
            if limit is not None:
                total = min(total, limit)
        except (OSError, ValueError):
            pass
    return total


def system_source() -> MemorySource:
    """MemAvailable, or the lender's own memory cgroup's (v1 or v2) headroom when that
    is smaller."""
    cg = cgroup.find()

    def available() -> int:
        avail = meminfo_available()
        if cg:
            c = cg.available()
            if c is not None:
                avail = min(avail, c)
        return avail

    return available


def file_source(path: str) -> MemorySource:
    """Reads a number of bytes from a file at each check (tests fake memory pressure)."""

    def available() -> int:
        with open(path) as f:
            return int(f.read().strip() or 0)

    return available


def default_reserve(total: int) -> int:
    """10% of the host's memory, between 64 MiB and 1 GiB."""
    return max(64 << 20, min(1 << 30, total // 10))


class Watcher:
    def __init__(self, store: Store, source: MemorySource, reserve: int) -> None:
        self.store = store
        self.source = source
        self.reserve = reserve
        self.hysteresis = max(reserve // 8, store.slot_size)
        self.last_available: int | None = None
        self.errors = 0

    def check(self) -> int:
        """One look at the host's memory; returns the bytes given back now."""
        try:
            avail = self.source()
        except (OSError, ValueError):
            self.errors += 1  # a source that fails must not stop the lender
            return 0
        self.last_available = avail
        st = self.store
        if avail < self.reserve:
            # Hand back the shortfall and a margin: the host's demand is usually still
            # growing when we see it, and each look costs a round of the loop.
            shortfall = self.reserve - avail + self.hysteresis
            # Blocks in use and touched free slots are what we can hand back.
            give = -(-shortfall // st.slot_size)
            return st.set_allowed(st.used - give)
        if avail > self.reserve + self.hysteresis and st.allowed < st.slots:
            spare = (avail - self.reserve - self.hysteresis) // st.slot_size
            st.set_allowed(st.allowed + spare)
        return 0
