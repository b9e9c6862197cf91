"""LRU stack distances of a sampled stream (SHARDS, Waldspurger et al. FAST'15, its
fixed-size variant), for sizing advice at sizes chosen when asked.

mrc.LiveCurve runs miniature caches at sizes fixed when it is built. The remote
tier's curve (the mount: what more memory lent would serve) and the lender's
per-client advice (what a client's last GiB buys) need sizes that move: the blocks
the lenders hold for a mount, a client's holding on a lender. LRU has the inclusion
property, so one stack of the sampled keys gives the hit ratio at every size: a
reference whose stack distance (distinct keys referenced since its last reference)
is d hits in an LRU cache of more than d blocks. Hence LRU here, whatever the
lenders' own policy (s3fifo by default): s3fifo is not a stack algorithm and would
need one miniature cache per size, fixed in advance.

Sampling as in memlend.shards and memlend.mrc: a key is sampled when
hash(key) * mrc.MIX & mrc.MASK < cut, so callers inline that test and call put() or
get() for sampled keys only; a sampled distance d stands for d / rate. Fixed size:
at most `max_keys` keys are tracked; one more drops the tracked key of the largest
hash and lowers `cut` to that hash (FAST'15 §3.3), so memory is bounded whatever the
stream. Each sampled get counts 1 / rate (the gets it stands for), so the counts are
estimates of real gets and a lower rate needs no rescaling of those kept so far.
Counts decay by half every `window` sampled gets, as in mrc.LiveCurve, so the
figures follow phases.

Distances: each tracked key holds the time (a count of sampled references) of its
last reference; a Fenwick tree over those times counts the keys referenced since, in
O(log n). When the times reach the tree's end they are renumbered in order (a sort of
at most max_keys keys, once every 3 x max_keys references).

Not thread-safe: the owner serialises calls (the mount under a lock of its own,
taken only for sampled keys; the lender from its one event-loop thread).
"""

from __future__ import annotations

import heapq
import math
import threading
from array import array
from collections.abc import Container, Hashable

from memlend.mrc import DECAY, MASK, MAX_RATE, MIX
from memlend.shards import threshold

SUB = 16  # histogram buckets per doubling of distance: sizes resolved to ~4%
BUCKETS = 48 * SUB  # distances up to 2**48 blocks
# Heap bytes per tracked key, peak as tracemalloc sees it (tests/test_remote_curve.py):
# dict entry, heap tuple and its int, time int, the key itself when only we hold it,
# and the dict's resizes and the renumbering's copies (~264 B steady, ~310 B peak).
KEY_BYTES = 320
TWO64 = float(1 << 64)


def curve_bytes(max_keys: int) -> int:
    """Upper estimate of a StackCurve's memory with `max_keys` tracked keys."""
    return max_keys * KEY_BYTES + 4 * (4 * max_keys + 2) + 8 * BUCKETS + 2048


