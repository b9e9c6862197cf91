"""Replacement policies: each fast policy against a slow reference, plus invariants.

Each reference below is written straight from its paper's pseudo-code over plain
Python lists (index 0 = oldest / LRU / bottom), with O(n) list operations, so that
it is easy to check by eye. The only changes from the papers are the ones each
policy module documents for `discard` (no ghost is left; free slots after a discard
are filled before anything is evicted) and for tiny capacities.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlend.policies import POLICIES, make_policy

# ---------------------------------------------------------------- references


class RefLRU:
    def __init__(self, c: int) -> None:
        self.c, self.L = c, []

    def resident(self) -> set:
        return set(self.L)

    def ghosts(self) -> int:
        return 0

    def hit(self, x) -> None:
        self.L.remove(x)
        self.L.append(x)

    def miss(self, x) -> list:
        ev = []
        if len(self.L) >= self.c:
            ev.append(self.L.pop(0))
        self.L.append(x)
        return ev

    def discard(self, x) -> None:
        if x in self.L:
            self.L.remove(x)


class RefARC:
    """Megiddo & Modha, FAST'03, figure 4; REPLACE only when the cache is full."""

    def __init__(self, c: int) -> None:
        self.c, self.p = c, 0.0
        self.T1, self.T2, self.B1, self.B2 = [], [], [], []

    def resident(self) -> set:
        return set(self.T1) | set(self.T2)

    def ghosts(self) -> int:
        return len(self.B1) + len(self.B2)

    def full(self) -> bool:
        return len(self.T1) + len(self.T2) >= self.c

    def replace(self, x) -> list:
        if not self.full():
            return []
        if self.T1 and (
            (x in self.B2 and len(self.T1) == self.p) or len(self.T1) > self.p or not self.T2
        ):
            y = self.T1.pop(0)
            self.B1.append(y)
        else:
            y = self.T2.pop(0)
            self.B2.append(y)
        return [y]

    def hit(self, x) -> None:  # case I
        if x in self.T1:
            self.T1.remove(x)
        else:
            self.T2.remove(x)
        self.T2.append(x)

    def miss(self, x) -> list:
        c = self.c
        if x in self.B1:  # case II
            d = 1 if len(self.B1) >= len(self.B2) else len(self.B2) / len(self.B1)
            self.p = min(c, self.p + d)
            ev = self.replace(x)
            self.B1.remove(x)
            self.T2.append(x)
            return ev
        if x in self.B2:  # case III
            d = 1 if len(self.B2) >= len(self.B1) else len(self.B1) / len(self.B2)
            self.p = max(0, self.p - d)
            ev = self.replace(x)
            self.B2.remove(x)
            self.T2.append(x)
            return ev
        ev = []  # case IV
        if len(self.T1) + len(self.B1) == c:  # case A
            if len(self.T1) < c:
                self.B1.pop(0)
                ev = self.replace(x)
            else:
                ev = [self.T1.pop(0)]
        else:  # case B
            total = len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2)
            if total >= c:
                if total == 2 * c:
                    self.B2.pop(0)
                ev = self.replace(x)
        self.T1.append(x)
        return ev

    def discard(self, x) -> None:
        for lst in (self.T1, self.T2):
            if x in lst:
                lst.remove(x)


class RefS3FIFO:
    """libCacheSim's S3-FIFO with its defaults (shared/policy-reference.md): S of
    10% (at least 1), M of the rest, G of |M| ids, move to M after 2 hits in S."""

    def __init__(self, c: int) -> None:
        self.c = c
        self.small = max(1, int(c * 0.1))
        self.mcap = c - self.small
        self.S, self.M, self.G, self.freq = [], [], [], {}

    def resident(self) -> set:
        return set(self.S) | set(self.M)

    def ghosts(self) -> int:
        return len(self.G)

    def hit(self, x) -> None:
        self.freq[x] += 1

    def miss(self, x) -> list:
        ev = []
        while len(self.S) + len(self.M) >= self.c:
            if len(self.M) > self.mcap or not self.S:
                t = self.M.pop(0)
                if self.freq[t] >= 1:
                    self.freq[t] = min(self.freq[t], 3) - 1
                    self.M.append(t)
                else:
                    del self.freq[t]
                    ev.append(t)
            else:
                while self.S:  # until one key leaves (promotions can fill M)
                    t = self.S.pop(0)
                    if self.freq[t] >= 2:
                        self.freq[t] = 0
                        self.M.append(t)
                        continue
                    del self.freq[t]
                    ev.append(t)
                    if self.mcap:
                        self.G.append(t)
                        if len(self.G) > self.mcap:
                            self.G.pop(0)
                    break
        if x in self.G:
            self.G.remove(x)
            self.M.append(x)
        else:
            self.S.append(x)
        self.freq[x] = 0
        return ev

    def discard(self, x) -> None:
        for lst in (self.S, self.M):
            if x in lst:
                lst.remove(x)
                del self.freq[x]


