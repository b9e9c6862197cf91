"""auto: follow whichever candidate policy miniature simulations show winning.

Every candidate runs as a miniature cache (memlend.shards.MiniSim) on a spatially
hashed sample of the keys, sized capacity x rate, with rate = min(1, MINI_BLOCKS /
capacity): a fixed bookkeeping cost however large the cache. The real cache is one
instance of the current policy. Every `window` sampled references the decayed miss
counts are compared; the cache switches when another candidate has missed at least
`margin` (10%) less than the current one, and not sooner than two windows after
the last switch (hysteresis).

A switch rebuilds the new policy from the resident keys in the old policy's
iteration order (no data moves, nothing is evicted): O(capacity) once per switch.
It starts as ARC: with no evidence yet, a re-read soon after a first read (which
LIRS and S3-FIFO's small queue miss when a scan came first) should hit.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator

from memlend.policies import make_policy, register
from memlend.policies.base import Policy
from memlend.shards import MODULUS, MiniSim, key_hash, threshold

CANDIDATES = ("arc", "lirs", "lru", "s3fifo")
START = "arc"
MINI_BLOCKS = 1024  # miniature cache size per candidate, at most (about 4 MiB in all)
# Exact full-size shadows up to FULL_SHADOW keys (a switch then takes the
# shadow's state); above, at most MAX_RATE of the keys and MINI_BLOCKS per candidate.
FULL_SHADOW = 256
MAX_RATE = 0.25
MARGIN = 0.01  # of the references in the (decayed) window
DWELL = 2  # windows after a switch before the next
WINDOW_MIN, WINDOW_MAX, WINDOW_FRACTION = 64, 4096, 1.0
DECAY = 0.5  # per window: a phase older than a few windows stops counting


def mini_keys(capacity: int) -> int:
    """Keys of each candidate's miniature cache for a cache of `capacity` keys."""
    if capacity <= FULL_SHADOW:
        return capacity
    return max(FULL_SHADOW, min(MINI_BLOCKS, int(capacity * MAX_RATE)))


@register
class Auto(Policy):
    name = "auto"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.rate = mini_keys(capacity) / capacity
        self._threshold = threshold(self.rate)
        self._all = self._threshold >= MODULUS
        # Sampled references per decision.
        self.window = max(WINDOW_MIN, min(WINDOW_MAX, int(capacity * WINDOW_FRACTION)))
        self.minis = {p: MiniSim(p, capacity, self.rate) for p in CANDIDATES}
        self.current = START
        self.active: Policy = make_policy(START, capacity)
        self.switches: list[tuple[int, str]] = []  # (sampled reference, policy)
        self._seen = 0
        self._since_switch = DWELL  # the first switch needs no wait
        self._pending: str | None = None  # a switch decided on a hit waits for a miss

    def __contains__(self, key: Hashable) -> bool:
        return key in self.active

    def __len__(self) -> int:
        return len(self.active)

    def keys(self) -> Iterator[Hashable]:
        return self.active.keys()

    def touch(self, key: Hashable) -> None:
        self.active.touch(key)
        self._observe(key)

    def admit(self, key: Hashable) -> list[Hashable]:
        evicted = self.active.admit(key)
        self._observe(key)
        if self._pending is not None:
            evicted += self._switch(self._pending, key)
        return evicted

    def discard(self, key: Hashable) -> None:
        self.active.discard(key)

    def _observe(self, key: Hashable) -> None:
        if not self._all and key_hash(key) >= self._threshold:
            return
        for mini in self.minis.values():
            mini.access(key)
        self._seen += 1
        if self._seen % self.window == 0:
            self._decide()

    def _decide(self) -> None:
        self._since_switch += 1
        cur = self.minis[self.current]
        best = min(self.minis.values(), key=lambda m: m.misses)
        if (
            best is not cur
            and self._since_switch >= DWELL
            and cur.misses - best.misses > MARGIN * cur.accesses
        ):
            self._pending = best.policy_name
        for mini in self.minis.values():
            mini.decay(DECAY)

    def _switch(self, name: str, just_admitted: Hashable) -> list[Hashable]:
        """Make `name` the active policy; return the resident keys it drops."""
        old = self.active
        dropped: list[Hashable] = []
        if self._all:
            # The miniature cache is a full-size exact shadow: take its state, less
            # the keys whose data the real cache does not hold, and drop the keys it
            # would not hold.
            new = copy.deepcopy(self.minis[name].cache)
            forget = getattr(new, "forget", new.discard)
            for key in [k for k in new.keys() if k not in old]:  # noqa: SIM118
                forget(key)
            dropped = [k for k in old.keys() if k not in new and k != just_admitted]  # noqa: SIM118
            if just_admitted not in new:
                dropped += new.admit(just_admitted)
        else:
            new = make_policy(name, self.capacity)
            for key in list(old.keys()):
                new.admit(key)
        self.active = new
        self.current = name
        self.switches.append((self._seen, name))
        self._since_switch = 0
        self._pending = None
        return dropped
