"""Check the classic policies against shared/policy-reference.md, every row.

    python -m memlend.bench.policy_reference [SHARED_DIR]

Replays every trace of SHARED_DIR/traces (default: the shared/ found beside the
repository) through lru, 2q, arc, s3fifo, sieve and lirs at the sizes the table
lists, and prints a Markdown table of memlend's miss ratio minus the reference's.
Exits 1 if any difference is above 0.001. tests/test_policy_reference.py runs the
same comparison on a quick subset.
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


def main(argv: list[str]) -> int:
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