class RefS3FIFOTuned:
    """Yang et al., SOSP'23, algorithm 1, with promotion at freq > 0."""

    def __init__(self, c: int) -> None:
        self.c = c
        self.small = max(1, c // 10)
        self.gcap = max(1, c - self.small)
        self.S, self.M, self.G, self.freq = [], [], [], {}

    def resident(self) -> set:
        return set(self.S) | set(self.M)

    def ghosts(self) -> int:
        return len(self.G)

    def hit(self, x) -> None:
        self.freq[x] = min(self.freq[x] + 1, 3)

    def evict_s(self):
        while self.S:
            t = self.S.pop(0)
            if self.freq[t] > 0:
                self.M.append(t)
            else:
                self.G.append(t)
                if len(self.G) > self.gcap:
                    self.G.pop(0)
                del self.freq[t]
                return t
        return None

    def evict_m(self):
        while True:
            t = self.M.pop(0)
            if self.freq[t] > 0:
                self.freq[t] -= 1
                self.M.append(t)
            else:
                del self.freq[t]
                return t

    def miss(self, x) -> list:
        ev = []
        while len(self.S) + len(self.M) >= self.c:
            y = None
            if len(self.S) >= self.small or not self.M:
                y = self.evict_s()
            ev.append(self.evict_m() if y is None else y)
        if x in self.G:
            self.G.remove(x)
            self.M.append(x)
        else:
            self.S.append(x)
        self.freq[x] = 0
        return ev

    def discard(self, x) -> None:
        for lst in (self.S, self.M):
            if x in lst:
                lst.remove(x)
                del self.freq[x]


class RefSIEVE:
    """Zhang et al., NSDI'24, figure 3. Q[0] is the tail (oldest)."""

    def __init__(self, c: int) -> None:
        self.c, self.Q, self.visited, self.hand = c, [], {}, None

    def resident(self) -> set:
        return set(self.Q)

    def ghosts(self) -> int:
        return 0

    def hit(self, x) -> None:
        self.visited[x] = True

    def miss(self, x) -> list:
        ev = []
        if len(self.Q) >= self.c:
            i = 0 if self.hand is None else self.Q.index(self.hand)
            while self.visited[self.Q[i]]:
                self.visited[self.Q[i]] = False
                i = i + 1 if i + 1 < len(self.Q) else 0
            o = self.Q[i]
            self.hand = self.Q[i + 1] if i + 1 < len(self.Q) else None
            self.Q.pop(i)
            del self.visited[o]
            ev.append(o)
        self.Q.append(x)
        self.visited[x] = False
        return ev

    def discard(self, x) -> None:
        if x in self.Q:
            i = self.Q.index(x)
            if self.hand == x:
                self.hand = self.Q[i + 1] if i + 1 < len(self.Q) else None
            self.Q.pop(i)
            del self.visited[x]


class Ref2Q:
    """Johnson & Shasha, VLDB'94, full 2Q."""

    def __init__(self, c: int) -> None:
        self.c, self.kin, self.kout = c, max(1, c // 4), max(1, c // 2)
        self.A1in, self.A1out, self.Am = [], [], []

    def resident(self) -> set:
        return set(self.A1in) | set(self.Am)

    def ghosts(self) -> int:
        return len(self.A1out)

    def hit(self, x) -> None:
        if x in self.Am:
            self.Am.remove(x)
            self.Am.append(x)

    def reclaim(self) -> list:
        if len(self.A1in) + len(self.Am) < self.c:
            return []  # a free slot
        if len(self.A1in) > self.kin or not self.Am:
            y = self.A1in.pop(0)
            self.A1out.append(y)
            if len(self.A1out) > self.kout:
                self.A1out.pop(0)
        else:
            y = self.Am.pop(0)
        return [y]

    def miss(self, x) -> list:
        if x in self.A1out:
            self.A1out.remove(x)
            ev = self.reclaim()
            self.Am.append(x)
        else:
            ev = self.reclaim()
            self.A1in.append(x)
        return ev

    def discard(self, x) -> None:
        for lst in (self.A1in, self.Am):
            if x in lst:
                lst.remove(x)


class RefLIRS:
    """Jiang & Zhang, SIGMETRICS'02, section 3.3; |S| <= 2c by dropping the ghost
    nearest the bottom of S."""

    factor = 2

    def __init__(self, c: int) -> None:
        self.c = c
        self.lir_cap = c - max(1, c // 100)
        self.S, self.Q, self.lir = [], [], set()

    def resident(self) -> set:
        return self.lir | set(self.Q)

    def ghosts(self) -> int:
        return sum(1 for k in self.S if k not in self.resident())

    def prune(self) -> None:
        while self.S and self.S[0] not in self.lir:
            self.S.pop(0)

    def bound(self) -> None:
        while len(self.S) > self.factor * self.c:
            res = self.resident()
            self.S.remove(next(k for k in self.S if k not in res))

    def to_top(self, x) -> None:
        if x in self.S:
            self.S.remove(x)
        self.S.append(x)

    def promote(self, x) -> None:
        self.lir.add(x)
        if len(self.lir) > self.lir_cap:
            y = self.S.pop(0)
            assert y in self.lir
            self.lir.remove(y)
            self.Q.append(y)
            self.prune()

    def hit(self, x) -> None:
        if x in self.lir:
            self.to_top(x)
            self.prune()
        elif x in self.S:
            self.to_top(x)
            self.Q.remove(x)
            self.promote(x)
        else:
            self.S.append(x)
            self.Q.remove(x)
            self.Q.append(x)
            self.bound()

    def miss(self, x) -> list:
        ev = []
        if len(self.lir) + len(self.Q) >= self.c:
            ev.append(self.Q.pop(0))  # stays in S, if there, as a ghost
        if x in self.S:
            self.to_top(x)
            self.promote(x)
        elif self.starts_lir(x):
            self.S.append(x)
            self.lir.add(x)
        else:
            self.S.append(x)
            self.Q.append(x)
        self.prune()
        self.bound()
        return ev

    def starts_lir(self, x) -> bool:
        """A key never in S is LIR on admission while the LIR set has room."""
        return len(self.lir) < self.lir_cap

    def discard(self, x) -> None:
        if x in self.lir:
            self.lir.remove(x)
            self.S.remove(x)
        elif x in self.Q:
            self.Q.remove(x)
            if x in self.S:
                self.S.remove(x)
        self.prune()


class RefLIRSTuned(RefLIRS):
    factor = 3


class RefLIRSLazy(RefLIRS):
    """LIRS whose LIR set fills only by reuse: until it is full, S is not pruned and
    a key never in S becomes LIR only if it was admitted before (an exact set here;
    the policy's bitmap is exact for the tests' small int keys)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.seen: set = set()

    def prune(self) -> None:
        if len(self.lir) >= self.lir_cap:
            super().prune()

    def promote(self, x) -> None:
        super().promote(x)
        self.prune()

    def starts_lir(self, x) -> bool:
        if len(self.lir) >= self.lir_cap:
            return False
        if x in self.seen:
            return True
        self.seen.add(x)
        return False


REFERENCES = {
    "s3fifo-tuned": RefS3FIFOTuned,
    "lirs-tuned": RefLIRSTuned,
    "lru": RefLRU,
    "arc": RefARC,
    "s3fifo": RefS3FIFO,
    "sieve": RefSIEVE,
    "2q": Ref2Q,
    "lirs": RefLIRS,
    "lirs-lazy": RefLIRSLazy,
}

# ------------------------------------------------------------ differential


def ops_strategy(alphabet: int, max_size: int):
    # (op, key); op 0 is a discard (about 1 in 10), anything else an access.
    return st.lists(st.tuples(st.integers(0, 9), st.integers(0, alphabet - 1)), max_size=max_size)


def replay_both(name: str, capacity: int, ops: list) -> None:
    fast = make_policy(name, capacity)
    ref = REFERENCES[name](capacity)
    for step, (op, key) in enumerate(ops):
        where = f"{name} c={capacity} step {step} op={op} key={key}"
        if op == 0:
            fast.discard(key)
            ref.discard(key)
        else:
            hit = key in fast
            assert hit == (key in ref.resident()), where
            if hit:
                fast.touch(key)
                ref.hit(key)
            else:
                assert fast.admit(key) == ref.miss(key), where
        assert set(fast.keys()) == ref.resident(), where
        assert len(fast) == len(ref.resident()), where
        if hasattr(fast, "ghosts"):
            assert fast.ghosts() == ref.ghosts(), where


@pytest.mark.parametrize("name", sorted(REFERENCES))
@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 8), ops=ops_strategy(12, 150))
def test_matches_reference_small(name: str, capacity: int, ops: list) -> None:
    replay_both(name, capacity, ops)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(9, 40), ops=ops_strategy(80, 600))
def test_matches_reference_larger(name: str, capacity: int, ops: list) -> None:
    # Larger capacities exercise the proportional shares (10%, 25%, 50%, 1%).
    replay_both(name, capacity, ops)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("capacity", [1, 3, 10, 150])
def test_matches_reference_skewed_random(name: str, capacity: int) -> None:
    # A long skewed sequence reaches deep states (full ghost lists, p at its
    # bounds, LIRS stack limit) that short hypothesis examples rarely do.
    rng = random.Random(capacity)
    alphabet = 4 * capacity + 4
    ops = []
    for _ in range(3000):
        key = int(alphabet * rng.random() ** 2)
        ops.append((0 if rng.random() < 0.03 else 1, key))
    replay_both(name, capacity, ops)


def test_every_policy_has_a_reference() -> None:
    # The other policies are registered by other modules; fail loudly if one of
    # ours lost its reference.
    assert set(REFERENCES) <= set(POLICIES)


# ------------------------------------------------- invariants, all policies


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 8), ops=ops_strategy(14, 200))
def test_invariants(name: str, capacity: int, ops: list) -> None:
    # Keys as in the mount: (file_id, block_no) tuples.
    policy = make_policy(name, capacity)
    resident: set = set()
    for op, k in ops:
        key = (k % 3, k)
        if op == 0:
            policy.discard(key)
            resident.discard(key)
            assert key not in policy
        elif key in policy:
            assert key in resident
            policy.touch(key)
        else:
            assert key not in resident
            evicted = policy.admit(key)
            assert len(evicted) == len(set(evicted))
            for e in evicted:
                assert e in resident and e != key and e not in policy
            resident -= set(evicted)
            resident.add(key)
            assert key in policy
        assert len(policy) <= capacity
        assert len(policy) == len(resident)
        assert set(policy.keys()) == resident
        for r in resident:
            assert r in policy
        ghosts = getattr(policy, "ghosts", lambda: 0)()
        assert ghosts <= 3 * capacity


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_capacity_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError):
        make_policy(name, 0)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ghost_memory_bounded_on_long_scan(name: str) -> None:
    policy = make_policy(name, 50)
    for key in range(20_000):
        if key in policy:
            policy.touch(key)
        else:
            policy.admit(key)
        if key % 7 == 0:  # re-reference some recent keys to create ghosts hits
            k = key - 60
            if k >= 0 and k not in policy:
                policy.admit(k)
    assert len(policy) <= 50
    assert getattr(policy, "ghosts", lambda: 0)() <= 150
    for attr in ("_s", "_ghost", "_a1out", "_b1", "_b2"):
        if hasattr(policy, attr):
            assert len(getattr(policy, attr)) <= 150


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", 4)


# ------------------------------------------------------------ known answers


def hits(policy, keys) -> int:
    return sum(policy.access(k) for k in keys)


@pytest.mark.parametrize(
    ("name", "keeps_hot_set"),
    [("lru", False), ("arc", True), ("s3fifo", True), ("lirs", True), ("2q", True)],
)
def test_scan_does_not_flush_hot_set(name: str, keeps_hot_set: bool) -> None:
    capacity = 100
    policy = make_policy(name, capacity)
    hot = list(range(20))
    fresh = iter(range(1000, 10**6))
    # Warm-up: the hot set is re-referenced between one-time keys.
    for _ in range(30):
        hits(policy, hot)
        hits(policy, [next(fresh) for _ in range(10)])
    hits(policy, [next(fresh) for _ in range(10 * capacity)])  # a long scan
    after = hits(policy, hot)
    if keeps_hot_set:
        assert after == len(hot)
    else:
        assert after == 0


@pytest.mark.parametrize(("name", "min_hits"), [("lru", 0), ("lirs", 150)])
def test_loop_slightly_larger_than_cache(name: str, min_hits: int) -> None:
    # LRU misses every access of a loop over c+1 keys; LIRS keeps c-1 of them.
    policy = make_policy(name, 10)
    n = hits(policy, list(range(11)) * 20)
    assert n >= min_hits
    if name == "lru":
        assert n == 0


@pytest.mark.parametrize(
    ("name", "hits_expected"), [("lirs", 0), ("lirs-lazy", 2048), ("arc", 2048)]
)
def test_file_read_twice_after_a_scan(name: str, hits_expected: int) -> None:
    # The re-read case of tests/test_mount_reread.py in keys: a scan of 4.8x the
    # cache, then 2,048 blocks read twice. The paper's LIRS made the scan's first
    # blocks LIR and misses the second read; lirs-lazy grants LIR only on reuse.
    policy = make_policy(name, 3400)
    hits(policy, [("big", k) for k in range(16384)])
    hits(policy, [("small", k) for k in range(2048)])
    assert hits(policy, [("small", k) for k in range(2048)]) == hits_expected


def test_lirs_lazy_loop_becomes_lir_on_its_second_pass() -> None:
    # A loop of 1.5c: LIRS keeps its first c-1 blocks from the second pass on;
    # lirs-lazy learns them on the second pass and hits them from the third.
    c, loop = 100, list(range(150))
    lazy, lirs = make_policy("lirs-lazy", c), make_policy("lirs", c)
    assert [hits(lazy, loop) for _ in range(4)] == [0, 0, 99, 99]
    assert [hits(lirs, loop) for _ in range(4)] == [0, 99, 99, 99]


def test_lirs_lazy_remembers_first_references_beyond_its_stack() -> None:
    # A loop of 20c (the lirs_loop trace at 5%): S holds 2c keys, the bitmap the rest.
    c, loop = 50, list(range(1000))
    lazy = make_policy("lirs-lazy", c)
    assert [hits(lazy, loop) for _ in range(3)] == [0, 0, 49]


def test_sieve_known_answer_hand_position() -> None:
    p = make_policy("sieve", 3)
    for k in "abc":
        p.admit(k)
    p.touch("a")
    assert p.admit("d") == ["b"]  # queue (old->new): a c d, hand on c
    assert p.admit("e") == ["c"]  # queue: a d e, hand on d
    p.touch("d")
    # Hand on d (visited: cleared), then e (unvisited): e goes.
    assert p.admit("f") == ["e"]
    assert sorted(p.keys()) == ["a", "d", "f"]


def test_2q_hit_in_a1in_does_not_promote() -> None:
    p = make_policy("2q", 4)  # Kin = 1
    for k in "abcd":
        p.admit(k)
    for _ in range(5):
        p.touch("a")
    # A1in holds a b c d (> Kin), so the oldest, a, goes despite its hits.
    assert p.admit("e") == ["a"]
    # a is now in A1out: coming back, it enters Am.
    p.admit("a")
    assert "a" in p._am


@pytest.mark.parametrize("name", ["s3fifo", "s3fifo-tuned"])
def test_s3fifo_ghost_hit_goes_to_main_and_one_hit_wonders_leave_quickly(name: str) -> None:
    p = make_policy(name, 10)  # small queue 1, main 9
    for k in range(10):
        p.admit(k)
    p.touch(5)
    assert p.admit(10) == [0]  # 0 was never hit: evicted from S to the ghost queue
    assert p.admit(0) == [1]
    assert 0 in p._main  # ghost hit


def test_s3fifo_moves_to_main_after_two_hits_in_small() -> None:
    p = make_policy("s3fifo", 20)  # small queue 2, main 18
    for k in range(20):
        p.admit(k)  # S = 0..19 (nothing evicted yet, nothing in M)
    p.touch(0)
    p.touch(1)
    p.touch(1)
    # 0 had one hit (below the threshold of 2): evicted; 1 had two: moved to M.
    assert p.admit(20) == [0]
    assert p.admit(21) == [2]
    assert 1 in p._main and 1 not in p._small
    # The tuned variant promotes after one hit.
    t = make_policy("s3fifo-tuned", 20)
    for k in range(20):
        t.admit(k)
    t.touch(0)
    assert t.admit(20) == [1]


def test_arc_adapts_p_on_ghost_hits() -> None:
    p = make_policy("arc", 4)
    for k in range(4):
        p.admit(k)
    p.touch(3)  # T1 = 0 1 2, T2 = 3
    assert p.admit(4) == [0]  # |T1| > p = 0: T1's LRU key goes to B1
    assert p.p == 0
    p.admit(0)  # B1 ghost hit: p grows
    assert p.p > 0
    assert 0 in p._t2


def test_discard_absent_is_noop() -> None:
    for name in POLICIES:
        p = make_policy(name, 3)
        p.discard("x")
        p.admit("a")
        p.discard("b")
        assert list(p.keys()) == ["a"]
