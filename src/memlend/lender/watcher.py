"""The host-memory watcher: the lender gives memory back when its host needs it.

A memory source is any callable returning the bytes the host (or the lender's
memory cgroup) still has available; tests inject their own. Each check compares
it with the reserve: below, the store drops enough blocks to cover the shortfall
and returns their pages to the kernel at once; comfortably above (a hysteresis of
an eighth of the reserve, so it does not flap), the store may grow back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from memlend.lender.store import Store

MemorySource = Callable[[], int]

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge page-rounded number


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/meminfo has no {field}")


def meminfo_available() -> int:
    return _meminfo("MemAvailable")


def _own_memory_cgroup() -> str | None:
    """This process's cgroup v1 memory directory, if it is not the root cgroup."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(",") and path not in ("", "/"):
                    d = CGROUP_V1_MEMORY + path
                    return d if os.path.isdir(d) else None
    except OSError:
        pass
    return None


def cgroup_available(cgroup_dir: str) -> int | None:
    """limit - usage + reclaimable page cache of a v1 memory cgroup; None if unlimited."""
    try:
        with open(os.path.join(cgroup_dir, "memory.limit_in_bytes")) as f:
            limit = int(f.read())
        if limit >= UNLIMITED:
            return None
        with open(os.path.join(cgroup_dir, "memory.usage_in_bytes")) as f:
            usage = int(f.read())
        inactive = 0
        with open(os.path.join(cgroup_dir, "memory.stat")) as f:
            for line in f:
                if line.startswith("total_inactive_file "):
                    inactive = int(line.split()[1])
        return max(0, limit - usage + inactive)
    except (OSError, ValueError):
        return None


def host_limit() -> int:
    """The memory this lender's 'machine' has: MemTotal, or its cgroup's limit if lower."""
    total = _meminfo("MemTotal")
    cg = _own_memory_cgroup()
    if cg:
        try:
            with open(os.path.join(cg, "memory.limit_in_bytes")) as f:
                total = min(total, int(f.read()))
        except (OSError, ValueError):
            pass
    return total


def system_source() -> MemorySource:
    """MemAvailable, or the lender's own memory cgroup's headroom when that is smaller."""
    cg = _own_memory_cgroup()

    def available() -> int:
        avail = meminfo_available()
        if cg:
            c = cgroup_available(cg)
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


def cgroup_pressure_fd(reserve: int) -> int | None:
    """An eventfd that becomes readable whenever this process's memory cgroup (v1) usage
    crosses limit - reserve, or None outside a limited cgroup.

    Polling every 0.1 s protects only against neighbours that grow slower than the
    reserve per tick; a threshold notification wakes the lender the moment usage
    crosses the line (tests/test_lender_cgroup.py: a hog at ~350 MiB/s)."""
    cg = _own_memory_cgroup()
    if cg is None or not hasattr(os, "eventfd"):
        return None
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes")) as f:
            limit = int(f.read())
        if limit >= UNLIMITED or limit <= reserve:
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ufd = os.open(os.path.join(cg, "memory.usage_in_bytes"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(cg, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ufd} {limit - reserve}")
        finally:
            os.close(ufd)  # the kernel holds its own reference once registered
        return efd
    except (OSError, ValueError):
        return None


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
