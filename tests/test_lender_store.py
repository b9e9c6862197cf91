"""The lender's store: slots, namespaces, fairness, quota, giving memory back."""

from __future__ import annotations

import pytest

from memlend.lender.store import TAIL_MAX, Store, memory_for
from memlend.lender.watcher import Watcher
from memlend.policies import POLICIES

SLOT = 4096


def make(slots: int, **kw) -> Store:
    return Store(memory_for(slots, SLOT, kw.get("policy", "s3fifo")), SLOT, **kw)


def check(st: Store) -> None:
    total = sum(len(n.entries) for n in st._ns.values())
    assert st.used == total == len(st.policy) <= st.allowed <= st.slots


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_put_get_evict_with_every_policy(policy: str) -> None:
    st = make(16, policy=policy)
    ns = st.namespace(b"a")
    for i in range(100):
        value = bytes([i]) * (SLOT + 29)  # a sealed block: one slot plus a tail
        assert st.put(ns, b"k%d" % i, value)
        assert bytes(st.get(ns, b"k%d" % i)) == value
        check(st)
    assert st.used == 16 and st.evictions == 84


def test_values_too_big_are_refused_and_small_ones_fit() -> None:
    st = make(4)
    ns = st.namespace(b"a")
    assert not st.put(ns, b"big", b"x" * (SLOT + TAIL_MAX + 1))
    assert st.put(ns, b"small", b"abc")
    assert bytes(st.get(ns, b"small")) == b"abc"
    assert st.put(ns, b"small", b"longer value")  # overwrite in place
    assert bytes(st.get(ns, b"small")) == b"longer value"
    assert st.get(ns, b"missing") is None
    assert (st.hits, st.misses, st.refused) == (2, 1, 1)


def test_namespaces_are_isolated() -> None:
    st = make(8)
    a, b = st.namespace(b"a"), st.namespace(b"b")
    st.put(a, b"k", b"secret of a")
    assert st.get(b, b"k") is None
    st.put(b, b"k", b"b's own")
    assert bytes(st.get(a, b"k")) == b"secret of a"
    assert st.invalidate_all(b) == 1
    assert bytes(st.get(a, b"k")) == b"secret of a"


def test_invalidation_by_key_and_prefix() -> None:
    st = make(8)
    a = st.namespace(b"a")
    for k in (b"f1/0", b"f1/1", b"f2/0"):
        st.put(a, k, b"v")
    assert st.invalidate(a, [b"f1/0", b"nope"]) == 1
    assert st.invalidate_prefix(a, b"f1/") == 1
    assert st.get(a, b"f2/0") is not None
    check(st)


def test_fixed_quota_caps_a_client() -> None:
    st = make(20, client_quota=5 * SLOT)
    a, b = st.namespace(b"a"), st.namespace(b"b")
    for i in range(50):
        st.put(a, b"%d" % i, b"x")
    assert len(a.entries) == 5
    assert st.get(a, b"49") is not None  # the newest stay
    st.put(b, b"k", b"y")
    assert len(b.entries) == 1
    check(st)


def test_no_client_takes_all_memory_from_the_others() -> None:
    st = make(20)
    a, b = st.namespace(b"a"), st.namespace(b"b")
    for i in range(20):
        st.put(a, b"a%d" % i, b"x")
    assert len(a.entries) == 20  # alone, a may use everything
    for i in range(100):  # b wants it all too ...
        st.put(b, b"b%d" % i, b"y")
        st.put(a, b"a-again%d" % i, b"x")
    assert len(a.entries) == len(b.entries) == 10  # ... and both end with a fair share
    check(st)


def test_set_allowed_gives_memory_back_and_grows_again() -> None:
    st = make(32)
    a = st.namespace(b"a")
    for i in range(32):
        st.put(a, b"%d" % i, b"x" * SLOT)
    given = st.set_allowed(8)
    assert given == 24 * SLOT and st.used == 8 and st.given_back == given
    # While the host is short a new block only replaces the client's oldest: the
    # lender's contents follow the client, its memory does not grow.
    assert st.put(a, b"new", b"x")
    assert st.used == 8 and bytes(st.get(a, b"new")) == b"x" and st.get(a, b"24") is None
    check(st)
    b = st.namespace(b"b")
    assert not st.put(b, b"k", b"x")  # a client holding nothing gets nothing meanwhile
    st.set_allowed(32)
    assert st.put(b, b"k", b"x") and st.used == 9
    check(st)


def test_watcher_follows_the_memory_source() -> None:
    st = make(64)
    a = st.namespace(b"a")
    for i in range(64):
        st.put(a, b"%d" % i, b"x" * SLOT)
    avail = [100 * SLOT]
    w = Watcher(st, lambda: avail[0], reserve=50 * SLOT)
    assert w.check() == 0 and st.used == 64
    avail[0] = 40 * SLOT  # 10 slots short: those, plus the hysteresis margin
    margin = -(-(10 * SLOT + w.hysteresis) // SLOT) - 10
    assert w.check() == (10 + margin) * SLOT
    assert st.used == st.allowed == 54 - margin
    avail[0] = 50 * SLOT  # at the reserve, inside the hysteresis: stay
    w.check()
    assert st.allowed == 54 - margin
    avail[0] = 200 * SLOT
    w.check()
    assert st.allowed == 64


def test_watcher_survives_a_failing_source() -> None:
    st = make(4)

    def broken() -> int:
        raise OSError("gone")

    w = Watcher(st, broken, reserve=SLOT)
    assert w.check() == 0 and w.errors == 1


def test_memory_too_small_for_one_slot() -> None:
    with pytest.raises(ValueError):
        Store(1000, SLOT)
