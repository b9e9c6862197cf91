"""policies/auto.py: switching on what the miniature simulations show."""

from __future__ import annotations

import pytest

from memlend.policies import make_policy
from memlend.policies.auto import FULL_SHADOW, START
from memlend.sim import simulate

CLASSICS = ["lru", "2q", "arc", "s3fifo", "sieve", "lirs"]


def changing_stream(c: int) -> list[int]:
    """A loop of 1.5c blocks (only LIRS keeps part of it), then fresh blocks each
    read twice, c/2 apart (LRU and ARC hit the second read, LIRS does not)."""
    loop = list(range(c + c // 2)) * 20
    rereads: list[int] = []
    fresh = 1_000_000
    for _ in range(30):
        group = list(range(fresh, fresh + c // 2))
        rereads += group + group
        fresh += c // 2
    return loop + rereads


def test_auto_switches_with_the_workload_and_beats_every_fixed_policy() -> None:
    c = 200
    stream = changing_stream(c)
    p = make_policy("auto", c)
    hits = sum(p.access(k) for k in stream)
    names = [name for _, name in p.switches]
    # To LIRS during the loop, away from it during the re-reads.
    assert names[0] == "lirs" and names[-1] != "lirs" and START != "lirs", p.switches
    fixed = {name: len(stream) - simulate(stream, name, c).misses for name in CLASSICS}
    assert hits > max(fixed.values()), (hits, fixed)


@pytest.mark.parametrize("c", [50, 400])  # exact shadows; sampled miniature caches
def test_auto_switch_keeps_the_cache_consistent(c: int) -> None:
    # Evicted keys are resident before and gone after; nothing exceeds capacity.
    p = make_policy("auto", c)
    assert (p.rate == 1.0) == (c <= FULL_SHADOW)
    resident: set[int] = set()
    for k in changing_stream(c):
        if k in p:
            assert k in resident
            p.touch(k)
        else:
            evicted = p.admit(k)
            assert set(evicted) <= resident and k not in evicted
            resident -= set(evicted)
            resident.add(k)
        assert set(p.keys()) == resident and len(p) <= c
    assert len(p.switches) >= 2
