"""Counters of a running mount, and their exposition as JSON or a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MountStats:
    """Counters are plain ints bumped under the cache lock (or by one thread)."""

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
    mmap_allowed: bool = False
    local_hits: int = 0
    local_misses: int = 0
    disk_reads: int = 0
    disk_read_bytes: int = 0
    evictions: int = 0
    resident_blocks: int = 0
    invalidated_blocks: int = 0
    writes: int = 0
    write_bytes: int = 0
    remote_hits: int = 0
    remote_misses: int = 0
    started: float = field(default=0.0)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
