"""SHARDS sampling and miniature simulations (memlend.shards, memlend sim --sample)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memlend.cli import main
from memlend.shards import key_hash, mean_absolute_error, sample, sampled_miss_ratio
from memlend.sim import simulate


def test_sampling_is_spatial_and_near_the_rate() -> None:
    keys = list(range(200_000))
    picked = sample(keys, 0.01)
    # Every reference of a sampled key is kept, none of an unsampled one.
    assert sample(keys + keys, 0.01) == picked + picked
    assert abs(len(picked) - 2000) < 200  # 1% of the keys, give or take 10%
    assert all(0 <= key_hash(k) < 1 << 24 for k in range(1000))
    assert sample(keys[:10], 1.0) == keys[:10]


def test_loop_curve_knee_is_at_the_loop_length() -> None:
    # A loop of N blocks, three passes: LRU misses everything below N blocks and only
    # the cold misses (1/3) from N on. The sampled curve must show the knee between
    # the sizes either side of N and stay within 0.01 of the exact curve.
    n, rate = 50_000, 0.01
    trace = list(range(n)) * 3
    sampled = sample(trace, rate)
    sizes = [int(n * f) for f in (0.5, 0.8, 0.9, 1.1, 1.25, 1.5, 2.0)]
    exact = [simulate(trace, "lru", c).miss_ratio for c in sizes]
    est = [sampled_miss_ratio(sampled, "lru", c, rate) for c in sizes]
    assert exact == [1.0, 1.0, 1.0] + [pytest.approx(1 / 3)] * 4
    below = [c for c, m in zip(sizes, est, strict=True) if m > 0.5]
    above = [c for c, m in zip(sizes, est, strict=True) if m <= 0.5]
    assert max(below) == int(0.9 * n) and min(above) == int(1.1 * n), est
    assert mean_absolute_error(exact, est) <= 0.01
    # SHARDS_adj (the sim's estimate) counts misses over the expected sampled
    # references; on a uniform loop both agree within the bound.
    adj = [sampled_miss_ratio(sampled, "lru", c, rate, len(trace)) for c in sizes]
    assert mean_absolute_error(exact, adj) <= 0.01


def test_adjusted_estimate_corrects_an_unsampled_hot_key() -> None:
    # 1,000 cold keys read twice, and one hot key read 100,000 times: at 1% the hot
    # key is not sampled (the test checks), so the sampled stream is all cold keys
    # and its plain miss ratio is 0.5 where the trace's is ~0.0099. SHARDS_adj
    # divides the sampled misses by the expected sampled references.
    hot = next(k for k in range(10**6, 10**7) if not sample([k], 0.01))
    trace = [hot] * 100_000 + list(range(1000)) * 2
    sampled = sample(trace, 0.01)
    exact = simulate(trace, "lru", 2000).miss_ratio
    plain = sampled_miss_ratio(sampled, "lru", 2000, 0.01)
    adj = sampled_miss_ratio(sampled, "lru", 2000, 0.01, len(trace))
    assert plain == 0.5 and abs(adj - exact) < 0.005, (plain, adj, exact)


def test_sim_sample_reports_estimates_and_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "loop.trace"
    trace.write_text("\n".join(str(k) for k in list(range(20_000)) * 2) + "\n")
    rc = main(["sim", str(trace), "--policy", "lru", "--size", "50%,150%", "--sample", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "MAE" in out and "~" in out
    argv = ["sim", str(trace), "--policy", "lru,arc", "--size", "50%,150%", "--json"]
    assert main([*argv, "--sample", "0.05"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["miss_ratio"] for r in rows] == [1.0, 1.0, 0.5, 0.5]
    for r in rows:
        assert r["sample_rate"] == 0.05
        assert abs(r["sampled_miss_ratio"] - r["miss_ratio"]) < 0.05
