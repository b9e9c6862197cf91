"""ARC: Adaptive Replacement Cache (Megiddo & Modha, FAST 2003, figure 4).

Four LRU lists: T1 (resident, seen once recently), T2 (resident, seen at least
twice), and their ghosts B1 and B2 (keys only). The target size `p` of T1 moves
towards whichever ghost list is being hit. |T1|+|B1| <= c and the four lists
together hold at most 2c keys, so there are never more than 2c ghosts.

Deviations from the paper, needed only because `discard` can leave free slots:
REPLACE is called only when the cache is full (the paper's case analysis assumes
it is whenever REPLACE runs), and it falls back to T1 when T2 is empty.
Without discards the behaviour is exactly the paper's.

discard(key) removes a resident key and leaves no ghost for it; ghost entries of
non-resident keys are kept (it is a no-op for them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy


@register
class ARC(Policy):
    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p: float = 0.0  # target size of T1
        # OrderedDicts in LRU -> MRU order.
        self._t1: OrderedDict[Hashable, None] = OrderedDict()
        self._t2: OrderedDict[Hashable, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()
        self._b2: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def keys(self) -> Iterator[Hashable]:
        yield from self._t1
        yield from self._t2

    def ghosts(self) -> int:
        """Number of ghost keys held (B1 + B2)."""
        return len(self._b1) + len(self._b2)

    def touch(self, key: Hashable) -> None:
        # Case I: a hit moves the key to the MRU end of T2.
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def _replace(self, hit_in_b2: bool) -> Hashable:
        t1 = len(self._t1)
        if t1 and (not self._t2 or t1 > self.p or (hit_in_b2 and t1 == self.p)):
            victim = self._t1.popitem(last=False)[0]
            self._b1[victim] = None
        else:
            victim = self._t2.popitem(last=False)[0]
            self._b2[victim] = None
        return victim

    def admit(self, key: Hashable) -> list[Hashable]:
        c = self.capacity
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        evicted: list[Hashable] = []
        if key in b1:
            # Case II: B1 ghost hit, recency deserves more room.
            self.p = min(c, self.p + max(len(b2) / len(b1), 1))
            del b1[key]
            if len(t1) + len(t2) >= c:
                evicted.append(self._replace(False))
            t2[key] = None
            return evicted
        if key in b2:
            # Case III: B2 ghost hit, frequency deserves more room.
            self.p = max(0, self.p - max(len(b1) / len(b2), 1))
            del b2[key]
            if len(t1) + len(t2) >= c:
                evicted.append(self._replace(True))
            t2[key] = None
            return evicted
        # Case IV: a key in no list.
        l1 = len(t1) + len(b1)
        if l1 >= c:
            if len(t1) < c:
                b1.popitem(last=False)
                if len(t1) + len(t2) >= c:
                    evicted.append(self._replace(False))
            else:
                evicted.append(t1.popitem(last=False)[0])
        else:
            total = l1 + len(t2) + len(b2)
            if total >= c:
                if total >= 2 * c:
                    b2.popitem(last=False)
                if len(t1) + len(t2) >= c:
                    evicted.append(self._replace(False))
        t1[key] = None
        return evicted

    def discard(self, key: Hashable) -> None:
        if key in self._t1:
            del self._t1[key]
        else:
            self._t2.pop(key, None)
