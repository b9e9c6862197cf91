"""The live miss-ratio curve (memlend.mrc): its knee, its memory bound, and the
sizing advice of a real mount."""

from __future__ import annotations

import json
import tracemalloc
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import memlend
from memlend.fs.cache import FILE_SHIFT, slots_for
from memlend.mrc import MAX_BYTES, MULTIPLIERS, LiveCurve, curve_budget, curve_rate
from memlend.shards import key_hash, threshold

_MIX_INVERSE = pow(0x9E3779B97F4A7C15, -1, 1 << 64)


def test_knee_of_a_loop_at_its_size() -> None:
    """A loop of N blocks read 3 times: no hit below N, 2 of 3 above (the second and
    third passes), the knee between 0.9N and 1.1N."""
    n, passes = 20_000, 3
    curve = LiveCurve(n, 0.1, (0.5, 0.9, 1.1, 2), "lru")
    keys = [(7 << FILE_SHIFT) | b for b in range(n)]
    for _ in range(passes):
        for k in keys:
            curve.access(k, False)
    assert abs(curve.sampled - passes * n * 0.1) < 0.05 * passes * n * 0.1
    ratio = dict(curve.points(n))
    assert ratio[n // 2] < 0.01
    assert ratio[round(0.9 * n)] < 0.01
    assert abs(ratio[round(1.1 * n)] - (passes - 1) / passes) < 0.01
    assert abs(ratio[2 * n] - (passes - 1) / passes) < 0.01
    assert curve.hit_ratio == 0.0  # what the real cache had: told so at each access


def test_sampling_is_shards_key_hash() -> None:
    curve = LiveCurve(1000, 0.25)
    t = threshold(0.25)
    for k in range(3000):
        before = curve.sampled
        curve.access(k, True)
        assert curve.sampled - before == (key_hash(k) < t)


def sampled_keys(count: int, rate: float) -> list[int]:
    """`count` distinct ints that SHARDS samples at `rate`: the multiplicative hash
    run backwards from hash values below the threshold."""
    t, keys, v = threshold(rate), [], 0
    while len(keys) < count:
        k = (((v % t) << 40 | v) * _MIX_INVERSE) & ((1 << 64) - 1)
        v += 1
        if k < (1 << 61) - 1 and key_hash(k) < t:  # hash(k) is k below 2**61 - 1
            keys.append(k)
    return keys


@pytest.mark.parametrize("policy", ["lru", "arc", "lirs", "s3fifo"])
def test_memory_bound_of_a_100_gib_cache(policy: str) -> None:
    """A 100 GiB cache of 16 KiB blocks: the curve's miniature caches stay within
    8 MiB (tracemalloc) however many distinct keys are sampled."""
    size, bs = 100 << 30, 16 << 10
    slots = slots_for(size, bs, policy)
    assert slots > 5_000_000
    budget = curve_budget(size)
    assert budget == MAX_BYTES
    rate = curve_rate(slots, budget, policy, MULTIPLIERS)
    keys = sampled_keys(40_000, rate)
    tracemalloc.start()
    try:
        curve = LiveCurve(slots, rate, MULTIPLIERS, policy)
        for k in keys:
            curve.access(k, False)
        for k in keys[::2]:  # re-references: promotions, ghosts, LIRS's stack
            curve.access(k, True)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert curve.sampled == 60_000
    biggest = max(m.cache.capacity for m in curve.minis)
    assert biggest < 40_000  # the keys overflow every miniature cache
    assert all(len(m.cache) == m.cache.capacity for m in curve.minis)  # all full
    assert curve.nbytes() <= budget
    assert used <= MAX_BYTES, f"{used} bytes"


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        s.labels["cache_bytes"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "memlend_curve_hit_ratio"
    }


def read_all(path, chunk: int) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


@pytest.mark.tiers("memlend")
@pytest.mark.parametrize("chunk", [64 << 10, 1 << 20])  # below and in read-ahead
def test_mount_curve_of_a_file_read_twice(mount_factory, chunk: int) -> None:
    """A 32 MiB file read twice through a 16 MiB LRU cache hits nothing; the curve
    says 4x the cache would have held it for the second pass. (Big enough for about
    128 sampled lookups at the local curve's largest rate, 1/128.)"""
    m = mount_factory(
        "--cache-size", "16M", "--block-size", "4K", "--policy", "lru",
        "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    (m.backing / "f").write_bytes(bytes(32 << 20))
    read_all(m.mnt / "f", chunk)
    read_all(m.mnt / "f", chunk)
    s = json.loads(memlend("stats", str(m.mnt), "--json").stdout)
    curve = s["curve"]
    at = {p["multiplier"]: p for p in curve["points"]}
    assert curve["sampled"] > 100
    assert curve["hit_ratio_now"] < 0.05
    assert at[4]["cache_bytes"] == 4 * (16 << 20)
    assert at[4]["hit_ratio"] > 0.4
    assert at[4]["hit_ratio"] > curve["hit_ratio_now"] + 0.3
    assert at[0.5]["hit_ratio"] < 0.05
    assert scrape(s["metrics"])[str(4 * (16 << 20))] == pytest.approx(at[4]["hit_ratio"], abs=0.05)
    human = memlend("stats", str(m.mnt)).stdout
    assert "local hit ratio 0% now" in human and "with 4x (64.0 MiB)" in human


@pytest.mark.tiers("kernel")
def test_no_curve_for_the_kernel_tier(mount_factory) -> None:
    m = mount_factory("--block-size", "4K")
    assert m.stats()["curve"] is None
    assert "no miss-ratio curve" in memlend("stats", str(m.mnt)).stdout
