"""The lender's memory cgroup (v1 or v2) and memory pressure (PSI), read and watched.

Paths are parameters so that tests run the v2 code against file trees laid out as
the kernel's Documentation/admin-guide/cgroup-v2.rst and psi.rst describe them.

Sources of wake-ups, each an fd for epoll (PressureEvents):
- v1: an eventfd on memory.usage_in_bytes crossing limit - reserve (cgroup.event_control);
- v2: memory.events, whose changes (high, max, oom) the kernel signals as POLLPRI;
- PSI: a trigger ("some STALL WINDOW" in microseconds) on the cgroup's memory.pressure
  (v2) or on /proc/pressure/memory, signalled as POLLPRI when tasks stall that long.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("memlend.lender")

SYS_CGROUP = "/sys/fs/cgroup"
PROC_PSI = "/proc/pressure/memory"
UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge page-rounded number
# 100 ms of stall in any 1 s window: a neighbour is being slowed by reclaim. Root may
# use any window from 500 ms to 10 s; others only multiples of 2 s (psi.rst).
PSI_STALL_US = 100_000
PSI_WINDOW_US = 1_000_000


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _read_flat_keyed(path: str) -> dict[str, int]:
    """memory.stat / memory.events: 'key value' lines."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    return out


def parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """'some avg10=0.00 avg60=0.00 avg300=0.00 total=0' lines -> {'some': {...}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        out[kind] = {k: float(v) for k, _, v in (f.partition("=") for f in fields)}
    return out


@dataclass(frozen=True)
class MemoryCgroup:
    version: int  # 1 or 2
    path: str

    def _file(self, v1: str, v2: str) -> str:
        return os.path.join(self.path, v1 if self.version == 1 else v2)

    def limit(self) -> int | None:
        """The hard limit in bytes; None if unlimited."""
        path = self._file("memory.limit_in_bytes", "memory.max")
        with open(path) as f:
            text = f.read().strip()
        if text == "max":
            return None
        value = int(text)
        return None if value >= UNLIMITED else value

    def usage(self) -> int:
        return _read_int(self._file("memory.usage_in_bytes", "memory.current"))

    def inactive_file(self) -> int:
        """Page cache the kernel may reclaim at once (v1 counts the whole subtree)."""
        stat = _read_flat_keyed(os.path.join(self.path, "memory.stat"))
        return stat.get("total_inactive_file" if self.version == 1 else "inactive_file", 0)

    def available(self) -> int | None:
        """limit - usage + reclaimable page cache; None if unlimited or unreadable."""
        try:
            limit = self.limit()
            if limit is None:
                return None
            return max(0, limit - self.usage() + self.inactive_file())
        except (OSError, ValueError):
            return None

    def events(self) -> dict[str, int]:
        """v2 memory.events counters (low, high, max, oom, oom_kill); {} for v1."""
        if self.version == 1:
            return {}
        return _read_flat_keyed(os.path.join(self.path, "memory.events"))

    def pressure(self) -> dict[str, dict[str, float]] | None:
        """v2 memory.pressure (PSI of this cgroup); None for v1 or when PSI is off."""
        if self.version == 1:
            return None
        try:
            with open(os.path.join(self.path, "memory.pressure")) as f:
                return parse_pressure(f.read())
        except OSError:  # EOPNOTSUPP when the kernel runs with psi=0
            return None


def find(proc_cgroup: str = "/proc/self/cgroup", root: str = SYS_CGROUP) -> MemoryCgroup | None:
    """This process's memory cgroup, if it is not the root one. On a hybrid host the
    v1 memory controller, when mounted, is the one that limits memory."""
    v2_path = None
    try:
        with open(proc_cgroup) as f:
            for line in f:
                hier, controllers, path = line.rstrip("\n").split(":", 2)
                if path in ("", "/"):
                    continue
                if "memory" in controllers.split(","):
                    d = os.path.join(root, "memory") + path
                    if os.path.exists(os.path.join(d, "memory.limit_in_bytes")):
                        return MemoryCgroup(1, d)
                elif hier == "0" and controllers == "":
                    v2_path = path
    except (OSError, ValueError):
        return None
    if v2_path is not None:
        d = root + v2_path
        if os.path.exists(os.path.join(d, "memory.max")):  # memory controller enabled here
            return MemoryCgroup(2, d)
    return None


@dataclass
class PressureEvents:
    """fds to poll, each with its epoll mask, what to do when it fires, and a name."""

    sources: list[tuple[int, int, Callable[[int], None], str]] = field(default_factory=list)

    def fds(self) -> list[tuple[int, int]]:
        return [(fd, mask) for fd, mask, _, _ in self.sources]

    def consume(self, fd: int) -> None:
        for sfd, _, consume, _ in self.sources:
            if sfd == fd:
                try:
                    consume(fd)
                except OSError:
                    pass
                return

    def names(self) -> list[str]:
        return [name for *_, name in self.sources]

    def close(self) -> None:
        for fd, *_ in self.sources:
            os.close(fd)
        self.sources.clear()


def _eventfd_read(fd: int) -> None:
    os.eventfd_read(fd)


def _reread(fd: int) -> None:
    """kernfs re-arms POLLPRI once the file has been read again from the start."""
    os.lseek(fd, 0, os.SEEK_SET)
    os.read(fd, 4096)


def _nothing(fd: int) -> None:
    pass


def v1_threshold(cg: MemoryCgroup, reserve: int) -> int | None:
    """An eventfd readable when the v1 cgroup's usage crosses limit - reserve."""
    if not hasattr(os, "eventfd"):
        return None
    try:
        limit = cg.limit()
        if limit is None or limit <= reserve:
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ufd = os.open(os.path.join(cg.path, "memory.usage_in_bytes"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(cg.path, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ufd} {limit - reserve}")
        except OSError:
            os.close(efd)
            raise
        finally:
            os.close(ufd)  # the kernel holds its own reference once registered
        return efd
    except (OSError, ValueError):
        return None


def v2_events_fd(cg: MemoryCgroup) -> int | None:
    """memory.events opened and read once: POLLPRI when a counter changes."""
    try:
        fd = os.open(os.path.join(cg.path, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.read(fd, 4096)
    except OSError:
        os.close(fd)
        return None
    return fd


def psi_trigger(
    path: str, stall_us: int = PSI_STALL_US, window_us: int = PSI_WINDOW_US
) -> int | None:
    """A PSI trigger on `path` (memory.pressure or /proc/pressure/memory); None when
    PSI is off (psi=0 on the kernel command line) or the trigger is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.write(fd, f"some {stall_us} {window_us}\0".encode())
    except OSError as e:
        log.debug("PSI trigger on %s refused: %s", path, e)
        os.close(fd)
        return None
    return fd


def pressure_events(
    reserve: int,
    *,
    proc_cgroup: str = "/proc/self/cgroup",
    root: str = SYS_CGROUP,
    proc_psi: str = PROC_PSI,
) -> PressureEvents:
    """Every wake-up source this host offers the watcher (possibly none)."""
    ev = PressureEvents()
    cg = find(proc_cgroup, root)
    pri = select.EPOLLPRI | select.EPOLLERR
    if cg is not None and cg.version == 1:
        fd = v1_threshold(cg, reserve)
        if fd is not None:
            ev.sources.append((fd, select.EPOLLIN, _eventfd_read, "cgroup v1 usage threshold"))
    if cg is not None and cg.version == 2:
        fd = v2_events_fd(cg)
        if fd is not None:
            ev.sources.append((fd, pri, _reread, "cgroup v2 memory.events"))
        fd = psi_trigger(os.path.join(cg.path, "memory.pressure"))
        if fd is not None:
            ev.sources.append((fd, pri, _nothing, "PSI trigger on the cgroup's memory.pressure"))
    else:
        fd = psi_trigger(proc_psi)
        if fd is not None:
            ev.sources.append((fd, pri, _nothing, f"PSI trigger on {proc_psi}"))
    return ev
