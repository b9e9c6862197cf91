"""Miss ratios and CPU cost of every replacement policy on every trace.

    python -m memlend.bench.policy_table [TRACE_DIR] [--plot FILE.png] [--repeat N]

Prints the Markdown tables of docs/policies.md. Replays go through memlend.sim, so
through the very policy classes the mount uses. Timing: each (trace, size, policy)
replay runs --repeat times and the fastest run counts (the least disturbed by other
processes); pin the process to one CPU (taskset) for steadier figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from memlend.sim import (
    TraceRun,
    load_trace,
    parse_cache_size,
    parse_policies,
    plot,
    simulate,
)

TABLE_SIZES = ["1%", "5%", "10%", "25%"]
PLOT_SIZES = ["1%", "2%", "5%", "10%", "15%", "20%", "25%", "35%", "50%"]


def run_trace(spec: str, policies: list[str], sizes: list[str], repeat: int) -> TraceRun:
    trace = load_trace(spec)
    unique = len(set(trace))
    blocks = [(s, parse_cache_size(s, unique)) for s in sizes]
    results = []
    for _, b in blocks:
        for p in policies:
            runs = [simulate(trace, p, b) for _ in range(repeat)]
            assert len({r.misses for r in runs}) == 1  # replay is deterministic
            results.append(min(runs, key=lambda r: r.seconds))
    return TraceRun(spec, len(trace), unique, blocks, results)


def micro(
    policy: str, capacity: int = 10_000, n: int = 200_000, repeat: int = 5
) -> tuple[float, float]:
    """ns per hit (touch of a resident key) and per miss (admit with one eviction),
    with (file_id, block_no) tuple keys as in the mount; fastest of `repeat` runs."""
    from memlend.policies import make_policy

    best_hit = best_miss = float("inf")
    for r in range(repeat):
        p = make_policy(policy, capacity)
        for k in range(capacity):
            p.admit((7, k))
        rng = random.Random(r)
        resident = list(p.keys())
        keys = [rng.choice(resident) for _ in range(n)]
        t0 = time.perf_counter()
        for k in keys:
            if k in p:
                p.touch(k)
        best_hit = min(best_hit, (time.perf_counter() - t0) * 1e9 / n)
        fresh = [(8, k + r * n) for k in range(n)]
        t0 = time.perf_counter()
        for k in fresh:
            if k not in p:
                p.admit(k)
        best_miss = min(best_miss, (time.perf_counter() - t0) * 1e9 / n)
    return best_hit, best_miss


def fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(runs: list[TraceRun], policies: list[str], sizes: list[str]) -> str:
    out = []
    head = ["trace", "size", "blocks", *policies]
    out.append(fmt_row(head))
    out.append(fmt_row(["---"] * 3 + ["---:"] * len(policies)))
    per_policy_ratio: dict[str, list[float]] = defaultdict(list)
    per_policy_vs_lru: dict[str, list[float]] = defaultdict(list)
    wins: dict[str, int] = defaultdict(int)
    n = len(policies)
    for r in runs:
        for i, (spec, blocks) in enumerate(r.sizes):
            if spec not in sizes:
                continue
            row = r.results[i * n : (i + 1) * n]
            lru = next(x for x in row if x.policy == "lru")
            best = min(x.misses for x in row)
            cells = []
            for x in row:
                per_policy_ratio[x.policy].append(x.miss_ratio)
                rel = x.misses / lru.misses if lru.misses else 1.0
                per_policy_vs_lru[x.policy].append(rel)
                text = f"{x.miss_ratio:.3f}"
                if x.policy != "lru":
                    text += f" ({rel:.2f})"
                if x.misses == best:
                    wins[x.policy] += 1
                    text = f"**{text}**"
                cells.append(text)
            out.append(
                fmt_row([Path(r.trace).name.removesuffix(".trace.gz"), spec, f"{blocks:,}", *cells])
            )
    out.append(
        fmt_row(
            ["**mean**", "", ""]
            + [
                f"{statistics.fmean(per_policy_ratio[p]):.3f} "
                f"({statistics.geometric_mean(per_policy_vs_lru[p]):.3f})"
                for p in policies
            ]
        )
    )
    out.append(fmt_row(["**best in rows**", "", ""] + [str(wins[p]) for p in policies]))
    return "\n".join(out)


def cost_table(runs: list[TraceRun], policies: list[str], sizes: list[str]) -> str:
    secs: dict[str, float] = defaultdict(float)
    accesses: dict[str, int] = defaultdict(int)
    n = len(policies)
    for r in runs:
        for i, (spec, _) in enumerate(r.sizes):
            if spec not in sizes:
                continue
            for x in r.results[i * n : (i + 1) * n]:
                secs[x.policy] += x.seconds
                accesses[x.policy] += x.accesses
    out = [
        fmt_row(["policy", "ns/access, trace replays", "ns/hit (micro)", "ns/miss (micro)"]),
        fmt_row(["---", "---:", "---:", "---:"]),
    ]
    for p in policies:
        hit, miss = micro(p)
        out.append(fmt_row([p, f"{secs[p] * 1e9 / accesses[p]:.0f}", f"{hit:.0f}", f"{miss:.0f}"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # shared/ lies beside the project's checkout (src/memlend/bench/ -> ../../../..).
    default_dir = Path(__file__).resolve().parents[4] / "shared" / "traces"
    ap.add_argument("trace_dir", nargs="?", default=str(default_dir))
    ap.add_argument("--plot", help="write miss-ratio curves to this PNG")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per replay")
    ap.add_argument("--policy", default=None, help="policies (default: all)")
    args = ap.parse_args(argv)

    policies = parse_policies(args.policy)
    specs = [str(p) for p in sorted(Path(args.trace_dir).glob("*.trace.gz"))]
    specs.append("synthetic:hotscan")
    sizes = PLOT_SIZES if args.plot else TABLE_SIZES
    runs = []
    for spec in specs:
        t0 = time.perf_counter()
        runs.append(run_trace(spec, policies, sizes, args.repeat))
        print(f"{spec}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print("## Miss ratios\n")
    print(markdown(runs, policies, TABLE_SIZES))
    print("\n## CPU cost\n")
    print(cost_table(runs, policies, TABLE_SIZES))
    if args.plot:
        plot(runs, policies, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
