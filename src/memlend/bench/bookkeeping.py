"""Measure the Python heap the local tier spends per cached block, for each policy.

`python -m memlend.bench.bookkeeping` fills a BlockCache with three access
patterns (scan with re-use, uniform over 10x the capacity, heavy-tailed) and
reports the peak traced heap per slot (tracemalloc), the worst pattern per
policy. policies.bookkeeping_bytes budgets these figures plus a margin, so
--cache-size bounds data *and* bookkeeping.
"""

from __future__ import annotations

import random
import tracemalloc

from memlend.fs.cache import BlockCache
from memlend.policies import POLICIES
from memlend.stats import MountStats


def bytes_per_slot(policy: str, slots: int = 100_000) -> float:
    data = memoryview(bytes(16))
    worst = 0.0
    for pattern in ("scan", "uniform10x", "heavy-tail"):
        tracemalloc.start()
        cache = BlockCache(slots * (4096 + 4096), 4096, policy, MountStats())
        cache_slots = cache.slots
        base = tracemalloc.get_traced_memory()[0]
        rng = random.Random(1)
        with cache.lock:
            for i in range(8 * cache_slots):
                if pattern == "scan":
                    b = i if i % 3 else rng.randrange(cache_slots)
                elif pattern == "uniform10x":
                    b = rng.randrange(10 * cache_slots)
                else:
                    b = int(rng.paretovariate(0.5)) % (20 * cache_slots)
                key = (1 << 40) | b
                if key in cache.policy:
                    cache.policy.touch(key)
                else:
                    cache.insert(key, data)
        worst = max(worst, (tracemalloc.get_traced_memory()[1] - base) / cache_slots)
        tracemalloc.stop()
        cache.close()
    return worst


def main() -> None:
    for name in sorted(POLICIES):
        print(f"{name:8s} {bytes_per_slot(name):6.0f} bytes per cached block (worst pattern)")


if __name__ == "__main__":
    main()
