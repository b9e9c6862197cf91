"""Where a cached 4 KiB read spends its time inside the memlend daemon.

    .venv/bin/python -m memlend.bench.fuse_profile [--reads N] [--py-spy SECONDS]

Part 1 (no kernel): drives the daemon's own request code -- the worker loop's
decode and dispatch, Session._read, Passthrough.read, ReadPath.read,
BlockCache.copy_out, the reply writev (to /dev/null) -- in-process on
preformatted READ requests for cached blocks, and times each layer per request
for several block sizes; then cProfile's view of the same loop.

Part 2 (live, needs root and py-spy): mounts memlend, pins the daemon on CPU 0,
runs the C reader (cached 4 KiB random preads, CPU 0) and samples the daemon
with py-spy; prints the hottest lines (self time) and what share of the samples
the worker spent inside os.readv (waiting for, or receiving, the next request).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memlend.bench import fuse_tools as ft
from memlend.fs.cache import BlockCache
from memlend.fs.passthrough import Passthrough
from memlend.fuse import wire
from memlend.fuse.api import Context
from memlend.fuse.session import NO_REPLY, Session
from memlend.fuse.wire import Op
from memlend.stats import MountStats

MiB = 1 << 20


def _requests(nodeid: int, fh: int, size: int, count: int) -> list[bytearray]:
    rnd = random.Random(5)
    out = []
    for unique in range(count):
        off = rnd.randrange(size // 4096) * 4096
        body = wire.READ_IN.pack(fh, off, 4096, 0, 0, 0, 0)
        hdr = wire.IN_HEADER.pack(
            wire.IN_HEADER.size + len(body), Op.READ, unique + 2, nodeid, 0, 0, 1, 0, 0
        )
        buf = bytearray(2 * MiB)
        buf[: len(hdr) + len(body)] = hdr + body
        out.append(buf)
    return out


def _worker_step(session: Session, buf: bytearray, view: memoryview, n: int) -> None:
    """One iteration of Session._worker after os.readv returned, verbatim in effect."""
    _, opcode, unique, nodeid, uid, gid, pid, extlen, _ = wire.IN_HEADER.unpack_from(buf, 0)
    handler = session._handlers.get(opcode)
    body = view[wire.IN_HEADER.size : n - extlen * 8]
    result = handler(nodeid, body, Context(uid, gid, pid))
    if result is NO_REPLY or result is None:
        return
    if isinstance(result, bytes | memoryview | bytearray):
        session._reply(unique, [result])
    else:
        session._reply(unique, result)


def in_process(backing: Path, name: str, block: int, reads: int) -> dict[str, float]:
    stats = MountStats()
    cache = BlockCache(256 * MiB, block, "s3fifo", stats)
    fs = Passthrough(str(backing), cache, stats)
    devnull = os.open("/dev/null", os.O_WRONLY)
    session = Session(devnull, fs, threads=1)
    try:
        ctx = Context(0, 0, 1)
        nodeid, st = fs.lookup(ctx, wire.ROOT_ID, name.encode())
        fh, _ = fs.open(ctx, nodeid, os.O_RDONLY)
        size = st.st_size
        for off in range(0, size, MiB):  # load every block into the cache
            fs.read(nodeid, fh, off, MiB)
        reqs = _requests(nodeid, fh, size, 2000)
        n = wire.IN_HEADER.size + wire.READ_IN.size
        views = [memoryview(b) for b in reqs]
        h = fs._handle(fh)
        rnd = random.Random(6)
        offs = [rnd.randrange(size // 4096) * 4096 for _ in range(2000)]
        base = state_base = h.state.file_id << 40
        shift = block.bit_length() - 1
        out = fs.reader._new_buffer()
        reply = [wire.OUT_HEADER.pack(16 + 4096, 0, 1), out[:4096]]

        def per_req(fn) -> float:
            fn(0)  # warm
            t0 = time.perf_counter_ns()
            for i in range(reads):
                fn(i % 2000)
            return (time.perf_counter_ns() - t0) / reads / 1000

        res = {
            "worker step (decode+dispatch+read+reply)": per_req(
                lambda i: _worker_step(session, reqs[i], views[i], n)
            ),
            "Passthrough.read (handle, ReadPath.read)": per_req(
                lambda i: fs.read(nodeid, fh, offs[i], 4096)
            ),
            "BlockCache.copy_out under lock": per_req(
                lambda i: _copy_out(cache, state_base, offs[i] >> shift, out)
            ),
            "reply: os.writev(header, 4 KiB) to /dev/null": per_req(
                lambda i: os.writev(devnull, reply)
            ),
            "header unpack + Context": per_req(
                lambda i: Context(*wire.IN_HEADER.unpack_from(reqs[i], 0)[4:7])
            ),
        }
        del base
        prof = cProfile.Profile()
        prof.enable()
        for i in range(reads):
            _worker_step(session, reqs[i % 2000], views[i % 2000], n)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        res["cprofile"] = text.getvalue()  # type: ignore[assignment]
        fs.release(nodeid, fh)
        return res
    finally:
        fs.destroy()
        cache.close()
        os.close(devnull)


def _copy_out(cache: BlockCache, base: int, block: int, out: memoryview) -> None:
    with cache.lock:
        cache.copy_one(base | block, 0, 4096, out)


def live(work: Path, tools: ft.Tools, seconds: float, block: str, cpu: int) -> str:
    """py-spy the daemon while the reader runs; return a summary."""
    backing, mnt = work / "backing", work / "mnt"
    out = work / "spy.txt"
    with ft.Memlend(backing, mnt, cache_size="256M", block_size=block) as m:
        m.pin(0)
        path = str(mnt / "lat.bin")
        ft.run_reader(tools, cpu, path, "seq")
        reader = subprocess.Popen(
            [*ft.taskset(cpu), tools.reader, "rand", path, "--n", "5000000"],
            stdout=subprocess.DEVNULL,
        )
        ft._procs.append(reader)
        time.sleep(0.5)
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        done = subprocess.run(
            [
                spy,
                "record",
                "-p",
                str(m.pid),
                "-d",
                str(max(1, int(seconds))),
                "-r",
                "1000",
                "--format",
                "raw",
                "-o",
                str(out),
                "--idle",
                "--threads",
                "--nonblocking",
            ],
            capture_output=True,
            text=True,
        )
        reader.terminate()
        if done.returncode != 0:
            raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-500:]}")
        reader.wait()
    return summarize_raw(out.read_text())


def summarize_raw(text: str) -> str:
    """Self and inclusive sample shares from py-spy's collapsed stacks."""
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.split(";")[0].startswith("thread (") or "fuse-" not in stack.split(";")[0]:
            continue  # worker threads only
        frames = stack.split(";")[1:]
        c = int(count)
        total += c
        if frames:
            selfc[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    lines = [f"worker samples: {total}", "self (top 15):"]
    for f, c in selfc.most_common(15):
        lines.append(f"  {100 * c / max(total, 1):5.1f}%  {f}")
    lines.append("inclusive (top 15):")
    for f, c in incl.most_common(15):
        lines.append(f"  {100 * c / max(total, 1):5.1f}%  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memlend.bench.fuse_profile")
    ap.add_argument("--reads", type=int, default=100000)
    ap.add_argument(
        "--py-spy",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also sample a live daemon with py-spy for this long",
    )
    ap.add_argument("--reader-cpu", type=int, default=0)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memlend-prof-", dir=args.workdir))
    try:
        (work / "backing").mkdir()
        (work / "mnt").mkdir()
        ft.make_file(work / "backing" / "lat.bin", 64 * MiB, 1)
        for bs in (4096, 65536, 262144):
            res = in_process(work / "backing", "lat.bin", bs, args.reads)
            print(
                f"\n== in-process, block size {bs // 1024}K, {args.reads} cached 4 KiB reads "
                "(µs per request, this thread's CPU) =="
            )
            for k, v in res.items():
                if k != "cprofile":
                    print(f"  {v:7.2f}  {k}")
            if bs == 4096:
                print(res["cprofile"])
        if args.py_spy:
            tools = ft.build_tools(work)
            for bs in ("4K", "64K"):
                print(
                    f"\n== live py-spy, --block-size {bs}, daemon CPU 0, reader CPU "
                    f"{args.reader_cpu}, {args.py_spy} s =="
                )
                print(live(work, tools, args.py_spy, bs, args.reader_cpu))
    finally:
        ft.cleanup()
        if not ft.is_mounted(str(work / "mnt")):
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
