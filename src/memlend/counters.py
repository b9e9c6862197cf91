"""Thread-safe monotonic counters that cost the hot path almost nothing.

Why per-thread shards: `stats.x += 1` from several FUSE workers is a read-modify-write
that loses counts when the GIL switches between the read and the write, and one lock
per increment costs the read path a lock round-trip (and contention among 16 workers).
Here each thread adds into its own dict, which no other thread writes, so no count is
lost and no lock is taken; readers (`memlend stats`, the Prometheus scrape) sum the
shards, which is the rare operation. An add costs ~0.1 µs (a thread-local lookup and a
dict update), against 15-90 µs for a READ (docs/operations.md).

Keys are a name, or (name, label) for a labelled family such as per-lender hits.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Hashable

Key = Hashable


class Counters:
    """Named counters; add() from any thread, snapshot()/get() from any thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._shards: list[dict[Key, float]] = []
        self._lock = threading.Lock()  # only to register a new thread's shard

    def _shard(self) -> dict[Key, float]:
        shard: dict[Key, float] = defaultdict(int)  # `+=` without a .get() call
        self._local.shard = shard
        with self._lock:
            self._shards.append(shard)  # kept after the thread ends: its counts stay
        return shard

    def add(self, key: Key, n: float = 1) -> None:
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._shard()
        shard[key] += n

    def snapshot(self) -> dict[Key, float]:
        """Every counter's total so far."""
        with self._lock:
            shards = list(self._shards)
        out: dict[Key, float] = {}
        for shard in shards:
            # dict.copy() runs under the GIL in one C call: safe while its owner adds.
            for k, v in shard.copy().items():
                out[k] = out.get(k, 0) + v
        return out

    def get(self, key: Key) -> float:
        with self._lock:
            shards = list(self._shards)
        return sum(s.get(key, 0) for s in shards)
