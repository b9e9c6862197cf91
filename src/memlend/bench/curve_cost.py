"""Cost of the live miss-ratio curve on the local tier's lookups (docs/policies.md).

    taskset -c 0 python -m memlend.bench.curve_cost [POLICY [CACHE_SIZE [BLOCK_SIZE]]]

(default lirs-lazy 64M 4K) times BlockCache.copy_one hits and misses of 4 KiB and
copy_out hits of 64 blocks over random keys of a full cache, and the hook alone
(LiveCurve.access on keys uniform over twice the cache: a sampled share of about the
curve's rate), fastest of 7 runs, with the curve on and off (MEMLEND_CURVE=0:
nothing is sampled), alternating, three rounds; prints the fastest of
each and the difference, and what one sampled reference costs the curve (record()).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable

from memlend.fs.cache import FILE_SHIFT, BlockCache
from memlend.mrc import MASK, MIX
from memlend.sizes import parse_size
from memlend.stats import MountStats

OPS = 200_000


def best_ns(run: Callable[[], None], ops: int, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best / ops * 1e9


def timings(policy: str, curve: bool, cache_size: int, bs: int) -> dict[str, float]:
    """ns per lookup of a full cache built with the curve on or off (MEMLEND_CURVE)."""
    os.environ["MEMLEND_CURVE"] = "1" if curve else "0"
    try:
        cache = BlockCache(cache_size, bs, policy, MountStats())
    finally:
        os.environ.pop("MEMLEND_CURVE", None)
    block = memoryview(bytes(bs))
    base = 1 << FILE_SHIFT
    with cache.lock:
        for b in range(cache.slots):
            cache.insert(base | b, block)
    rng = random.Random(1)
    hits = [base | rng.randrange(cache.slots) for _ in range(OPS)]
    misses = [(2 << FILE_SHIFT) | rng.randrange(1 << 30) for _ in range(OPS)]
    firsts = [rng.randrange(cache.slots - 64) for _ in range(OPS // 64)]
    out = memoryview(bytearray(64 * bs))
    copy_one, copy_out = cache.copy_one, cache.copy_out

    def one(keys: list[int]) -> Callable[[], None]:
        def run() -> None:
            with cache.lock:
                for k in keys:
                    copy_one(k, 0, 4096, out)

        return run

    def many() -> None:
        with cache.lock:
            for f in firsts:
                copy_out(base, f, f + 63, out, 0, 64 * bs)

    res = {
        "copy_one hit": best_ns(one(hits), OPS),
        "copy_one miss": best_ns(one(misses), OPS),
        "copy_out per block": best_ns(many, len(firsts) * 64),
    }
    if curve:
        access = cache.curve.access
        mixed = [base | rng.randrange(2 * cache.slots) for _ in range(OPS)]

        def hook() -> None:
            for k in mixed:
                access(k, True)

        res["hook alone"] = best_ns(hook, OPS)
        cut, record = cache.curve.cut, cache.curve.record
        sampled = [k for k in range(base, base + cache.slots) if hash(k) * MIX & MASK < cut]
        refs = [rng.choice(sampled) for _ in range(OPS // 4)] if sampled else []

        def recorded() -> None:
            for k in refs:
                record(k, True)

        if refs:
            res["record (sampled ref)"] = best_ns(recorded, len(refs))
        print(f"{policy}, {cache.slots} slots, curve rate {cache.curve.rate:.4f}")
    return res


def main(policy: str, cache_size: int = 64 << 20, bs: int = 4096, rounds: int = 3) -> None:
    """Alternate caches with the curve on and off; print the fastest of each."""
    on: dict[str, float] = {}
    off: dict[str, float] = {}
    for _ in range(rounds):
        for curve, best in ((True, on), (False, off)):
            for name, ns in timings(policy, curve, cache_size, bs).items():
                best[name] = min(best.get(name, ns), ns)
    for name, ns in on.items():
        if name in off:
            print(f"{name:20s} on {ns:6.0f} ns, off {off[name]:6.0f} ns: {ns - off[name]:+5.0f} ns")
        else:
            print(f"{name:20s} {ns:6.0f} ns")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else "lirs-lazy",
        parse_size(args[1]) if len(args) > 1 else 64 << 20,
        parse_size(args[2]) if len(args) > 2 else 4096,
    )
