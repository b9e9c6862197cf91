"""S3-FIFO (Yang et al., SOSP 2023) as libCacheSim defines it, with its defaults.

A small FIFO S of 10% of the capacity (at least 1 key), a main FIFO M of the rest,
and a ghost FIFO G of as many keys (ids only) as M holds.

- A hit adds 1 to the key's frequency (only "at least 2" and "at most 3" matter,
  so it is kept as a 2-bit counter).
- A miss on a key in G removes it from G and inserts it in M; any other miss
  inserts in S. Inserted keys start at frequency 0. (libCacheSim also sends misses
  to M while S is full before the first eviction; the reference table does not,
  and neither does this. libCacheSim also looks G up before evicting, which can
  keep a key whose ghost the eviction pushes out; the table looks it up after.)
- To evict: from M when M is over its share or S is empty, else from S.
  - From S: its oldest key moves to M (frequency reset to 0) if it was hit at least
    twice (move-to-main threshold 2), else it leaves the cache and enters G. The
    walk goes on until one key has left.
  - From M: its oldest key is reinserted with frequency min(f, 3) - 1 while f >= 1,
    else it leaves the cache.

policies/s3fifo_tuned.py is memlend's earlier variant, kept under its own name.

discard(key) removes a resident key and leaves no ghost; for a non-resident key it
is a no-op (its ghost entry, if any, is kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy

_MOVE_TO_MAIN = 2


@register
class S3FIFO(Policy):
    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.small_capacity = max(1, int(capacity * 0.1))
        self.main_capacity = capacity - self.small_capacity
        # 0.9 x capacity, counted as the main FIFO's share: that is what the
        # reference table (shared/policy-reference.md) gives; int(0.9 x C) is off
        # by up to 0.0014 on it.
        self.ghost_capacity = self.main_capacity
        # OrderedDicts from oldest to newest.
        self._small: OrderedDict[Hashable, None] = OrderedDict()
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}  # resident key -> 0..3

    def __contains__(self, key: Hashable) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._freq)

    def ghosts(self) -> int:
        return len(self._ghost)

    def touch(self, key: Hashable) -> None:
        f = self._freq[key]
        if f < 3:
            self._freq[key] = f + 1

    def _evict_small(self) -> Hashable | None:
        small, freq = self._small, self._freq
        while small:
            key = small.popitem(last=False)[0]
            if freq[key] >= _MOVE_TO_MAIN:
                self._main[key] = None
                freq[key] = 0
                continue
            del freq[key]
            ghost = self._ghost
            if self.ghost_capacity:
                ghost[key] = None
                if len(ghost) > self.ghost_capacity:
                    ghost.popitem(last=False)
            return key
        return None  # every key moved to M: the caller evicts again, from M

    def _evict_main(self) -> Hashable:
        # Every reinsertion spends one earlier hit (freq <= 3): amortised O(1).
        main, freq = self._main, self._freq
        while True:
            key = main.popitem(last=False)[0]
            f = freq[key]
            if f == 0:
                del freq[key]
                return key
            freq[key] = f - 1
            main[key] = None

    def admit(self, key: Hashable) -> list[Hashable]:
        evicted: list[Hashable] = []
        while len(self._freq) >= self.capacity:
            if len(self._main) > self.main_capacity or not self._small:
                evicted.append(self._evict_main())
            else:
                victim = self._evict_small()
                if victim is not None:
                    evicted.append(victim)
        self._insert(key)
        return evicted

    def _insert(self, key: Hashable) -> None:
        """A missed key enters M if G remembers it, else S, at frequency 0."""
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def discard(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._small:
            del self._small[key]
        else:
            del self._main[key]
