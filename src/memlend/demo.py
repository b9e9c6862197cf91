"""`memlend demo`: the one command a newcomer runs first.

Makes a sample data set in a temporary directory, mounts it through memlend
with a cache smaller than the data, reads it the way a database would (a hot
set read at random, disturbed by full scans), checks every byte against the
backing files, prints what the cache did, and unmounts — whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.progress import Progress

from memlend.errors import UserError
from memlend.report import human_bytes, stats_table

FILE_SIZE = 4 << 20
READ = 4096


def _memlend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memlend", *args], capture_output=True, text=True, check=False
    )


def _make_dataset(root: str, total: int, progress: Progress) -> list[str]:
    names = []
    rng = random.Random(1)
    task = progress.add_task("writing sample data", total=total)
    for i in range(max(1, total // FILE_SIZE)):
        name = f"part{i:03d}.dat"
        with open(os.path.join(root, name), "wb") as f:
            f.write(rng.randbytes(FILE_SIZE))
        names.append(name)
        progress.advance(task, FILE_SIZE)
    return names


def _workload(mnt: str, backing: str, names: list[str], reads: int, progress: Progress) -> float:
    """Hot-set random reads with two full scans in the middle; verify every byte."""
    rng = random.Random(2)
    blocks_per_file = FILE_SIZE // READ
    hot = [(rng.randrange(len(names)), rng.randrange(blocks_per_file)) for _ in range(2000)]
    task = progress.add_task("reading through the mount", total=reads)
    fds = [os.open(os.path.join(mnt, n), os.O_RDONLY) for n in names]
    ref = [os.open(os.path.join(backing, n), os.O_RDONLY) for n in names]
    t0 = time.perf_counter()
    try:
        for i in range(reads):
            if i in (reads // 3, 2 * reads // 3):  # a scan: backup, grep, cold query
                for fd in fds:
                    off = 0
                    while os.pread(fd, 1 << 20, off):
                        off += 1 << 20
            f, b = hot[min(int(rng.paretovariate(1.2)) - 1, len(hot) - 1)]
            got = os.pread(fds[f], READ, b * READ)
            if got != os.pread(ref[f], READ, b * READ):
                raise UserError(f"demo: wrong data read from {names[f]} at {b * READ}")
            progress.advance(task)
    finally:
        for fd in fds + ref:
            os.close(fd)
    return time.perf_counter() - t0


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="memlend-demo-") as tmp:
        backing, mnt = os.path.join(tmp, "data"), os.path.join(tmp, "mnt")
        os.mkdir(backing)
        os.mkdir(mnt)
        with Progress(console=console, transient=True) as progress:
            names = _make_dataset(backing, args.dataset, progress)
        console.print(
            f"sample data: {len(names)} files, {human_bytes(len(names) * FILE_SIZE)} in {backing}"
        )
        proc = _memlend("mount", backing, mnt, "--cache-size", str(args.cache_size))
        if proc.returncode != 0:
            raise UserError(proc.stderr.strip().removeprefix("memlend: "))
        try:
            console.print(f"mounted on {mnt} with a {human_bytes(args.cache_size)} cache")
            with Progress(console=console, transient=True) as progress:
                secs = _workload(mnt, backing, names, args.reads, progress)
            stats = json.loads(_memlend("stats", mnt, "--json").stdout)
        finally:
            done = _memlend("umount", mnt)
            if done.returncode != 0:
                subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, check=False)
    console.print(
        f"{args.reads} random 4 KiB reads (hot set, two full scans in between) in {secs:.2f} s, "
        "every byte checked against the backing files"
    )
    stats_table(stats, console)
    return 0
