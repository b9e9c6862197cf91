"""2Q, the full version (Johnson & Shasha, VLDB 1994).

A1in: FIFO of keys seen once (resident, Kin = 25% of the capacity).
A1out: FIFO of keys recently evicted from A1in (ghosts, Kout = 50% of the capacity).
Am: LRU of keys referenced again after leaving A1in (resident).

A hit in A1in does nothing (correlated references); a miss on an A1out key goes to
Am. To free a slot, evict A1in's tail (remembered in A1out) if |A1in| > Kin, else
Am's LRU key (not remembered). When Am is empty (tiny caches or after discards)
A1in gives up its tail instead. Kin and Kout are at least 1.

The key found in A1out is removed from it before reclaiming a slot, so the slot
reclaim cannot trim it first.

discard(key) removes a resident key and leaves no ghost; for a non-resident key it
is a no-op (its A1out entry, if any, is kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy


@register
class TwoQ(Policy):
    name = "2q"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.kin = max(1, capacity // 4)
        self.kout = max(1, capacity // 2)
        # OrderedDicts in oldest -> newest order.
        self._a1in: OrderedDict[Hashable, None] = OrderedDict()
        self._a1out: OrderedDict[Hashable, None] = OrderedDict()
        self._am: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._am or key in self._a1in

    def __len__(self) -> int:
        return len(self._a1in) + len(self._am)

    def keys(self) -> Iterator[Hashable]:
        yield from self._a1in
        yield from self._am

    def ghosts(self) -> int:
        return len(self._a1out)

    def touch(self, key: Hashable) -> None:
        if key in self._am:
            self._am.move_to_end(key)
        # A hit in A1in is deliberately ignored.

    def _reclaim(self) -> Hashable:
        if len(self._a1in) > self.kin or not self._am:
            victim = self._a1in.popitem(last=False)[0]
            self._a1out[victim] = None
            if len(self._a1out) > self.kout:
                self._a1out.popitem(last=False)
            return victim
        return self._am.popitem(last=False)[0]

    def admit(self, key: Hashable) -> list[Hashable]:
        seen = key in self._a1out
        if seen:
            del self._a1out[key]
        evicted = []
        while len(self._a1in) + len(self._am) >= self.capacity:
            evicted.append(self._reclaim())
        if seen:
            self._am[key] = None
        else:
            self._a1in[key] = None
        return evicted

    def discard(self, key: Hashable) -> None:
        if key in self._am:
            del self._am[key]
        else:
            self._a1in.pop(key, None)
