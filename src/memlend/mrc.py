"""A live miss-ratio curve of the local tier: what hit ratio a cache 0.5x to 8x as
large would have had on the reads seen so far, for sizing advice.

SHARDS (memlend.shards): every block lookup is offered to the curve; a key is
sampled when key_hash(key) < T, and each sampled reference runs one miniature cache
of the mount's policy per size multiplier (a cache of C blocks is simulated by one of
C x rate). Counts decay by half every `window` sampled references (twice the biggest
miniature cache), as in policies/auto.py, so the curve follows phases.

Fixed memory, fixed rate: the miniature caches hold at most round(slots x m x rate)
keys each, so their memory is set when the curve is built. The rate is chosen then,
as the largest that keeps them within `budget` bytes (curve_budget: at most 1/32 of
the cache and 8 MiB) and at most LOCAL_MAX_RATE. Fixed-size SHARDS (FAST'15 §3.3) lowers
the rate as distinct keys arrive because it tracks every sampled key for all cache
sizes; here only five sizes are simulated and each is a capacity-bounded cache, so
the bound holds from the start without resampling.
"""

from __future__ import annotations

from memlend.policies import bookkeeping_bytes
from memlend.shards import MODULUS, MiniSim, threshold

MULTIPLIERS = (0.5, 1, 2, 4, 8)
MAX_BYTES = 8 << 20  # all miniature caches together, whatever the cache size
CACHE_FRACTION = 32  # and at most 1/32 of --cache-size (the rest holds blocks)
# The remote curve and the lenders' advice (stackcurve.py) sample at most one key in 32:
# ~4 µs per sampled key against a remote hit's 40-50 µs.
MAX_RATE = 1 / 32
# A sampled reference of the local curve runs five miniature caches (~3.4 µs with
# lirs-lazy); at most one key in 128 keeps that under 30 ns per hit on average
# (docs/policies.md, "CPU cost": the curve costs 0.3-0.5% of a local hit's CPU).
LOCAL_MAX_RATE = 1 / 128
WINDOW_MIN = 256  # sampled references between decays, at least
DECAY = 0.5
# shards.key_hash(key) < T is tested as hash(key) * MIX & MASK < cut (cut = T << 40):
# callers on the hot path inline it, then call record() for the sampled keys only.
MIX = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def curve_budget(cache_size: int) -> int:
    """Bytes of --cache-size set aside for the curve's miniature caches."""
    return min(MAX_BYTES, cache_size // CACHE_FRACTION)


def curve_rate(slots: int, budget: int, policy: str, multipliers: tuple[float, ...]) -> float:
    """The largest sampling rate (up to LOCAL_MAX_RATE) whose miniature caches fit `budget`."""
    # One key per multiplier of slack for scaled_size's rounding. (Caches under ~1 MiB
    # get the five one-key miniature caches, a few KiB past their budget.)
    keys = budget // bookkeeping_bytes(policy) - len(multipliers)
    return max(1 / MODULUS, min(LOCAL_MAX_RATE, keys / (slots * sum(multipliers))))


def curve_policy(policy: str) -> str:
    """The policy the miniature caches run: the mount's, but LRU for auto (which runs
    its own four miniature caches per reference: five of those would cost 20)."""
    return "lru" if policy == "auto" else policy


class LiveCurve:
    """Miniature caches at `slots` x each multiplier, fed every lookup of the local
    tier. Not thread-safe: the owner calls it under its lock."""

    def __init__(
        self,
        slots: int,
        rate: float,
        multipliers: tuple[float, ...] = MULTIPLIERS,
        policy: str = "lru",
    ) -> None:
        self.rate = rate
        self.policy = policy
        self.multipliers = multipliers
        self.cut = threshold(rate) << 40
        self.minis = [MiniSim(policy, max(1, round(slots * m)), rate) for m in multipliers]
        biggest = max(m.cache.capacity for m in self.minis)
        # The biggest fills in about its size of references: decaying slower than that
        # keeps its cold misses from dominating its ratio.
        self.window = max(WINDOW_MIN, 2 * biggest)
        self.sampled = 0  # sampled references in all
        self.hits = 0.0  # the real cache's hits and references among them, decayed alike
        self.refs = 0.0
        self._until_decay = self.window

    def in_sample(self, key: int) -> bool:
        """Whether `key` is in the sample (the same answer at every reference)."""
        return hash(key) * MIX & MASK < self.cut

    def access(self, key: int, hit: bool) -> None:
        """One lookup of `key` by a read; `hit` says whether the real cache had it."""
        if self.in_sample(key):
            self.record(key, hit)

    def record(self, key: int, hit: bool) -> None:
        """access() of a key known to be sampled."""
        for mini in self.minis:
            mini.access(key)
        self.sampled += 1
        self.refs += 1
        if hit:
            self.hits += 1
        self._until_decay -= 1
        if not self._until_decay:
            self._until_decay = self.window
            for mini in self.minis:
                mini.decay(DECAY)
            self.hits *= DECAY
            self.refs *= DECAY

    @property
    def hit_ratio(self) -> float:
        """The real cache's hit ratio on the sampled references (decayed)."""
        return self.hits / self.refs if self.refs else 0.0

    def points(self, cache_bytes: int) -> list[tuple[int, float]]:
        """(cache size, estimated hit ratio) per multiplier of `cache_bytes`."""
        return [
            (round(cache_bytes * m), 1 - mini.miss_ratio if mini.accesses else 0.0)
            for m, mini in zip(self.multipliers, self.minis, strict=True)
        ]

    def nbytes(self) -> int:
        """Upper estimate of the miniature caches' memory when full."""
        return sum(m.cache.capacity for m in self.minis) * bookkeeping_bytes(self.policy)

    def snapshot(self, cache_bytes: int) -> dict[str, object]:
        """The curve for `memlend stats --json`: sizes as multiples of `cache_bytes`."""
        return {
            "policy": self.policy,
            "rate": self.rate,
            "sampled": self.sampled,
            "bytes": self.nbytes(),
            "hit_ratio_now": self.hit_ratio,
            "points": [
                {"multiplier": m, "cache_bytes": b, "hit_ratio": r}
                for m, (b, r) in zip(self.multipliers, self.points(cache_bytes), strict=True)
            ],
        }
