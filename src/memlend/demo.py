"""`memlend demo`: the one command a newcomer runs first, the project in one table.

A small testbed (memlend.bench): a client "VM" (a memory cgroup of --client-memory
holding the workload and the mount daemon, its disk throttled like a cloud volume)
reads a data set four times its memory at random, 4 KiB at a time, three ways:

* pagecache: what that VM has today, the kernel page cache alone;
* kernel: the same files through `memlend mount` in its default mode (the page cache
  stays the first tier, memlend reads the disk with O_DIRECT), no lender: no slower;
* kernel-lender: the same plus a `memlend lend` daemon in a second "VM" (its own cgroup
  and network namespace) lending the memory the client lacks.

Every read is checked by fio (checksums written with the data). Prints the three with
the speed-up over the page cache; everything is torn down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memlend.bench import run
from memlend.bench.matrix import DISKS
from memlend.errors import UserError
from memlend.report import human_bytes

MiB = 1 << 20
WORKLOAD = "randread-uniform-qd1"
CONFIGS = ("pagecache", "kernel", "kernel-lender")  # the mount's default tier: kernel
WHAT = {
    "pagecache": "kernel page cache alone (what the VM has today)",
    "kernel": "memlend mount, same memory, no lender",
    "kernel-lender": "memlend mount + a lender VM's spare memory",
}


def _plan(args: argparse.Namespace, out: Path) -> run.Plan:
    mem = args.client_memory
    if mem < 64 * MiB:
        raise UserError("--client-memory must be at least 64M")
    if args.disk not in DISKS:
        raise UserError(f"unknown disk profile {args.disk!r} (choose from {', '.join(DISKS)})")
    if args.seconds <= 0:
        raise UserError("--seconds must be positive")
    return run.Plan(
        out=out,
        disks=[args.disk],
        client_memory=mem,
        dataset=4 * mem,
        workloads=[WORKLOAD],
        configs=list(CONFIGS),
        seconds=args.seconds,
        quick=True,
        netns=True,
    )


def _table(result: dict, disk: str) -> Table:
    rows = {r["config"]: r for r in result["rows"]}
    base = rows.get("pagecache", {}).get("iops")
    meta = result["meta"]
    t = Table(
        title=f"random 4 KiB reads, 1 reader: data set {human_bytes(meta['dataset'])}, "
        f"client memory {human_bytes(meta['client_memory'])}, disk '{disk}'"
    )
    for col in ("", "reads/s", "p50 µs", "served from", "speed-up", "verified"):
        t.add_column(col, justify="left" if col in ("", "served from") else "right")
    for c in CONFIGS:
        r = rows.get(c)
        if r is None:
            continue
        if r.get("error"):
            t.add_row(f"{c}: {WHAT[c]}", "-", "-", r["error"][:60], "-", "no")
            continue
        hr = r.get("hit_ratio", {})
        served = ", ".join(f"{k} {v:.0%}" for k, v in hr.items() if v >= 0.005)
        ratio = f"{r['iops'] / base:.2f}x" if base else "-"
        t.add_row(
            f"{c}: {WHAT[c]}",
            f"{r['iops']:,.0f}",
            f"{r['p50_us']:,.0f}",
            served,
            ratio,
            "yes" if r.get("verified") else "NO",
        )
    return t


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    keep = args.out is not None
    out = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="memlend-demo-"))
    try:
        plan = _plan(args, out)
        console.print(
            f"memlend demo: {len(CONFIGS)} configurations x {plan.seconds:g} s of random "
            f"reads over {human_bytes(plan.dataset)}, each after a warm-up (about 2 minutes)"
        )
        result = run.run_matrix(plan, progress=sys.stderr.isatty(), who="memlend demo")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    console.print(_table(result, args.disk))
    console.print(
        "memlend leaves the hot pages in the client's page cache, as without it; the "
        "lender holds what the page cache drops, so a miss costs a network round trip "
        "instead of a throttled disk read. `memlend bench` runs the full matrix, also "
        "memlend's own cache tier (--local-tier memlend) "
        "(docs/benchmarks.md)." + (f" Results: {out}/results.json" if keep else "")
    )
    bad = [r["config"] for r in result["rows"] if not r.get("verified")]
    if bad:
        console.print(f"[red]not verified: {', '.join(bad)}[/red]")
        return 1
    return 0
