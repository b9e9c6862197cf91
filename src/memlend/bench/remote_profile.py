"""Where a remote hit spends its time inside the mount daemon, without FUSE.

    .venv/bin/python -m memlend.bench.remote_profile [--reads N] [--cprofile]

Starts a `memlend lend` on CPU 1 (loopback), fills it with a 256 MiB file's 16 KiB
blocks through a RemoteTier, and from CPU 0 times, in this one process and run:

1. the floor: a bare Python request/reply over loopback TCP to a minimal server on
   CPU 1 that answers every 40-byte request with a 16 KiB+29 reply, both sides
   busy-polling non-blocking sockets (no protocol, no sealing, no bookkeeping);
2. `RemoteTier.get_one` of a block on the lender, as a whole, and step by step (the
   same calls in the same order, each timed): taking a pooled connection, encoding
   the GET, the send() system call, waiting for and receiving the reply, checking
   it, the tier's bookkeeping (health, pool, latency), unsealing, remembering the
   hit (inclusive mode);
3. `ReadPath.read` of 4 KiB whose block is on the lender: the daemon's own miss path
   around get_one (key, copy into the reply buffer, insert into the local cache and
   the eviction it causes, whose put to the lender is skipped or queued);
4. `ReadPath.read` of 4 KiB that hits the local cache, for comparison.

The FUSE round trip (kernel, /dev/fuse, the worker loop) is not here: see
memlend.bench.fuse_latency (a cached read through the mount) and the testbed
(`memlend bench`, a remote hit end to end). Medians and means in µs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
REPLY = BLOCK + 29  # a sealed block
CLIENT_CPU, SERVER_CPU = 0, 1

# The floor's server: answers each request with REPLY bytes, spinning on its socket.
FLOOR_SERVER = f"""
import os, socket, sys
os.sched_setaffinity(0, {{{SERVER_CPU}}})
ls = socket.create_server(("127.0.0.1", int(sys.argv[1])))
c, _ = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setblocking(False)
reply = os.urandom({REPLY})
while True:
    try:
        d = c.recv(65536)
    except BlockingIOError:
        continue
    if not d:
        break
    c.sendall(reply)
"""


def _stat(samples: list[int]) -> tuple[float, float]:
    return statistics.median(samples) / 1e3, statistics.mean(samples) / 1e3


def _timed(fn: Callable[[], object], n: int) -> list[int]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def floor(n: int) -> list[int]:
    port = _free_port()
    srv = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(port)])
    try:
        wait_port(port, srv, "floor server")
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        p = select.poll()
        p.register(s, select.POLLIN)
        req = b"g" * 40

        def one() -> None:
            s.send(req)
            got = 0
            while got < REPLY:
                while not p.poll(0):
                    pass
                got += len(s.recv(65536))

        for _ in range(500):
            one()
        t = _timed(one, n)
        s.close()
        return t
    finally:
        srv.kill()
        srv.wait()


STEPS = (
    "take a pooled connection",
    "encode the GET",
    "send() system call",
    "wait for and receive the reply",
    "check the reply",
    "health, pool, latency bookkeeping",
    "unseal (AES-256-GCM, 16 KiB)",
    "remember the hit (inclusive mode)",
)


def get_one_steps(tier: RemoteTier, keys: list[bytes]) -> list[list[int]]:
    """RemoteTier.get_one's calls for a single lender, one by one, each timed."""
    from memlend.remote import protocol as p

    ld = tier.lenders[0]
    out: list[list[int]] = [[] for _ in STEPS]
    clock = time.perf_counter_ns
    for k in keys:
        t = [clock()]
        c, gen = ld.acquire(tier.deadline)
        t.append(clock())
        rid = next(c._ids) & 0xFFFFFFFF
        frame = c._conn.send_get((k,), rid)
        t.append(clock())
        c._send(frame, time.monotonic() + tier.deadline)
        t.append(clock())
        data = c._recv(time.monotonic() + 0.05, c._spin())
        t.append(clock())
        blob = c._conn.receive_value(data, rid)
        t.append(clock())
        ld.health.ok(1e-4)
        ld.release(c, gen)
        tier._latencies.append(1e-4)
        t.append(clock())
        assert blob is not p.NOT_FAST and blob is not None
        tier._sealer.open(k, blob)
        t.append(clock())
        tier.remember_fetched(k)
        t.append(clock())
        for i in range(len(STEPS)):
            out[i].append(t[i + 1] - t[i])
    return out


def run(reads: int, work: Path, profile: bool) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    rows: list[tuple[str, list[int]]] = [("1. floor: bare Python request/reply", floor(reads))]
    secret, seal = work / "secret", work / "seal"
    write_secret(str(secret))
    write_secret(str(seal))
    port = _free_port()
    cmd = ["taskset", "-c", str(SERVER_CPU), sys.executable, "-m", "memlend", "lend"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--memory", "400M", "--foreground"]
    cmd += ["--secret-file", str(secret)]
    lender = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, lender, "lender")
        stats = MountStats()
        cache = BlockCache(8 << 20, BLOCK, "lirs", stats)
        rp = ReadPath(cache, stats)
        tier = RemoteTier(
            [f"memlend://127.0.0.1:{port}"], load_secret(str(secret)), load_secret(str(seal))
        )
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
        it = iter(keys)
        rows.append(
            (
                "2. RemoteTier.get_one, one 16 KiB block",
                _timed(lambda: tier.get_one(next(it)), reads),
            )
        )
        steps = get_one_steps(tier, keys)
        rows += [(f"   {name}", xs) for name, xs in zip(STEPS, steps, strict=True)]
        fd = os.open("/dev/zero", os.O_RDONLY)  # never read: every block is on the lender
        h0 = tier.snapshot()["remote_hits"]

        def remote_read() -> None:
            off = rng.randrange(BLOCKS) * BLOCK + rng.randrange(4) * 4096
            rp.read(fd, state, off, 4096)

        rows.append(("3. ReadPath.read, 4 KiB on the lender", _timed(remote_read, reads)))
        hits = tier.snapshot()["remote_hits"] - h0
        cache.on_evict = None
        hot = [b for b in range(BLOCKS) if cache.has((1 << 40) | b)][:64]
        rows.append(
            (
                "4. ReadPath.read, 4 KiB local hit",
                _timed(lambda: rp.read(fd, state, rng.choice(hot) * BLOCK, 4096), reads),
            )
        )
        print(
            f"client CPU {CLIENT_CPU}, lender and floor server CPU {SERVER_CPU}, loopback TCP; "
            f"{reads} timed calls per row; (3) had {hits} remote hits of {reads}"
        )
        print(f"{'':48} {'median':>8} {'mean':>8}  µs")
        for name, xs in rows:
            med, mean = _stat(xs)
            print(f"{name:48} {med:8.1f} {mean:8.1f}")
        parts = sum(_stat(xs)[0] for xs in steps)
        print(f"{'   (sum of the step medians)':48} {parts:8.1f}")
        if profile:
            cache.on_evict = evicted
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reads // 4):
                remote_read()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            print("cProfile of (3), by own time:\n" + s.getvalue())
        tier.close()
        cache.close()
    finally:
        lender.terminate()
        lender.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=10000, help="timed calls per row (10000)")
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the miss path")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memlend-remote-profile-") as d:
        run(args.reads, Path(d), args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
