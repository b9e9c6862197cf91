"""Replacement policies, one per module, registered by name."""

from __future__ import annotations

from memlend.policies.base import Policy

# name -> class; filled by the policy modules below.
POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


# Python heap per resident key (policy entries + ghost history), the worst of three
# access patterns measured by `python -m memlend.bench.bookkeeping` together with
# the local tier's index (lru 457, 2q 358, arc 443, s3fifo 759, sieve 427, lirs 1152
# bytes per block in all), plus a margin. Used to size caches so that a memory
# budget covers bookkeeping too, not just data.
# LIRS: the traced heap (memlend.bench.bookkeeping) is ~1150 bytes per slot, but the
# resident memory it costs is more (allocator pools, dict growth): 1880 bytes per slot
# with the index, RssAnon after reading two 2 GiB files at random and one in order
# through a 400 MiB cache (docs/benchmarks.md, the testbed's daemon memory).
_BOOKKEEPING = {"lru": 512, "sieve": 512, "arc": 640, "2q": 640, "s3fifo": 960, "lirs": 1920}
_BOOKKEEPING["s3fifo-tuned"] = _BOOKKEEPING["s3fifo"]
_BOOKKEEPING["lirs-tuned"] = _BOOKKEEPING["lirs"]  # 3x history, measured at 3x
_BOOKKEEPING["lirs-lazy"] = _BOOKKEEPING["lirs"] + 8  # + its 64-bit-per-slot bitmap
# auto: its active policy at worst (LIRS); the miniature caches come on top
# (slots_within).
_BOOKKEEPING["auto"] = _BOOKKEEPING["lirs"]


def bookkeeping_bytes(name: str) -> int:
    """Upper estimate of the heap policy `name` uses per resident key."""
    return _BOOKKEEPING.get(name, 1536)


def _mini_bytes_per_key(name: str) -> int:
    """auto runs a miniature cache per candidate: their bookkeeping per key."""
    if name != "auto":
        return 0
    from memlend.policies.auto import CANDIDATES

    return sum(bookkeeping_bytes(c) for c in CANDIDATES)


def extra_bytes(name: str, slots: int) -> int:
    """Bookkeeping of policy `name` beyond bookkeeping_bytes per key: auto's
    miniature caches (policies.auto.mini_keys keys each)."""
    mini = _mini_bytes_per_key(name)
    if not mini:
        return 0
    from memlend.policies.auto import mini_keys

    return mini_keys(slots) * mini


def slots_within(budget: int, per_block: int, name: str) -> int:
    """How many keys policy `name` holds in `budget` bytes when each also costs
    `per_block`: the largest n with n x (per_block + bookkeeping) + extra_bytes(n)
    within the budget (extra_bytes grows with n, by less than a key's cost)."""
    per_key = per_block + bookkeeping_bytes(name)
    n = budget // per_key
    while n > 0 and n * per_key + extra_bytes(name, n) > budget:
        # Each step removes at least the overshoot's worth of keys: few steps.
        n -= max(1, (n * per_key + extra_bytes(name, n) - budget) // (2 * per_key))
    return max(0, n)


def make_policy(name: str, capacity: int) -> Policy:
    """Build policy `name` with `capacity` resident keys; ValueError if unknown."""
    try:
        cls = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown policy {name!r} (known: {known})") from None
    return cls(capacity)


# Import for their registration side effect.
from memlend.policies import arc, auto, lirs, lru, s3fifo, s3fifo_tuned, sieve, twoq  # noqa: E402,F401