class StackCurve:
    """Sampled LRU stack distances of puts and gets; hit ratios at any size."""

    def __init__(self, max_keys: int = 2048, rate: float = MAX_RATE) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.max_keys = max_keys
        self.cut = threshold(rate) << 40  # hash(key) * MIX & MASK < cut: sampled
        self._last: dict[Hashable, int] = {}  # tracked key -> time of its last reference
        self._heap: list[tuple[int, Hashable]] = []  # (-hash, key): the next to drop
        self._span = 4 * max_keys  # times before renumbering
        self._tree = array("i", bytes(4 * (self._span + 1)))  # Fenwick, 1-based
        self._now = 0
        # Estimated gets (each sampled one counts 1 / rate), decayed:
        self.hist = [0.0] * BUCKETS  # that hit, by scaled distance
        self.gets = 0.0  # in all
        self.actual = 0.0  # that the real tier answered
        self.sampled = 0  # sampled gets in all
        self.window = 4 * max_keys
        self._until_decay = self.window

    @property
    def rate(self) -> float:
        return self.cut / TWO64

    # ---- the stream ---------------------------------------------------------------

    def put(self, key: Hashable) -> None:
        """A sampled key was stored (it goes on top of the stack)."""
        self._reference(key, True)

    def get(self, key: Hashable, hit: bool = False, insert: bool = False) -> None:
        """A sampled key was asked for; `hit`: the real tier had it. A key not tracked
        is a cold miss, tracked only with `insert` (a lender stores nothing on a miss)."""
        d = self._reference(key, insert)
        w = TWO64 / self.cut  # 1 / rate
        if d is not None:
            i = int(math.log2(d * w + 1) * SUB)
            self.hist[i if i < BUCKETS else BUCKETS - 1] += w
        self.gets += w
        if hit:
            self.actual += w
        self.sampled += 1
        self._until_decay -= 1
        if not self._until_decay:
            self._until_decay = self.window
            self._scale(DECAY)

    def discard(self, key: Hashable) -> None:
        """A sampled key is gone (invalidated or deleted): off the stack."""
        t = self._last.pop(key, None)
        if t is not None:
            self._add(t, -1)

    def _reference(self, key: Hashable, insert: bool) -> int | None:
        """Move `key` to the top; its sampled stack distance, or None if not tracked."""
        last = self._last
        t = last.get(key)
        d = None
        if t is not None:
            d = len(last) - self._prefix(t + 1)  # every tracked key's time is below now
            self._add(t, -1)
        elif not insert:
            return None
        now = self._now
        last[key] = now
        self._add(now, 1)
        self._now = now + 1
        if t is None:
            heapq.heappush(self._heap, (-(hash(key) * MIX & MASK), key))
            if len(last) > self.max_keys:
                self._drop_largest()
        if self._now == self._span:
            self._renumber()
        return d

    # ---- fixed size ---------------------------------------------------------------

    def _drop_largest(self) -> None:
        heap, last = self._heap, self._last
        if len(heap) > 2 * self.max_keys:  # stale entries of discarded keys
            heap[:] = [(-(hash(k) * MIX & MASK), k) for k in last]
            heapq.heapify(heap)
        while heap:
            neg, key = heapq.heappop(heap)
            t = last.pop(key, None)
            if t is None:
                continue  # discarded earlier
            self._add(t, -1)
            self.cut = -neg  # keys hashed at or above it: no longer sampled
            return

    def _scale(self, f: float) -> None:
        self.hist = [c * f for c in self.hist]
        self.gets *= f
        self.actual *= f

    # ---- Fenwick tree over reference times ------------------------------------------

    def _add(self, t: int, v: int) -> None:
        tree, n = self._tree, self._span
        i = t + 1
        while i <= n:
            tree[i] += v
            i += i & -i

    def _prefix(self, i: int) -> int:
        """Keys whose last reference time is below i."""
        tree, s = self._tree, 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    def _renumber(self) -> None:
        last = self._last
        order = sorted(last, key=last.__getitem__)
        tree = self._tree = array("i", bytes(4 * (self._span + 1)))
        for t, k in enumerate(order):
            last[k] = t
        n = len(order)
        for i in range(1, self._span + 1):  # O(span) build: ones at times 0..n-1
            if i <= n:
                tree[i] += 1
            j = i + (i & -i)
            if j <= self._span:
                tree[j] += tree[i]
        self._now = n

    # ---- reading --------------------------------------------------------------------

    def hits_below(self, blocks: float) -> float:
        """Estimated gets (decayed) that an LRU cache of `blocks` would have served."""
        if blocks <= 0:
            return 0.0
        x = math.log2(blocks + 1) * SUB  # bucket i holds log2(d + 1) * SUB in [i, i + 1)
        whole = min(int(x), BUCKETS)
        hist = self.hist
        s = sum(hist[:whole])
        if whole < BUCKETS:
            s += hist[whole] * (x - whole)
        return s

    def hit_ratio(self, blocks: float) -> float:
        """Estimated hit ratio of the gets with an LRU cache of `blocks`."""
        return self.hits_below(blocks) / self.gets if self.gets else 0.0

    def nbytes(self) -> int:
        return curve_bytes(self.max_keys)

    def tracked(self) -> int:
        return len(self._last)


