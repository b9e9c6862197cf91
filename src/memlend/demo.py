"""`memlend demo`: the one command a newcomer runs first.

Makes a sample data set in a temporary directory and reads it through memlend
three times, the way a database would: a hot set read at random, disturbed by
a full scan (a backup, a report query). Each time with a cache smaller than
the data: first with plain LRU, then with memlend's default scan-resistant
policy, then with a lender (a `memlend lend` daemon on this machine) catching
what the cache evicts. Every byte is checked against the backing files; a
table shows what each cache did. Everything is unmounted and stopped at the
end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from memlend.errors import UserError
from memlend.report import human_bytes

FILE_SIZE = 4 << 20
READ = 4096
HOT_BLOCK = 16384  # memlend's default block size: one hot read per cache block


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


@dataclass
class Run:
    label: str
    hot_hit_ratio: float  # of the hot-set reads after the scan, served without the disk
    disk_bytes: int
    lender_hits: int
    seconds: float


class _Reader:
    """Reads through the mount and checks each read against the backing file."""

    def __init__(self, mnt: str, backing: str, names: list[str]) -> None:
        self.fds = [os.open(os.path.join(mnt, n), os.O_RDONLY) for n in names]
        self.ref = [os.open(os.path.join(backing, n), os.O_RDONLY) for n in names]
        self.names = names

    def read(self, f: int, off: int, size: int = READ) -> int:
        got = os.pread(self.fds[f], size, off)
        if got != os.pread(self.ref[f], size, off):
            raise UserError(f"demo: wrong data read from {self.names[f]} at {off}")
        return len(got)

    def close(self) -> None:
        for fd in self.fds + self.ref:
            os.close(fd)


def _stats(mnt: str) -> dict:
    return json.loads(_memlend("stats", mnt, "--json").stdout)


def _one_run(
    label: str, backing: str, mnt: str, names: list[str], args: argparse.Namespace,
    extra: list[str], progress: Progress,
) -> Run:  # fmt: skip
    log = mnt + ".log"  # beside the mountpoint, in the demo's temporary directory
    proc = _memlend(
        "mount", backing, mnt, "--cache-size", str(args.cache_size), "--log-file", log, *extra
    )
    if proc.returncode != 0:
        raise UserError(proc.stderr.strip().removeprefix("memlend: "))
    try:
        rng = random.Random(2)
        # The hot set: half the cache's worth of 16 KiB blocks, read uniformly.
        per_file = FILE_SIZE // HOT_BLOCK
        every = [(f, b) for f in range(len(names)) for b in range(per_file)]
        hot = rng.sample(every, min(len(every), args.cache_size // 2 // HOT_BLOCK))
        after_scan = 2 * len(hot)
        reader = _Reader(mnt, backing, names)
        task = progress.add_task(label, total=args.reads + after_scan + len(names))
        t0 = time.perf_counter()
        try:
            for _ in range(args.reads):  # the hot set settles in
                f, b = rng.choice(hot)
                reader.read(f, b * HOT_BLOCK)
                progress.advance(task)
            for f in range(len(names)):  # a full scan: backup, report, grep
                for off in range(0, FILE_SIZE, 1 << 20):
                    reader.read(f, off, 1 << 20)
                progress.advance(task)
            before = _stats(mnt)
            for _ in range(after_scan):  # the hot set again: did the scan evict it?
                f, b = rng.choice(hot)
                reader.read(f, b * HOT_BLOCK)
                progress.advance(task)
            after = _stats(mnt)
        finally:
            reader.close()
        secs = time.perf_counter() - t0
    finally:
        if _memlend("umount", mnt).returncode != 0:
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True, check=False)
    hits = after["local_hits"] - before["local_hits"] + after["remote_hits"] - before["remote_hits"]
    total = after["local_hits"] + after["local_misses"] - before["local_hits"]
    total -= before["local_misses"]
    return Run(
        label,
        hits / total if total else 0.0,
        after["disk_read_bytes"],
        after["remote_hits"],
        secs,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="memlend-demo-") as tmp:
        backing = os.path.join(tmp, "data")
        os.mkdir(backing)
        with Progress(console=console, transient=True) as progress:
            names = _make_dataset(backing, args.dataset, progress)
        console.print(
            f"sample data: {len(names)} files, {human_bytes(len(names) * FILE_SIZE)} in "
            f"{backing}; memlend cache {human_bytes(args.cache_size)}"
        )
        secret, seal = os.path.join(tmp, "secret"), os.path.join(tmp, "seal.key")
        for path in (secret, seal):
            _memlend("genkey", path)
        port = _free_port()
        lender = subprocess.Popen(
            [sys.executable, "-m", "memlend", "lend", "--listen", f"127.0.0.1:{port}",
             "--memory", str(2 * args.dataset), "--secret-file", secret, "--foreground"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert lender.stdout is not None
            if "listening on" not in lender.stdout.readline():
                raise UserError("demo: the lender did not start")
            configs = [
                ("LRU", ["--policy", "lru"]),
                ("LIRS (the default)", []),
                (
                    "LIRS + a lender",
                    [
                        "--lender",
                        f"memlend://127.0.0.1:{port}",
                        "--secret-file",
                        secret,
                        "--seal-key-file",
                        seal,
                    ],
                ),
            ]
            with Progress(console=console, transient=True) as progress:
                for i, (label, extra) in enumerate(configs):
                    mnt = os.path.join(tmp, f"mnt{i}")
                    os.mkdir(mnt)
                    runs.append(_one_run(label, backing, mnt, names, args, extra, progress))
        finally:
            lender.send_signal(signal.SIGTERM)
            try:
                lender.wait(10)
            except subprocess.TimeoutExpired:
                lender.kill()
                lender.wait()
    table = Table(title="the hot set, after a full scan of the data")
    table.add_column("cache")
    table.add_column("hot reads served from memory", justify="right")
    table.add_column("of them from the lender", justify="right")
    table.add_column("read from disk, whole run", justify="right")
    table.add_column("seconds", justify="right")
    for r in runs:
        table.add_row(
            r.label,
            f"{r.hot_hit_ratio:.1%}",
            str(r.lender_hits),
            human_bytes(r.disk_bytes),
            f"{r.seconds:.2f}",
        )
    console.print(table)
    console.print(
        f"Per run: {args.reads} random 4 KiB reads of a hot set (half the cache), a full scan "
        "of the data, then the hot set again (twice its size in reads); every byte checked "
        "against the backing files. LRU lets the scan flush the hot set; LIRS keeps it; a "
        "lender catches what the local cache has to evict. "
        "`memlend mount --help` and README.md say how to use this on real data."
    )
    return 0
