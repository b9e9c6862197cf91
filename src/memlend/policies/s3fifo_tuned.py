"""s3fifo-tuned: memlend's earlier S3-FIFO variant, kept under its own name.

It differs from the definition (policies/s3fifo.py, libCacheSim defaults): it
promotes from the small FIFO after 1 hit instead of 2, keeps the key's frequency
when promoting, sizes the ghost FIFO like the main FIFO and always evicts from the
small FIFO while it is at its share.

New keys enter the small queue S (about 10% of the capacity, at least 1). A key
leaving S that was hit while there (freq > 0) moves to the main queue M with its
frequency; otherwise it is evicted and remembered in the ghost queue G (sized like
M, keys only). A miss on a key in G goes straight to M. M is a FIFO with
reinsertion: its tail is reinserted at the head while its freq > 0, decrementing
it each time. Frequencies are 2 bits (capped at 3).

Choice of queue (paper, algorithm 1): evict from S when |S| >= its share (or M is
empty), else from M. A key promoted from S to M does not itself trigger an M
eviction (the paper's "if M is full: evictM" can evict two keys for one miss);
the loop simply goes on until one key leaves the cache, as libCacheSim does, so
every miss on a full cache evicts exactly one key. The promotion threshold is
freq > 0 ("accessed at least once"), as in the paper's text.

discard(key) removes a resident key and leaves no ghost; for a non-resident key it
is a no-op (its ghost entry, if any, is kept).
"""

from __future__ import annotations

from collections.abc import Hashable

from memlend.policies import register
from memlend.policies.s3fifo import S3FIFO


@register
class S3FIFOTuned(S3FIFO):
    """The queues, hits, main-FIFO eviction and discard are S3FIFO's; the choice of
    queue, the promotion and the ghost's size are this variant's."""

    name = "s3fifo-tuned"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.small_target = max(1, capacity // 10)
        self.ghost_capacity = max(1, capacity - self.small_target)

    def _evict(self) -> Hashable:
        small, freq = self._small, self._freq
        if len(small) >= self.small_target or not self._main:
            while small:
                key = small.popitem(last=False)[0]
                if freq[key] > 0:
                    self._main[key] = None  # promoted, keeping its frequency
                    continue
                del freq[key]
                ghost = self._ghost
                ghost[key] = None
                if len(ghost) > self.ghost_capacity:
                    ghost.popitem(last=False)
                return key
        return self._evict_main()

    def admit(self, key: Hashable) -> list[Hashable]:
        evicted = []
        while len(self._freq) >= self.capacity:
            evicted.append(self._evict())
        self._insert(key)
        return evicted
