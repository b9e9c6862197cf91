"""The remote tier's curve (mount) and the lender's per-client advice
(memlend.stackcurve): synthetic streams with known answers, the memory bound, and
one real lender with a real mount."""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest

from conftest import Lender, Mount, memlend
from memlend.lender.store import Store, memory_for
from memlend.mrc import MASK, MIX
from memlend.stackcurve import (
    ADVICE_KEYS,
    REMOTE_BUDGET,
    RemoteCurve,
    StackCurve,
    client_advice,
    curve_bytes,
)
from test_metrics import family, scrape

MiB = 1 << 20


def feed_loop(curve: RemoteCurve, n: int, passes: int = 1) -> None:
    """Put a loop of n blocks, then get it `passes` times, as RemoteTier's hooks do."""
    keys = [b"block%08d" % i for i in range(n)]
    for k in keys:
        if hash(k) * MIX & MASK < curve.cut:
            curve.put(k)
    for _ in range(passes):
        for k in keys:
            if hash(k) * MIX & MASK < curve.cut:
                curve.got([k], (k,))


def test_remote_curve_knee_is_at_the_loop() -> None:
    # 128 KiB blocks: +256 MiB = 2,048 blocks, +1 GiB = 8,192, +4 GiB = 32,768.
    n, bs = 20_000, 128 << 10
    curve = RemoteCurve()
    feed_loop(curve, n, passes=2)
    snap = curve.snapshot(15_000, bs)
    ratios = [p["hit_ratio"] for p in snap["points"]]
    assert [p["blocks"] for p in snap["points"]] == [15_000, 17_048, 23_192, 47_768]
    assert ratios[0] < 0.05 and ratios[1] < 0.05, ratios  # 0.75n, 0.85n: the loop misses
    assert ratios[2] > 0.95 and ratios[3] > 0.95, ratios  # 1.16n, 2.4n: it all fits
    assert snap["hit_ratio_actual"] == 1.0  # what the (fake) lenders answered
    assert 0.8 * n / 32 < snap["sampled"] / 2 < 1.2 * n / 32  # rate 1/32: all keys fit
    # Exact on an unsampled stream: a get hits a cache larger than its stack distance.
    exact = StackCurve(100, rate=1.0)
    for k in (1, 2, 3):
        exact.put(k)
    exact.get(1, True)  # distance 2 (keys 2, 3 since)
    assert exact.hit_ratio(1) == 0 and exact.hit_ratio(4) == 1


def test_remote_curve_gets_do_not_insert_and_exclusive_hits_leave() -> None:
    c = StackCurve(100, rate=1.0)
    c.get(7)  # never put: a cold miss, not tracked
    c.get(7)
    assert c.tracked() == 0 and c.hit_ratio(1 << 30) == 0
    ex = RemoteCurve(exclusive=True)
    ex.cut = 1 << 64  # sample everything
    for k in (b"a", b"b"):
        ex.put(k)
    ex.got([b"a"], {b"a"})  # a hit deletes it from the lender
    assert ex.tracked() == 1


def test_fixed_size_lowers_the_rate_and_keeps_memory_under_the_budget() -> None:
    rnd = random.Random(1)
    tracemalloc.start()
    try:
        curve = RemoteCurve()
        for i in range(200_000):  # far more distinct sampled keys than it may track
            k = (b"%024d" % i) if i % 3 else (b"%024d" % rnd.randrange(i + 1))
            if hash(k) * MIX & MASK < curve.cut:
                curve.put(k)
                curve.got([k], ())
        used, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert curve.tracked() == curve.max_keys
    assert curve.rate < 1 / 32
    assert curve.nbytes() <= REMOTE_BUDGET
    assert peak <= REMOTE_BUDGET, (used, peak)


# ---- the lender: what a client's last "GiB" buys ------------------------------------

SLOT = 4096
SHARE = 300  # slots
GIB = 64 * SLOT  # the "last GiB" of these tests: 64 blocks


def advice_store() -> Store:
    budget = curve_bytes(ADVICE_KEYS)
    return Store(
        memory_for(SHARE, SLOT) + budget,
        SLOT,
        advice_bytes=budget,
        advice_gib=GIB,
        advice_rate=1.0,
    )


def loop_client(store: Store, working_set: int, passes: int = 4) -> dict:
    ns = store.namespace(b"client-a")
    assert ns is not None
    keys = [b"k%06d" % i for i in range(working_set)]
    for k in keys:
        assert store.put(ns, k, b"x" * 100)
    for _ in range(passes):
        assert all(k in ns.entries for k in keys)  # every get a hit
        store.served(ns, keys, 0)  # as the native GET path reports its hits
    return store.advice_per_client()[b"client-a"[:8].hex()]


