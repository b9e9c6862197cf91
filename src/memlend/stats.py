"""A running mount's description and counters, as one dict for `memlend stats --json`
and the Prometheus endpoint (memlend.metrics reads the same as_dict())."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from memlend.counters import Counters

# Monotonic counters, bumped from any thread through MountStats.add().
COUNTERS = (
    "local_hits",
    "local_misses",
    "disk_reads",
    "disk_read_bytes",
    "evictions",
    "invalidated_blocks",
    "writes",
    "write_bytes",
    "passthrough_opens",
    "written_lent_blocks",
    "remote_hits",
    "remote_misses",
)
# The remote tier's counters (remote/tier.py), in `memlend stats` after the mount's.
REMOTE_COUNTERS = (
    "remote_hits",
    "remote_misses",
    "remote_queue_hits",
    "remote_put_blocks",
    "remote_put_skipped",
    "remote_dropped_puts",
    "remote_errors",
    "remote_timeouts",
    "remote_client_delays",
    "native_read_hits",
    "seal_failures",
    "remote_deletes",
    "remote_dropped_deletes",
)


@dataclass
class MountStats:
    """Settings and gauges are plain attributes (one writer each: the cache under its
    lock, or the daemon at start); counters live in `counters` (memlend.counters)."""

    pid: int = 0
    backing: str = ""
    mountpoint: str = ""
    cache_size: int = 0
    block_size: int = 0
    slots: int = 0
    policy: str = ""
    active_policy: str = ""  # what `auto` follows now; else the policy itself
    direct_io: bool = True
    local_tier: str = "memlend"
    writeback_cache: bool = False
    passthrough: bool = False  # the kernel tier: small written files in passthrough
    mmap_allowed: bool = False
    resident_blocks: int = 0
    started: float = 0.0
    metrics: str = ""  # ADDR:PORT the Prometheus endpoint listens on, if any
    hot_path: str = ""  # the remote tier's: "native" or why it is Python (memlend.native)
    read_path: str = ""  # the kernel tier's READ of a lent block: C or why not (fs/fast_read.py)
    counters: Counters = field(default_factory=Counters, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The hot path's one call: add() is the registry's own bound method.
        self.add = self.counters.add  # type: ignore[method-assign]

    def add(self, name: str, n: int = 1) -> None:
        self.counters.add(name, n)

    def __getattr__(self, name: str) -> int:
        # Reading a counter by name (tests, reports); only reached for non-fields.
        if name in COUNTERS:
            return int(self.counters.get(name))
        raise AttributeError(name)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "counters"
        }
        totals = self.counters.snapshot()
        for name in COUNTERS:
            out[name] = int(totals.get(name, 0))
        return out
