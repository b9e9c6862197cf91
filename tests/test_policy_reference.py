"""The classic policies are their definitions: miss ratios on shared/traces within
0.001 of shared/policy-reference.md, at every cache size the table lists.

The table is parsed from the file itself, so nothing here repeats its figures.
The three long traces (lirs_loop 505,500 accesses, 3-6 s for the six policies at one
size; lirs_2_pools and lirs_sprite 1-2 s a size) are checked at one size each here
to keep the suite fast; docs/policies.md covers every size with the same code
(`python -m memlend.bench.policy_reference`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from memlend.bench.policy_reference import (
    TOLERANCE,
    Reference,
    compare,
    find_shared,
    load_reference,
)
from memlend.sim import load_trace

# Long traces: the sizes checked here, where memlend's earlier LIRS or S3-FIFO were
# off the table.
SLOW_TRACE_SIZES = {"lirs_loop": {10}, "lirs_2_pools": {1}, "lirs_sprite": {5}}
SHARED = find_shared(Path(__file__))


@cache
def reference() -> Reference:
    return load_reference(SHARED)


@cache
def trace_keys(name: str) -> list[int]:
    return load_trace(str(SHARED / "traces" / f"{name}.trace.gz"))


def test_reference_table_covers_every_shared_trace() -> None:
    traces = {p.name.removesuffix(".trace.gz") for p in (SHARED / "traces").iterdir()}
    assert {t for t, _ in reference()} == traces
    assert {f for _, f in reference()} == {1, 5, 10, 25}


@pytest.mark.parametrize(
    ("trace", "percent"),
    [(t, f) for t, f in sorted(reference()) if f in SLOW_TRACE_SIZES.get(t, {f})],
)
def test_classic_policies_match_reference(trace: str, percent: int) -> None:
    blocks, expected = reference()[(trace, percent)]
    keys = trace_keys(trace)
    # The table's size rule: C = max(1, floor(f x unique blocks)).
    assert blocks == max(1, len(set(keys)) * percent // 100)
    diff = compare(keys, blocks, expected)
    assert all(abs(d) <= TOLERANCE for d in diff.values()), diff
