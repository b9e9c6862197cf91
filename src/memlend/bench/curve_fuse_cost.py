"""The live miss-ratio curve's cost on a local hit, through FUSE (issue 12's goal:
at most 3% of a local hit's CPU cost).

    python -m memlend.bench.curve_fuse_cost [--rounds 3] [--n 200000] [--policy lirs-lazy]

Mounts a 64 MiB file with `--local-tier memlend --cache-size 256M` (the whole file
cached after one sequential pass), pins every daemon thread and the C reader
(memlend.bench.fuse_tools) to CPU 0, and times N random 4 KiB preads, all local hits.
Same CPU on purpose: on this VM a reader on the other, idle vCPU waits ~100 µs per
read for its wake-up (124 µs median against 17.6 µs on one CPU), which would bury a
0.2 µs effect; on one CPU the wall time per read is all CPU: reader, kernel, daemon.
Each round mounts twice, the curve on (the default) and off (MEMLEND_CURVE=0:
nothing is sampled, so a hit never records; the curve's memory stays set aside, so both hold the
same slots), in alternating order. Per run: reads/s, median latency, and the daemon's
CPU time per read (utime + stime of all its threads, /proc/PID/stat, over the timed
reads). Prints each run, the medians and the overhead of the curve (on / off - 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from memlend.bench import fuse_tools as ft
from memlend.bench.testbed import cpu_times, cpu_usage, proc_cpu_seconds

MiB = 1 << 20


def one_run(tools: ft.Tools, work: Path, curve: bool, n: int, policy: str) -> dict:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    if curve:
        os.environ.pop("MEMLEND_CURVE", None)
    else:
        os.environ["MEMLEND_CURVE"] = "0"
    try:
        with ft.Memlend(
            work / "backing",
            mnt,
            cache_size="256M",
            block_size="16K",
            policy=policy,
            local_tier="memlend",
        ) as m:
            m.pin(0)
            path = str(mnt / "data")
            ft.run_reader(tools, 0, path, "seq", "--req", str(MiB), "--passes", "1")
            before = m.stats()
            c0 = proc_cpu_seconds(m.pid)
            res = ft.run_reader(tools, 0, path, "rand", "--n", str(n), "--bs", "4096")
            c1 = proc_cpu_seconds(m.pid)
            after = m.stats()
    finally:
        os.environ.pop("MEMLEND_CURVE", None)
    hits = after["local_hits"] - before["local_hits"]
    misses = after["local_misses"] - before["local_misses"]
    return {
        "curve": curve,
        "reads_per_s": n / (res["wall_ns"] / 1e9),
        "median_us": res["median_ns"] / 1000,
        "cpu_us_per_read": (c1 - c0) / n * 1e6,
        "hits": hits,
        "misses": misses,
        "sampled": (after.get("curve") or {}).get("sampled", 0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memlend.bench.curve_fuse_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=200_000, help="timed reads per run")
    ap.add_argument("--policy", default="lirs-lazy")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("memlend: curve_fuse_cost needs root (FUSE mounts, pinning)", file=sys.stderr)
        return 2
    load = ft.ForeignLoad()
    load.start()
    t0 = cpu_times()
    runs = []
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="curvecost-") as tmp:
            work = Path(tmp)
            tools = ft.build_tools(work)
            (work / "backing").mkdir()
            ft.make_file(work / "backing" / "data", 64 * MiB, seed=1)
            for r in range(args.rounds):
                for curve in (True, False) if r % 2 == 0 else (False, True):
                    run = one_run(tools, work, curve, args.n, args.policy)
                    runs.append(run)
                    print(
                        f"round {r + 1} curve {'on ' if curve else 'off'}: "
                        f"{run['reads_per_s']:,.0f} reads/s, median {run['median_us']:.1f} µs, "
                        f"daemon CPU {run['cpu_us_per_read']:.2f} µs/read, "
                        f"{run['hits']:,} hits {run['misses']:,} misses, "
                        f"{run['sampled']:,} sampled",
                        flush=True,
                    )
    finally:
        ft.cleanup()
        foreign = load.take()
        load.stop()
        steal = cpu_usage(t0, cpu_times())["cpu0"]["steal"]
    on = [r for r in runs if r["curve"]]
    off = [r for r in runs if not r["curve"]]
    for key, unit in (
        ("cpu_us_per_read", "µs CPU/read"),
        ("median_us", "µs median"),
        ("reads_per_s", "reads/s"),
    ):
        a = statistics.median(r[key] for r in on)
        b = statistics.median(r[key] for r in off)
        lo, hi = min(r[key] for r in on), max(r[key] for r in on)
        lo2, hi2 = min(r[key] for r in off), max(r[key] for r in off)
        print(
            f"{key}: on {a:.3f} ({lo:.3f}-{hi:.3f}), off {b:.3f} ({lo2:.3f}-{hi2:.3f}) "
            f"{unit}; on/off - 1 = {a / b - 1:+.2%}"
        )
    print(
        f"pinning: daemon and reader on CPU 0; steal on CPU 0 {steal:.1%}; foreign CPU: {foreign}; "
        f"load {os.getloadavg()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
