"""Where a remote hit spends its time inside the mount daemon, without FUSE.

    .venv/bin/python -m memlend.bench.remote_profile [--reads N]

Starts a `memlend lend` on CPU 1, fills it with a 256 MiB file's 16 KiB blocks through
a RemoteTier, and from CPU 0 times, in this process:

1. `RemoteTier.get_many([key])` alone: one lender round trip, unsealing included;
2. `ReadPath.read` of 4 KiB whose block is on the lender (the daemon's own miss path:
   key building, the tier call, the copy into the reply buffer, the insert into the
   local cache and the eviction it causes, which queues a put or skips it);
3. cProfile's view of (2): which functions take the rest.

The FUSE round trip (kernel, /dev/fuse, the worker loop) is measured separately by
memlend.bench.fuse_latency (a cached read) and memlend.bench.remote_latency (a remote
hit end to end); (2) minus (1) is what the mount adds to a lender's answer.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memlend.fs.cache import BLOCK_MASK, BlockCache
from memlend.fs.passthrough import FileState
from memlend.fs.readpath import ReadPath, remote_key
from memlend.remote.secret import load_secret, write_secret
from memlend.remote.tier import RemoteTier
from memlend.remote.tierbench import _free_port, wait_port
from memlend.stats import MountStats

BLOCK = 16384
BLOCKS = 16384  # a 256 MiB file


def _us(samples: list[int]) -> str:
    p50, mean = statistics.median(samples) / 1e3, statistics.mean(samples) / 1e3
    return f"p50 {p50:.1f} µs, mean {mean:.1f} µs"


def run(reads: int, work: Path) -> None:
    os.sched_setaffinity(0, {0})
    secret, seal = work / "secret", work / "seal"
    write_secret(str(secret))
    write_secret(str(seal))
    port = _free_port()
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "memlend", "lend", "--foreground"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--memory", "400M", "--secret-file", str(secret)]
    lender = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, lender, "lender")
        stats = MountStats()
        cache = BlockCache(8 << 20, BLOCK, "lirs", stats)
        rp = ReadPath(cache, stats)
        tier = RemoteTier([f"memlend://127.0.0.1:{port}"], load_secret(str(secret)),
                          load_secret(str(seal)))  # fmt: skip
        rp.remote = tier
        state = FileState(file_id=1, size=BLOCKS * BLOCK, mtime_ns=0, ctime_ns=0)

        def evicted(key: int, data: memoryview) -> None:  # as Passthrough._evicted
            tier.put(remote_key(rp.epoch, state.file_id, state.version, key & BLOCK_MASK), data)

        cache.on_evict = evicted
        data = os.urandom(BLOCK)
        for b in range(BLOCKS):
            tier.put(remote_key(rp.epoch, 1, 0, b), data)
            if b % 512 == 511:
                tier.flush(10)
        tier.flush(10)
        rng = random.Random(1)
        keys = [remote_key(rp.epoch, 1, 0, rng.randrange(BLOCKS)) for _ in range(reads)]
        t: list[int] = []
        for k in keys:
            t0 = time.perf_counter_ns()
            tier.get_many([k])
            t.append(time.perf_counter_ns() - t0)
        print(f"1. RemoteTier.get_many, one 16 KiB block: {_us(t)}")
        fd = os.open("/dev/zero", os.O_RDONLY)  # never read: every block is on the lender
        t, h0 = [], tier.c["remote_hits"]
        for _ in range(reads):
            off = rng.randrange(BLOCKS) * BLOCK + rng.randrange(4) * 4096
            t0 = time.perf_counter_ns()
            rp.read(fd, state, off, 4096)
            t.append(time.perf_counter_ns() - t0)
        hits = tier.c["remote_hits"] - h0
        print(f"2. ReadPath.read, 4 KiB on the lender: {_us(t)} ({hits} remote hits of {reads})")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reads // 4):
            rp.read(fd, state, rng.randrange(BLOCKS) * BLOCK, 4096)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
        print("3. cProfile of (2), by own time:\n" + s.getvalue())
        tier.close()
        cache.close()
    finally:
        lender.terminate()
        lender.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=20000, help="timed reads per part (20000)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memlend-remote-profile-") as d:
        run(args.reads, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
