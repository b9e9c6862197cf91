"""LIRS (Jiang & Zhang, SIGMETRICS 2002): Low Inter-reference Recency Set.

Resident keys are LIR (low inter-reference recency, the bulk of the cache) or HIR
(resident share max(1, capacity // 100)). Stack S orders keys by recency and holds
every LIR key, some resident HIR keys and some non-resident HIR keys (ghosts); its
bottom is always a LIR key ("stack pruning"). Queue Q holds the resident HIR keys;
misses evict its front. A HIR key hit while still in S has a reuse distance shorter
than the oldest LIR key's, so it becomes LIR and the bottom LIR key is demoted to
the end of Q.

Bounded history: S holds at most `stack_factor` x capacity keys, 2 as in the
reference definition (shared/policy-reference.md); beyond that the ghost nearest the
bottom of S is dropped. Ghosts are appended to `_ghosts` in the order they are
created, which is also their order in S (resident HIR keys in S enter Q exactly
when they move to the top of S, and Q evicts in FIFO order), so "nearest the
bottom" is simply the oldest entry of `_ghosts`: O(1).

`lirs-tuned` (LIRSTuned) keeps 3x capacity keys of history: memlend's earlier
default, tuned on shared/traces (mean miss ratio at 1/5/10/25% 0.599 with 2x, 0.589
with 3x there), so it is a separate, named policy. `lirs-lazy` (LIRSLazy, the
mount's default) grants LIR status only on reuse: see its class.

Deviations needed only for `discard` (and for capacity 1, where there is no LIR
room): a key becomes LIR whenever the LIR set has room, and a demotion happens only
when the LIR set is over its share. Without discards this is the paper's algorithm.

discard(key) removes a resident key from S and Q and leaves no ghost; for a
non-resident key it is a no-op (its ghost entry, if any, is kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from memlend.policies import register
from memlend.policies.base import Policy

_LIR, _HIR = 0, 1


@register
class LIRS(Policy):
    name = "lirs"
    stack_factor = 2

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.hir_capacity = max(1, capacity // 100)
        self.lir_capacity = capacity - self.hir_capacity
        self.stack_limit = self.stack_factor * capacity
        self._status: dict[Hashable, int] = {}  # resident key -> _LIR or _HIR
        self._nlir = 0
        # OrderedDicts: S from bottom to top, Q from front (next victim) to end.
        self._s: OrderedDict[Hashable, None] = OrderedDict()
        self._q: OrderedDict[Hashable, None] = OrderedDict()
        self._ghosts: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._status

    def __len__(self) -> int:
        return len(self._status)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._status)

    def ghosts(self) -> int:
        return len(self._ghosts)

    def _prune(self) -> None:
        # Drop HIR keys from the bottom of S until a LIR key is there.
        s, status = self._s, self._status
        while s:
            key = next(iter(s))
            st = status.get(key)
            if st == _LIR:
                return
            del s[key]
            if st is None:
                del self._ghosts[key]

    def _bound(self) -> None:
        s, ghosts = self._s, self._ghosts
        while len(s) > self.stack_limit:
            del s[ghosts.popitem(last=False)[0]]

    def _make_lir(self, key: Hashable) -> None:
        # `key` is already at the top of S.
        self._status[key] = _LIR
        self._nlir += 1
        if self._nlir > self.lir_capacity:
            bottom = next(iter(self._s))
            del self._s[bottom]
            self._status[bottom] = _HIR
            self._nlir -= 1
            self._q[bottom] = None
            self._prune()

    def touch(self, key: Hashable) -> None:
        s = self._s
        if self._status[key] == _LIR:
            was_bottom = next(iter(s)) == key
            s.move_to_end(key)
            if was_bottom:
                self._prune()
        elif key in s:
            s.move_to_end(key)
            del self._q[key]
            self._make_lir(key)
        else:
            s[key] = None
            self._q.move_to_end(key)
            if len(s) > self.stack_limit:
                self._bound()

    def admit(self, key: Hashable) -> list[Hashable]:
        s, status = self._s, self._status
        evicted = []
        if len(status) >= self.capacity:
            victim = self._q.popitem(last=False)[0]
            del status[victim]
            if victim in s:
                self._ghosts[victim] = None
            evicted.append(victim)
        if key in s:  # a ghost: its reuse distance beats the oldest LIR key's
            del self._ghosts[key]
            s.move_to_end(key)
            self._make_lir(key)
        elif self._starts_lir(key):
            s[key] = None
            status[key] = _LIR
            self._nlir += 1
        else:
            s[key] = None
            status[key] = _HIR
            self._q[key] = None
        if status.get(next(iter(s))) != _LIR:
            self._prune()
        if len(s) > self.stack_limit:
            self._bound()
        return evicted

    def _starts_lir(self, key: Hashable) -> bool:
        """Whether a key never seen in S becomes LIR on admission: while the LIR
        set has room (the paper's cold start)."""
        return self._nlir < self.lir_capacity

    def forget(self, key: Hashable) -> None:
        """Make resident `key` non-resident, keeping it in S as a ghost if it is
        there: a later reference counts as a short reuse. (policies/auto.py uses it
        when it takes over a shadow's state without that key's data.)"""
        if self._unresident(key):
            if key in self._s:
                self._ghosts[key] = None
            self._prune()

    def discard(self, key: Hashable) -> None:
        if self._unresident(key):
            self._s.pop(key, None)
            self._prune()

    def _unresident(self, key: Hashable) -> bool:
        """Drop `key`'s residency (LIR count or Q entry); False if it was not resident."""
        st = self._status.pop(key, None)
        if st is None:
            return False
        if st == _LIR:
            self._nlir -= 1
        else:
            del self._q[key]
        return True


@register
class LIRSTuned(LIRS):
    """LIRS with 3x capacity keys of history (see the module docstring)."""

    name = "lirs-tuned"
    stack_factor = 3


@register
class LIRSLazy(LIRS):
    """LIRS whose LIR set fills only by reuse (docs/policies.md, "lirs-lazy").

    The paper's LIRS makes the first blocks it sees LIR until the LIR set is full:
    after a scan the cache is full of scanned blocks nobody reads again, and a file
    read twice right after the scan goes through the 1% HIR share and misses both
    times. Here a block becomes LIR only when referenced again while its first
    reference is still remembered; until the LIR set is full, the room it does not
    use holds HIR blocks (LRU-like, so a re-read soon after a first read hits), S is
    not pruned (it is the history that detects a reuse), and first references of
    blocks that left S are remembered in a bitmap of 64 bits per cache slot,
    cleared when half its bits are set (a false positive makes a block LIR at once,
    as the paper's cold start would). Once the LIR set is full this is LIRS.
    """

    name = "lirs-lazy"
    SEEN_BITS_PER_SLOT = 64

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        # Odd: the mount's keys are file_id << 40 | block, and with a power-of-two
        # modulus every file's block b would share one bit. A file's consecutive
        # blocks take consecutive bits (no collisions among them); each file starts
        # at its own offset, file_id * 2**40 mod the modulus.
        self._seen_mod = max(1024, self.SEEN_BITS_PER_SLOT * capacity) | 1
        self._seen = bytearray((self._seen_mod + 7) // 8)
        self._seen_set = 0

    def _prune(self) -> None:
        # While the LIR set has room S keeps its HIR history (nothing to prune to).
        if self._nlir >= self.lir_capacity:
            super()._prune()

    def _make_lir(self, key: Hashable) -> None:
        super()._make_lir(key)
        if self._nlir == self.lir_capacity:
            self._prune()  # the LIR set just filled: restore S's LIR bottom

    def _starts_lir(self, key: Hashable) -> bool:
        if self._nlir >= self.lir_capacity:
            return False
        h = hash(key) % self._seen_mod
        byte, bit = h >> 3, 1 << (h & 7)
        if self._seen[byte] & bit:
            return True  # a second reference: its block is worth a LIR slot
        self._seen[byte] |= bit
        self._seen_set += 1
        if 2 * self._seen_set > self._seen_mod:
            self._seen = bytearray(len(self._seen))
            self._seen_set = 0
        return False