def test_lender_last_gib_buys_nothing_when_the_working_set_fits_without_it() -> None:
    store = advice_store()
    assert store.slots == SHARE
    a = loop_client(store, 200)  # fits in SHARE - 64 = 236
    assert a["share_blocks"] == SHARE and a["held_blocks"] == 200
    assert a["hits"] == 800
    assert a["last_gib_hits"] <= 0.02 * a["hits"], a
    assert a["last_gib_share"] < 0.02


def test_lender_last_gib_buys_every_hit_when_they_need_it() -> None:
    store = advice_store()
    a = loop_client(store, 280)  # stack distance 279: within SHARE - 64 .. SHARE
    assert store.hits == 4 * 280  # the store really holds it all
    assert a["last_gib_hits"] >= 0.95 * a["hits"], a
    assert a["last_gib_share"] > 0.95


def test_lender_advice_is_counted_and_forgets_invalidated_keys() -> None:
    store = advice_store()
    ns = store.namespace(b"c")
    assert ns is not None
    store.put(ns, b"a", b"1")
    assert ns.curve is not None and ns.curve.tracked() == 1
    store.invalidate(ns, [b"a"])
    assert ns.curve.tracked() == 0
    # One curve fits the budget: a second client gets none (and no advice line).
    other = store.namespace(b"d")
    assert other is not None
    store.put(other, b"a", b"1")
    assert other.curve is None and list(store.advice_per_client()) == [b"c".hex()]
    # The curve's memory comes off the slots, not on top of --memory.
    assert Store(memory_for(SHARE, SLOT), SLOT, advice_bytes=curve_bytes(1)).slots < SHARE
    # A client advice dict on its own: no hits, no share.
    assert client_advice(StackCurve(4), 10, 0, SLOT)["last_gib_share"] == 0.0


# ---- a real lender and a real mount ------------------------------------------------------


@pytest.mark.tiers("memlend")
def test_stats_report_the_remote_curve_and_the_lenders_advice(
    mount_factory, lender_factory, secret_file: Path, seal_key_file: Path
) -> None:
    lender: Lender = lender_factory("--metrics", "127.0.0.1:0")
    assert lender.proc.stdout is not None
    lender_metrics = lender.proc.stdout.readline().split("http://")[1].split("/")[0]
    m: Mount = mount_factory(
        "--cache-size", "4M", "--block-size", "16K", "--seal-key-file", str(seal_key_file),
        "--remote-deadline", "20", "--lender-streams", "always", "--metrics", "127.0.0.1:0",
        "--lender", lender.url, "--secret-file", str(secret_file),
    )  # fmt: skip
    data = os.urandom(16 * MiB)
    (m.backing / "f").write_bytes(data)
    for _ in range(2):  # the first pass lends what the 4 MiB cache evicts, the second reads it back
        with open(m.mnt / "f", "rb") as f:
            assert f.read() == data
    s = json.loads(memlend("stats", str(m.mnt), "--json").stdout)
    assert s["remote_hits"] > 0, s
    rc = s["remote_curve"]
    assert rc["sampled"] > 0 and rc["policy"] == "lru"
    ratios = [p["hit_ratio"] for p in rc["points"]]
    assert all(0 <= r <= 1 for r in ratios), rc
    assert ratios == sorted(ratios), rc
    # The lender has room (its share is 64 MiB): now, the estimate is what it served.
    assert rc["capacity_blocks"] > 1024 and abs(ratios[0] - rc["hit_ratio_actual"]) < 0.25, rc
    assert [p["extra_bytes"] for p in rc["points"]] == [0, 256 * MiB, 1 << 30, 4 << 30]
    assert "remote tier:" in memlend("stats", str(m.mnt)).stdout
    gauge = family(scrape(s["metrics"]), "memlend_remote_curve_hit_ratio")
    assert sorted(dict(k)["extra_bytes"] for k in gauge) == sorted(
        str(p["extra_bytes"]) for p in rc["points"]
    )
    addr = f"127.0.0.1:{lender.port}"
    ls = json.loads(
        memlend("stats", "--lender", addr, "--secret-file", str(secret_file), "--json").stdout
    )
    advice = ls["client_advice"]
    assert len(advice) == 1, ls  # the mount's namespace; `stats` itself puts nothing
    (a,) = advice.values()
    assert a["held_blocks"] > 0 and a["share_blocks"] >= a["held_blocks"]
    assert 0 <= a["last_gib_hits"] <= max(a["hits"], 0) + 1 and 0 <= a["last_gib_share"] <= 1
    human = memlend("stats", "--lender", addr, "--secret-file", str(secret_file)).stdout
    assert "recent hits" in human
    lm = scrape(lender_metrics)
    for name in ("memlend_lend_client_last_gib_hits", "memlend_lend_client_last_gib_share"):
        assert [dict(k)["client"] for k in family(lm, name)] == list(advice), name
