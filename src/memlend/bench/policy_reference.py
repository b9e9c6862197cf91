"""Check the classic policies against shared/policy-reference.md, every row.

    python -m memlend.bench.policy_reference [SHARED_DIR]
    python -m memlend.bench.policy_reference --against auto,lirs-tuned [SHARED_DIR]

Replays every trace of SHARED_DIR/traces (default: the shared/ found beside the
repository) through lru, 2q, arc, s3fifo, sieve and lirs at the sizes the table
lists, and prints a Markdown table of memlend's miss ratio minus the reference's.
Exits 1 if any difference is above 0.001. tests/test_policy_reference.py runs the
same comparison on a quick subset.

With --against, it instead replays the named policies at 5%, 10% and 25% and
prints each one's miss ratio minus the best classic's in the reference table (the
issue-12 goal: at or below it on every row).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from memlend.errors import UserError
from memlend.sim import load_trace, simulate

CLASSICS = ["lru", "2q", "arc", "s3fifo", "sieve", "lirs"]
TOLERANCE = 0.001
_COLUMNS = {
    "LRU": "lru",
    "2Q": "2q",
    "ARC": "arc",
    "S3-FIFO": "s3fifo",
    "SIEVE": "sieve",
    "LIRS": "lirs",
    "OPT": "opt",
}

# (trace, percent) -> (cache blocks, {policy: reference miss ratio})
Reference = dict[tuple[str, int], tuple[int, dict[str, float]]]


def find_shared(start: Path | None = None) -> Path:
    """The shared/ directory beside the repository (a worktree's or CI's clone)."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        if (parent / "shared" / "policy-reference.md").is_file():
            return parent / "shared"
    raise UserError(f"shared/policy-reference.md not found beside any parent of {here}")


def parse_reference(text: str) -> Reference:
    """The tables of policy-reference.md: one `## TRACE (...)` section each."""
    table: Reference = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        trace = section.split()[0]
        header: list[str] = []
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[:2] == ["size", "blocks"]:
                header = [_COLUMNS[c] for c in cells[2:]]
            elif header and cells[0].endswith("%") and cells[0][:-1].isdigit():
                ratios = dict(zip(header, map(float, cells[2:]), strict=True))
                table[(trace, int(cells[0][:-1]))] = (int(cells[1].replace(",", "")), ratios)
    return table


def load_reference(shared: Path) -> Reference:
    return parse_reference((shared / "policy-reference.md").read_text())


def compare(keys: list[int], blocks: int, expected: dict[str, float]) -> dict[str, float]:
    """memlend's miss ratio minus the reference's, per classic policy."""
    return {p: simulate(keys, p, blocks).miss_ratio - expected[p] for p in CLASSICS}


def against(shared: Path, reference: Reference, policies: list[str]) -> int:
    print("| trace | size | best classic | " + " | ".join(policies) + " |")
    print("| --- | --- | --- |" + " ---: |" * len(policies))
    above = dict.fromkeys(policies, 0)
    total = dict.fromkeys(policies, 0.0)
    best_total = 0.0
    rows = 0
    for trace in sorted({t for t, _ in reference}):
        keys = load_trace(str(shared / "traces" / f"{trace}.trace.gz"))
        for percent in (5, 10, 25):
            blocks, expected = reference[(trace, percent)]
            best, name = min((expected[p], p) for p in CLASSICS)
            cells = []
            for p in policies:
                m = simulate(keys, p, blocks).miss_ratio
                total[p] += m
                above[p] += m - best > 0.0005  # the table's rounding
                cells.append(f"{m:.4f} ({m - best:+.4f})")
            best_total += best
            rows += 1
            print(f"| {trace} | {percent}% | {name} {best:.4f} | " + " | ".join(cells) + " |")
    means = " | ".join(f"{total[p] / rows:.4f}" for p in policies)
    print(f"| **mean** | | {best_total / rows:.4f} | {means} |")
    print(f"| **rows above best** | | | {' | '.join(str(above[p]) for p in policies)} |")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--against"] and len(argv) >= 2:
        policies = [p.strip() for p in argv[1].split(",") if p.strip()]
        shared = Path(argv[2]) if len(argv) > 2 else find_shared()
        return against(shared, load_reference(shared), policies)
    shared = Path(argv[0]) if argv else find_shared()
    reference = load_reference(shared)
    print("| trace | size | blocks | " + " | ".join(CLASSICS) + " |")
    print("| --- | --- | ---: |" + " ---: |" * len(CLASSICS))
    worst = 0.0
    traces: dict[str, list[int]] = {}
    for (trace, percent), (blocks, expected) in sorted(reference.items()):
        if trace not in traces:
            traces = {trace: load_trace(str(shared / "traces" / f"{trace}.trace.gz"))}
        diff = compare(traces[trace], blocks, expected)
        worst = max(worst, *(abs(d) for d in diff.values()))
        cells = " | ".join(f"{diff[p]:+.4f}" for p in CLASSICS)
        print(f"| {trace} | {percent}% | {blocks:,} | {cells} |")
    print(f"\nlargest difference: {worst:.4f} (tolerance {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
