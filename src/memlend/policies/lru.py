"""LRU: evict the least recently used key. The baseline every policy is compared to."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy


@register
class LRU(Policy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def admit(self, key: Hashable) -> list[Hashable]:
        evicted = []
        while len(self._order) >= self.capacity:
            evicted.append(self._order.popitem(last=False)[0])
        self._order[key] = None
        return evicted

    def discard(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._order)
