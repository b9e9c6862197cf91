"""The one small interface every replacement policy implements.

The same objects run inside the mount's local tier (fs/cache.py), inside the
lender, and inside the trace simulator (sim.py), so what the simulator measures
is what the mount does.

A policy tracks *keys* only (any hashable); it never sees data. The owner keeps
the key -> slot map and asks the policy three things:

    hit:  key in policy          -> policy.touch(key)
    miss: key not in policy      -> evicted = policy.admit(key)
                                    (key is now resident; `evicted` lists the
                                    resident keys that had to go, oldest
                                    decision first; len(policy) <= capacity)
    drop: invalidation           -> policy.discard(key)   (no-op if absent)

Policies may keep non-resident history ("ghost" entries, e.g. ARC's B1/B2,
LIRS's non-resident HIR blocks); ghosts never count toward len() and are never
reported as evicted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator


class Policy(ABC):
    """Replacement policy over at most `capacity` resident keys."""

    name: str = "base"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"policy capacity must be at least 1, got {capacity}")
        self.capacity = capacity

    @abstractmethod
    def __contains__(self, key: Hashable) -> bool:
        """True if `key` is resident (ghost entries do not count)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """Record a hit on resident `key`."""

    @abstractmethod
    def admit(self, key: Hashable) -> list[Hashable]:
        """Make non-resident `key` resident; return the resident keys evicted."""

    @abstractmethod
    def discard(self, key: Hashable) -> None:
        """Forget resident `key` without counting it as an eviction."""

    @abstractmethod
    def keys(self) -> Iterator[Hashable]:
        """Iterate over the resident keys (any order)."""

    def access(self, key: Hashable) -> bool:
        """Simulator helper: one reference to `key`; returns True on a hit."""
        if key in self:
            self.touch(key)
            return True
        self.admit(key)
        return False
