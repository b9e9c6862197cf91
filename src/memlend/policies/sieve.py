"""SIEVE (Zhang et al., NSDI 2024): a FIFO queue, a visited bit and a moving hand.

New keys go to the head; a hit only sets the key's visited bit (no list move, so
hits are cheap and lock-free in the paper). To evict, the hand walks from where it
stopped towards the head (wrapping to the tail), clearing visited bits, and evicts
the first unvisited key; it then rests on that key's newer neighbour. Each step of
the walk clears a bit set by an earlier hit, so eviction is amortised O(1).

discard(key) unlinks the key; if the hand rested on it, the hand moves to the key's
newer neighbour (the next one it would have examined). No history is kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy

# A node is a list [key, visited, older, newer]: lighter than an object with slots
# for CPython attribute access, and mutable in place.
_KEY, _VISITED, _OLDER, _NEWER = 0, 1, 2, 3


@register
class SIEVE(Policy):
    name = "sieve"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._nodes: dict[Hashable, list] = {}
        self._head: list | None = None  # newest
        self._tail: list | None = None  # oldest
        self._hand: list | None = None  # None: start at the tail

    def __contains__(self, key: Hashable) -> bool:
        return key in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._nodes)

    def touch(self, key: Hashable) -> None:
        self._nodes[key][_VISITED] = True

    def _unlink(self, node: list) -> None:
        older, newer = node[_OLDER], node[_NEWER]
        if older is None:
            self._tail = newer
        else:
            older[_NEWER] = newer
        if newer is None:
            self._head = older
        else:
            newer[_OLDER] = older
        del self._nodes[node[_KEY]]

    def _evict(self) -> Hashable:
        node = self._hand or self._tail
        while node[_VISITED]:
            node[_VISITED] = False
            node = node[_NEWER] or self._tail
        self._hand = node[_NEWER]
        self._unlink(node)
        return node[_KEY]

    def admit(self, key: Hashable) -> list[Hashable]:
        evicted = []
        while len(self._nodes) >= self.capacity:
            evicted.append(self._evict())
        node = [key, False, self._head, None]
        if self._head is None:
            self._tail = node
        else:
            self._head[_NEWER] = node
        self._head = node
        self._nodes[key] = node
        return evicted

    def discard(self, key: Hashable) -> None:
        node = self._nodes.get(key)
        if node is None:
            return
        if node is self._hand:
            self._hand = node[_NEWER]
        self._unlink(node)
