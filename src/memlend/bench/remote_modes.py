"""Inclusive against exclusive remote mode, same workload, same run.

    python -m memlend.bench.remote_modes [--reads N]

One lender (CPU 1) and one mount (CPU 0, local cache 4 MiB, 16 KiB blocks) over a 32 MiB
data set; a skewed random 16 KiB read workload (80% of reads on 20% of the blocks) after
one warm-up pass. For each mode it reports the reads/s, where reads were served (local,
lender, disk), and how many blocks crossed the network each way: exclusive deletes a block
from the lender when it is read back, so every later eviction must send it again;
inclusive keeps it there and skips re-sending it.
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
from pathlib import Path

from memlend.bench.fuse_tools import pin_all_threads

MEMLEND = [sys.executable, "-m", "memlend"]


def _run(*args: str) -> str:
    return subprocess.run([*MEMLEND, *args], check=True, capture_output=True, text=True).stdout


def _stats(mnt: Path) -> dict:
    return json.loads(_run("stats", str(mnt), "--json"))


def one_mode(root: Path, mode: str, port: int, reads: int) -> dict:
    data, mnt = root / "data", root / f"mnt-{mode}-{port}"
    mnt.mkdir()
    secret, seal = root / "secret", root / "seal"
    lender = subprocess.Popen(
        ["taskset", "-c", "1", *MEMLEND, "lend", "--listen", f"127.0.0.1:{port}", "--memory",
         "128M", "--secret-file", str(secret), "--foreground"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        _run("mount", str(data), str(mnt), "--cache-size", "4M", "--lender",
             f"memlend://127.0.0.1:{port}", "--secret-file", str(secret), "--seal-key-file",
             str(seal), "--remote-mode", mode, "--remote-deadline", "20")  # fmt: skip
        try:
            pin_all_threads(_stats(mnt)["pid"], 0)
            os.sched_setaffinity(0, {0})
            files = sorted(p.name for p in data.iterdir())
            fds = [os.open(mnt / f, os.O_RDONLY) for f in files]
            blocks = [(f, b) for f in range(len(files)) for b in range(4 << 20 >> 14)]
            for f, b in blocks:  # warm-up: every block through the mount once
                os.pread(fds[f], 16384, b * 16384)
            rng = random.Random(7)
            hot = blocks[: len(blocks) // 5]
            time.sleep(0.5)
            before = _stats(mnt)
            t0 = time.perf_counter()
            for _ in range(reads):
                f, b = rng.choice(hot) if rng.random() < 0.8 else rng.choice(blocks)
                os.pread(fds[f], 16384, b * 16384)
            secs = time.perf_counter() - t0
            time.sleep(0.5)
            after = _stats(mnt)
            for fd in fds:
                os.close(fd)
        finally:
            _run("umount", str(mnt))
    finally:
        lender.terminate()
        lender.wait(10)
    d = {k: after[k] - before[k] for k in ("local_hits", "local_misses", "remote_hits",
         "disk_reads", "remote_put_blocks", "remote_put_skipped", "remote_deletes")}  # fmt: skip
    d["reads_per_s"] = round(reads / secs)
    d["mode"] = mode
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memlend-modes-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        for i in range(8):
            (root / "data" / f"f{i}").write_bytes(os.urandom(4 << 20))
        _run("genkey", str(root / "secret"))
        _run("genkey", str(root / "seal"))
        rows = [one_mode(root, m, 17400 + i, args.reads) for i, m in
                enumerate(("inclusive", "exclusive", "inclusive", "exclusive"))]  # fmt: skip
    print("pinning: reader and mount daemon on CPU 0, lender on CPU 1")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