def keys_within(budget: int) -> int:
    """The most tracked keys whose curve fits `budget` bytes (at least 1)."""
    return max(1, (budget - curve_bytes(0)) // (KEY_BYTES + 16))


# ---- the mount: a curve of the remote tier ------------------------------------------------

REMOTE_BUDGET = 1 << 20  # bytes, whatever the cache or lenders' size
GiB = 1 << 30
REMOTE_EXTRA = (0, 256 << 20, GiB, 4 * GiB)  # bytes lent beyond what the lenders hold now


class RemoteCurve(StackCurve):
    """What the lenders would serve with more memory lent to this mount: a stack of
    the keys it puts and gets. Gets do not insert (a lender stores nothing on a miss;
    the block is lent after the disk read). Exclusive mode: a hit deletes the block
    from its lender, so it leaves the stack. The hooks test `cut` unlocked and lock
    only for sampled keys; a racing drop of the rate is rechecked under the lock."""

    def __init__(self, budget: int = REMOTE_BUDGET, exclusive: bool = False) -> None:
        super().__init__(keys_within(budget))
        self.exclusive = exclusive
        self.lock = threading.Lock()

    def put(self, key: Hashable) -> None:
        with self.lock:
            if hash(key) * MIX & MASK < self.cut:
                super().put(key)

    def got(self, keys: list[Hashable], found: Container[Hashable]) -> None:
        """Sampled keys asked of the tier; `found` holds those it returned."""
        with self.lock:
            cut = self.cut
            for k in keys:
                if hash(k) * MIX & MASK < cut:
                    hit = k in found
                    self.get(k, hit)
                    if hit and self.exclusive:
                        self.discard(k)

    def snapshot(self, capacity: int, block_size: int) -> dict[str, object]:
        """`memlend stats --json`'s remote_curve: hit ratios at the blocks the lenders
        would hold for this mount now (`capacity`) and at REMOTE_EXTRA bytes more."""
        with self.lock:
            points = [
                {
                    "extra_bytes": extra,
                    "blocks": capacity + extra // block_size,
                    "hit_ratio": self.hit_ratio(capacity + extra // block_size),
                }
                for extra in REMOTE_EXTRA
            ]
            actual = self.actual / self.gets if self.gets else 0.0
            return {
                "policy": "lru",
                "rate": self.rate,
                "sampled": self.sampled,
                "tracked": self.tracked(),
                "bytes": self.nbytes(),
                "capacity_blocks": capacity,
                "hit_ratio_actual": actual,
                "points": points,
            }


# ---- the lender: what each client's last GiB buys -------------------------------------------

ADVICE_KEYS = 512  # tracked keys per client
ADVICE_MAX = 2 << 20  # bytes of a lender's --memory for all clients' curves, at most


def advice_budget(memory: int) -> int:
    """Bytes of a lender's --memory set aside for per-client advice: 1/32, up to 2 MiB."""
    return min(ADVICE_MAX, memory // 32)


def client_advice(curve: StackCurve, share: int, held: int, slot_size: int, gib: int = GiB) -> dict:
    """How many of a client's recent hits the last `gib` bytes of its share bought: hits
    whose LRU stack distance falls within the last `gib` of `share` blocks (so none
    while its working set fits in share - gib). The curve sees its puts and hits."""
    below = share - gib // slot_size
    last = curve.hits_below(share) - (curve.hits_below(below) if below > 0 else 0.0)
    hits = curve.actual  # estimated, decayed: the hits the figures cover
    return {
        "rate": curve.rate,
        "sampled": curve.sampled,
        "share_blocks": share,
        "held_blocks": held,
        "gib_bytes": gib,
        "hits": round(hits),
        "last_gib_hits": round(last),
        "last_gib_share": min(1.0, last / hits) if hits else 0.0,
    }
