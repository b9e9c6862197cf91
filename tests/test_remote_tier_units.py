"""RemoteTier parts without processes: placement, health, memcached keys, a lying lender."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlend.lender.server import LenderServer, ServerConfig
from memlend.lender.store import Store
from memlend.remote.health import ACTIVE, DOWN, SUSPENDED, LenderHealth
from memlend.remote.memcached import MemcachedClient
from memlend.remote.placement import Rendezvous
from memlend.remote.secret import auth_key
from memlend.remote.tier import RemoteTier

AUTH = b"A" * 32
SEAL = b"S" * 32
# Health thresholds loose enough for a loaded test machine (pytest -n), except where
# suspension is what is tested: the prober's pings then include our own CPU waits.
LOOSE = {"suspend_avg": 0.2, "suspend_single": 2.0}

# ---- placement ---------------------------------------------------------------------

names = st.lists(
    st.text(alphabet="abcdefghij0123456789:.", min_size=1, max_size=12),
    min_size=1,
    max_size=6,
    unique=True,
)
KEYS = [os.urandom(32) for _ in range(2000)]


@settings(max_examples=40, deadline=None)
@given(names=names, new=st.text(alphabet="klmnop", min_size=1, max_size=8))
def test_adding_a_lender_moves_only_its_share(names: list[str], new: str) -> None:
    before = Rendezvous(names)
    after = Rendezvous([*names, new])
    moved = 0
    for k in KEYS:
        old, now = before.owner(k), after.owner(k)
        if now != old:
            assert now == len(names), "a key moved between two old lenders"
            moved += 1
    # The newcomer takes about 1/(n+1) of the keys.
    share = len(KEYS) / (len(names) + 1)
    assert 0.7 * share < moved < 1.3 * share


@settings(max_examples=40, deadline=None)
@given(names=names.filter(lambda n: len(n) >= 2), data=st.data())
def test_removing_a_lender_moves_only_its_keys(names: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.integers(0, len(names) - 1))
    before = Rendezvous(names)
    rest = [n for i, n in enumerate(names) if i != gone]
    after = Rendezvous(rest)
    for k in KEYS[:500]:
        old = before.owner(k)
        if old != gone:
            assert rest[after.owner(k)] == names[old]


def test_placement_is_deterministic_and_balanced() -> None:
    r = Rendezvous(["memlend://a:1", "memlend://b:1", "memcached://c:1"])
    assert r.owner(b"x" * 32) == Rendezvous(list(r.names)).owner(b"x" * 32)
    groups = r.group(KEYS)
    assert sorted(k for g in groups.values() for k in g) == sorted(KEYS)
    for g in groups.values():
        assert len(g) > len(KEYS) / 3 * 0.85
    with pytest.raises(ValueError):
        Rendezvous(["a", "a"])


# ---- health ---------------------------------------------------------------------------


def active_health() -> LenderHealth:
    h = LenderHealth()
    h.reactivate(0.0001)
    assert h.state == ACTIVE
    return h


def test_health_suspends_on_a_slow_probe_average_and_on_one_very_slow_call() -> None:
    h = active_health()
    for _ in range(20):
        h.ok(0.004)  # reads include our own waits: they do not judge the average
        h.probed([0.0002, 0.0003])
    assert h.active
    for _ in range(20):
        h.probed([0.004, 0.003])
    assert h.state == SUSPENDED and "average" in h.last_error
    h = active_health()
    h.ok(0.041)
    assert h.state == SUSPENDED
    gen = h.generation
    h.reactivate(0.0002)
    assert h.active and h.generation == gen


def test_health_timeouts_in_a_row_suspend_errors_take_down() -> None:
    h = active_health()
    h.timeout(0.002)
    h.timeout(0.002)
    h.ok(0.0001)  # the run is broken
    h.timeout(0.002)
    h.timeout(0.002)
    assert h.active
    h.timeout(0.002)
    assert h.state == SUSPENDED
    h = active_health()
    gen = h.generation
    h.fail("reset")
    assert h.state == DOWN and h.generation == gen + 1 and h.errors == 1
    assert h.fast_enough([0.0001, 0.0002]) and not h.fast_enough([0.0001, 0.05])


# ---- memcached keys ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=1, max_size=300))
def test_memcached_keys_are_legal_and_namespaced(key: bytes) -> None:
    a = MemcachedClient.__new__(MemcachedClient)
    b = MemcachedClient.__new__(MemcachedClient)
    a._prefix = b"ml" + b"A" * 22 + b":"  # what __init__ builds from a 16-byte id
    b._prefix = b"ml" + b"B" * 22 + b":"
    ka, kb = a.encode_key(key), b.encode_key(key)
    assert ka != kb
    assert len(ka) <= 250
    assert all(33 <= c < 127 for c in ka)


# ---- a lender that lies ------------------------------------------------------------------


class LyingStore(Store):
    """Returns another key's value ("swap"), a flipped bit ("flip") or noise ("garbage"),
    or answers honestly but late ("slow")."""

    mode = "honest"

    def get_parts(self, ns, key, touch=True):  # type: ignore[override]
        if self.mode == "slow":
            time.sleep(0.3)
            return super().get_parts(ns, key, touch)
        v = self.get_honest(ns, key)
        if v is None or self.mode == "honest":
            return None if v is None else (memoryview(v), b"")
        if self.mode == "swap":
            others = [k for k in ns.entries if k != key]
            v = self.get_honest(ns, others[0]) if others else v
        elif self.mode == "flip":
            b = bytearray(v)
            b[len(b) // 2] ^= 1
            v = bytes(b)
        else:
            v = os.urandom(len(v))
        return memoryview(v), b""

    def get_honest(self, ns, key) -> bytes | None:
        parts = super().get_parts(ns, key)
        return None if parts is None else bytes(parts[0]) + parts[1]


@pytest.fixture
def lying_lender() -> Iterator[Callable[[], tuple[LenderServer, LyingStore]]]:
    started: list[tuple[LenderServer, threading.Thread]] = []

    def start() -> tuple[LenderServer, LyingStore]:
        store = LyingStore(4 << 20, 4096)  # a few hundred 4 KiB slots
        sock = socket.create_server(("127.0.0.1", 0))
        # Its lies live in get_parts, which the native GET path does not call.
        cfg = ServerConfig(watch_interval=0.05, native_gets=False)
        srv = LenderServer(sock, store, auth_key(AUTH), cfg)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        started.append((srv, t))
        return srv, store

    yield start
    for srv, t in started:
        srv.stop()
        t.join(5)
        srv.store.close()


@pytest.mark.parametrize("mode", ["swap", "flip", "garbage"])
def test_a_lying_lender_is_caught_by_sealing(lying_lender, mode: str) -> None:
    srv, store = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, **LOOSE) as tier:
        keys = [b"%032d" % i for i in range(8)]
        for k in keys:
            tier.put(k, k * 128)
        assert tier.flush()
        assert tier.get_many(keys) == {k: k * 128 for k in keys}  # honest so far
        store.mode = mode
        tier.forget(keys)
        assert tier.get_many(keys) == {}
        s = tier.snapshot()
        assert s["seal_failures"] == 8
        assert s["remote_misses"] == 8 and s["remote_hits"] == 8
        assert s["lenders"][0]["state"] == "active"  # lying is caught per blob, not per lender


def test_exclusive_mode_deletes_what_it_read_and_inclusive_skips_resends(lying_lender) -> None:
    srv, _ = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    keys = [b"%032d" % i for i in range(40)]
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, mode="exclusive", **LOOSE) as tier:
        for k in keys:
            tier.put(k, k)
        assert tier.flush()
        assert len(tier.get_many(keys)) == 40
        assert tier.flush()
        assert tier.get_many(keys) == {}
        assert tier.snapshot()["remote_deletes"] == 40
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, mode="inclusive", batch=8, **LOOSE) as tier:
        for k in keys:
            tier.put(k, k)
        assert tier.flush()
        assert len(tier.get_many(keys)) == 40
        assert len(tier.get_many(keys)) == 40  # still there
        for k in keys:
            tier.put(k, k)  # evicted again: the lender still holds it
        s = tier.snapshot()
        assert s["remote_put_skipped"] == 40 and s["remote_put_blocks"] == 40


def test_queue_overflow_drops_and_counts_and_queued_blocks_are_served(lying_lender, caplog) -> None:
    srv, _ = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    # A long linger holds the put thread back, so the queue fills deterministically.
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, queue_blocks=4, linger=0.5, **LOOSE) as tier:
        t = time.perf_counter()
        for i in range(10):
            tier.put(b"%032d" % i, b"x" * 4096)
        assert time.perf_counter() - t < 0.05  # put never waits for the network
        s = tier.snapshot()
        assert s["remote_dropped_puts"] == 6 and s["remote_queued_blocks"] == 4
        # The high-water mark and the puts refused for want of room say it was full.
        assert s["remote_queue_peak_blocks"] == 4 and s["remote_queue_peak_bytes"] == 4 * 4096
        assert s["remote_queue_full_drops"] == 6
        got = tier.get_many([b"%032d" % i for i in range(10)])
        assert sorted(got) == [b"%032d" % i for i in range(4)]
        assert tier.snapshot()["remote_queue_hits"] == 4
        assert tier.flush()
        assert tier.snapshot()["remote_put_blocks"] == 4
        # Dropped puts are said in the log too, at most once per DROP_LOG_EVERY.
        with caplog.at_level(logging.WARNING, logger="memlend.remote"):
            tier._log_drops(every=0)
            tier._log_drops(every=0)  # nothing new dropped: no second line
        lines = [r.getMessage() for r in caplog.records if "not lent" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("6 blocks not lent"), lines
    # The bound in bytes (for large blocks), if given, holds too.
    with RemoteTier([url], AUTH, SEAL, queue_bytes=10000, linger=0.5, **LOOSE) as tier:
        for i in range(3):
            tier.put(b"%032d" % i, b"x" * 4096)
        s = tier.snapshot()
        assert s["remote_dropped_puts"] == 1 and s["remote_queued_bytes"] == 8192
        assert s["remote_queue_peak_bytes"] == 8192 and s["remote_queue_full_drops"] == 1


def test_a_reader_waits_for_room_in_the_put_queue_instead_of_dropping(lying_lender) -> None:
    srv, _ = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    with RemoteTier([url], AUTH, SEAL, queue_blocks=4, linger=0.2, **LOOSE) as tier:
        for round_ in range(3):
            for i in range(4):
                tier.wait_for_room(1, 4096, timeout=10)
                tier.put(b"%031d%d" % (i, round_), b"x" * 4096)
        assert tier.snapshot()["remote_dropped_puts"] == 0
        assert tier.flush() and tier.snapshot()["remote_put_blocks"] == 12
    # No lender active: no wait at all (the put thread drops such puts at once).
    with RemoteTier(["memlend://127.0.0.1:1"], AUTH, SEAL, queue_blocks=1, linger=5) as tier:
        tier.put(b"%032d" % 0, b"x")
        t = time.monotonic()
        tier.wait_for_room(1, 1, timeout=10)
        assert time.monotonic() - t < 5


def test_put_copies_memoryviews_and_bad_keys_are_misses(lying_lender) -> None:
    srv, _ = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, **LOOSE) as tier:
        buf = bytearray(b"a" * 4096)
        tier.put(b"k" * 32, memoryview(buf))
        buf[:] = b"b" * 4096  # the arena slot is reused at once
        assert tier.flush()
        assert tier.get_many([b"k" * 32, b"", b"z" * 65]) == {b"k" * 32: b"a" * 4096}
        tier.put(b"z" * 65, b"x")  # longer than the protocol allows: dropped
        s = tier.snapshot()
        assert s["remote_dropped_puts"] == 1 and s["remote_queue_full_drops"] == 0


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        RemoteTier(["memlend://127.0.0.1:1"], None, SEAL)
    with pytest.raises(ValueError):
        RemoteTier(["http://127.0.0.1:1"], AUTH, SEAL)
    with pytest.raises(ValueError):
        RemoteTier(["memcached://127.0.0.1:1"], None, SEAL, mode="both")


def test_known_set_is_bounded_and_counters_reach_the_mount_stats(lying_lender) -> None:
    from memlend.stats import MountStats

    srv, _ = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    ms = MountStats()
    with RemoteTier([url], AUTH, SEAL, deadline=0.5, remember_blocks=4, stats=ms, **LOOSE) as tier:
        tier.remember_fetched(*[b"%032d" % i for i in range(10)])
        assert tier.snapshot()["remote_known_blocks"] == 4
        tier.put(b"%032d" % 9, b"x")  # known: skipped
        tier.put(b"%032d" % 0, b"x")  # forgotten by the LRU: queued
        s = tier.snapshot()
        assert s["remote_put_skipped"] == 1 and s["remote_queued_blocks"] == 1
        assert tier.flush()
        tier.get_many([b"%032d" % 0, b"%032d" % 1])
        assert (ms.remote_hits, ms.remote_misses) == (1, 1)


def test_get_one_forgets_a_lent_block_only_when_the_lender_answers_without_it(
    lying_lender,
) -> None:
    srv, store = lying_lender()
    url = "memlend://{}:{}".format(*srv.address)
    key = b"%032d" % 7
    with RemoteTier([url], AUTH, SEAL, deadline=0.05, **LOOSE) as tier:
        tier.put(key, b"v" * 4096)
        assert tier.flush()
        out = memoryview(bytearray(4096))
        assert tier.get_one(key, out) == 4096 and out == b"v" * 4096
        assert tier.snapshot()["remote_known_blocks"] == 1
        store.mode = "slow"  # a timeout says nothing about what the lender holds
        assert tier.get_one(key, out) == -1
        s = tier.snapshot()
        assert s["remote_timeouts"] == 1 and s["remote_known_blocks"] == 1
        time.sleep(0.4)  # the late reply went to the connection the timeout closed
        store.mode = "flip"  # an answer without a valid copy does
        assert tier.get_one(key, out) == -1
        s = tier.snapshot()
        assert s["seal_failures"] == 1 and s["remote_known_blocks"] == 0
