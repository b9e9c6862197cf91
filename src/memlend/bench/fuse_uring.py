"""FUSE over io_uring against classic /dev/fuse read()/writev(), same server, same run (issue 13).

    .venv/bin/python -m memlend.bench.fuse_uring [--reads 10000] [--rounds 7] [--out FILE.json]

Needs root, /dev/fuse, gcc, taskset, and a kernel with FUSE over io_uring built in
(/sys/module/fuse/parameters/enable_uring exists: Linux 6.14+, CONFIG_FUSE_IO_URING).
It compiles uring_fuse.c (a raw FUSE server, no libfuse, serving one file from
memory; see its header) and the benchmarks' C reader, then measures 4 KiB O_DIRECT
random preads through the mount (the reader on CPU 0; the server, all its threads,
on CPU 0, then on CPU 1) with the server answering

- classic: one thread, read(/dev/fuse) + writev(/dev/fuse) per request;
- uring:   FUSE_OVER_IO_URING, one io_uring per possible CPU, one
           COMMIT_AND_FETCH io_uring_enter() per request (ring flags as libfuse's);
- uring-defer: the same rings set up with IORING_SETUP_SINGLE_ISSUER |
           IORING_SETUP_DEFER_TASKRUN;
- py-classic, py-uring: the same server in Python (uring_fuse_py.py): os.readv +
           os.writev as memlend's loop, or the ring through ctypes and mmap with
           DEFER_TASKRUN (--no-python skips them);
- libfuse: minimal_fuse.c (libfuse 3.14 low-level, single-threaded) as the anchor
           that ties these numbers to the other mount benchmarks (--no-libfuse skips it).

Then (--no-concurrent skips it) two readers at once, one on each CPU, the servers not
pinned by the script: classic with one and with two /dev/fuse threads, and both
io_uring modes with queue q's thread pinned to CPU q (libfuse's layout); reads/s of
the two together, and their p50/p99.

The modes alternate (in order in even rounds, reversed in odd ones), a fresh
mount each time. enable_uring is set to Y for the run (the kernel only offers
FUSE_OVER_IO_URING in INIT when it is Y; a server that does not accept the flag
gets the classic transport either way) and put back to what it was on every exit
path; every mount is unmounted and every server stopped. The server reports how
many requests came over each transport, and the script checks that the timed reads
of the uring mode came over the ring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memlend.bench import fuse_tools as ft

MiB = 1 << 20
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
READER_CPU = 0
SERVER_CPUS = (0, 1)
MODES = ("classic", "uring", "uring-defer")
URING_MODES = ("uring", "uring-defer", "py-uring")
# (classic, io_uring) pairs compared round by round
PAIRS = (("classic", "uring"), ("classic", "uring-defer"), ("py-classic", "py-uring"))


def build(work: Path) -> dict[str, str]:
    """Compile the server, the reader and (optionally) minimal_fuse with gcc -O2."""
    here = Path(__file__).parent
    out = {"uring_fuse": str(work / "uring_fuse"), "reader": str(work / "reader")}
    gcc = ["gcc", "-O2", "-Wall"]
    subprocess.run(
        [*gcc, "-pthread", "-o", out["uring_fuse"], str(here / "uring_fuse.c")], check=True
    )
    (work / "reader.c").write_text(ft.READER_C)
    subprocess.run([*gcc, "-o", out["reader"], str(work / "reader.c")], check=True)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True
    )
    if flags.returncode == 0:
        out["minimal_fuse"] = str(work / "minimal_fuse")
        subprocess.run(
            [*gcc, "-o", out["minimal_fuse"], str(here / "minimal_fuse.c"), *flags.stdout.split()],
            check=True,
        )
    cc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    out["cc"] = cc.splitlines()[0] if cc else "gcc"
    return out


def read_param() -> str:
    return ENABLE_URING.read_text().strip()


def write_param(value: str) -> None:
    ENABLE_URING.write_text(value + "\n")
    if read_param() != value:
        raise RuntimeError(f"could not set {ENABLE_URING} to {value}")


class Server:
    """One mount of uring_fuse (or minimal_fuse), pinned to `cpu`, as a context manager."""

    def __init__(
        self,
        tools: dict[str, str],
        mode: str,
        src: Path,
        mnt: Path,
        cpu: int | None,
        depth: int,
        log: Path,
        threads: int = 1,
        pin_queues: bool = False,
    ) -> None:
        self.tools, self.mode, self.src, self.mnt = tools, mode, src, mnt
        self.cpu, self.depth, self.log = cpu, depth, log
        self.threads, self.pin_queues = threads, pin_queues
        self.proc: subprocess.Popen[str] | None = None
        self.counters: dict[str, Any] = {}

    @property
    def path(self) -> str:
        return str(self.mnt / "data")

    def __enter__(self) -> Server:
        if self.mode == "libfuse":
            cmd = [self.tools["minimal_fuse"], str(self.src), str(self.mnt)]
            cmd += ["-o", "max_read=1048576,fsname=minimal_fuse"]
        elif self.mode.startswith("py-"):
            cmd = [sys.executable, "-m", "memlend.bench.uring_fuse_py", str(self.src)]
            cmd += [str(self.mnt), self.mode[3:]]
        else:
            cmd = [
                self.tools["uring_fuse"],
                str(self.src),
                str(self.mnt),
                self.mode,
                str(self.depth),
                str(self.threads),
                "1" if self.pin_queues else "0",
            ]
        with open(self.log, "a") as log:
            log.write(f"--- {self.mode} on CPU {self.cpu}, {self.threads} thread(s)\n")
            log.flush()
            self.proc = subprocess.Popen(
                [*ft.taskset(self.cpu), *cmd],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        deadline = time.monotonic() + 20
        while not (ft.is_mounted(str(self.mnt)) and os.path.exists(self.path)):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.mode} server exited ({self.proc.returncode}): "
                    + self.log.read_text().splitlines()[-1]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mode} server did not mount within 20 s")
            time.sleep(0.01)
        return self

    def threads_cpus(self) -> list[str]:
        assert self.proc is not None
        return ft.thread_cpus(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        unmount(self.mnt)
        if self.proc is None:
            return
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in (out or "").splitlines():
            with contextlib.suppress(ValueError):
                self.counters = json.loads(line)


def unmount(mnt: Path) -> None:
    mounted = ft.is_mounted(str(mnt))
    if mounted and subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def children_cpu_ns() -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def verify(path: str, src: Path, count: int = 64) -> bool:
    """Random 4 KiB blocks read through the mount (O_DIRECT) equal the source's."""
    import mmap

    size = src.stat().st_size
    rnd = random.Random(11)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with open(src, "rb", buffering=0) as ref:
            for _ in range(count):
                off = rnd.randrange(size // 4096) * 4096
                if os.preadv(fd, [buf], off) != 4096:
                    return False
                if buf[:] != os.pread(ref.fileno(), 4096, off):
                    return False
    finally:
        os.close(fd)
    return True


def measure(args: argparse.Namespace, work: Path) -> dict:
    tools = build(work)
    reader = ft.Tools(tools["reader"], "", tools["cc"])
    src, mnt, log = work / "data.bin", work / "mnt", work / "server.log"
    mnt.mkdir()
    ft.make_file(src, args.size_mib * MiB, 13)
    modes = list(MODES) + ([] if args.no_python else ["py-classic", "py-uring"])
    modes += ["libfuse"] if "minimal_fuse" in tools and not args.no_libfuse else []
    res: dict = {
        "machine": {**ft.machine(), "cc": tools["cc"]},
        "command": " ".join(["python -m memlend.bench.fuse_uring", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "reads": args.reads,
        "warm_reads": args.warm,
        "rounds": args.rounds,
        "depth": args.depth,
        "file_mib": args.size_mib,
        "reader_cpu": READER_CPU,
        "runs": [],
    }
    load = ft.ForeignLoad().start()
    try:
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else modes[::-1]
            for cpu in SERVER_CPUS:
                for mode in order:
                    with Server(tools, mode, src, mnt, cpu, args.depth, log) as srv:
                        pins = srv.threads_cpus()
                        if any(p != str(cpu) for p in pins):
                            raise RuntimeError(f"{mode}: threads not on CPU {cpu}: {pins}")
                        if rnd == 0 and not verify(srv.path, src):
                            raise RuntimeError(f"{mode} returned wrong data")
                        assert srv.proc is not None
                        s0, c0 = cpu_ns(srv.proc.pid), children_cpu_ns()
                        r = ft.run_reader(
                            reader,
                            READER_CPU,
                            srv.path,
                            "rand",
                            "--direct",
                            "--n",
                            str(args.reads),
                            "--warm-rand",
                            str(args.warm),
                            "--seed",
                            str(100 + rnd),
                        )
                        s1, c1 = cpu_ns(srv.proc.pid), children_cpu_ns()
                    reads = args.reads + args.warm
                    r["server_cpu_ns_per_read"] = (s1 - s0) / reads
                    r["reader_cpu_ns_per_read"] = (c1 - c0) / reads
                    r.update(mode=mode, server_cpu=cpu, round=rnd, threads=len(pins))
                    r["server"] = srv.counters
                    c = srv.counters
                    if mode in URING_MODES and c.get("ring_requests", 0) < args.reads:
                        raise RuntimeError(f"{mode}: the reads did not use the ring: {c}")
                    if mode == "classic" and c.get("ring_requests"):
                        raise RuntimeError(f"classic mode used the ring: {c}")
                    res["runs"].append(r)
                    print(
                        f"round {rnd} server CPU {cpu} {mode:11} p50 {r['median_ns'] / 1000:6.1f} "
                        f"p99 {r['p99_ns'] / 1000:6.1f} mean {r['mean_ns'] / 1000:6.1f} µs; "
                        "CPU/read "
                        f"server {r['server_cpu_ns_per_read'] / 1000:.2f} reader "
                        f"{r['reader_cpu_ns_per_read'] / 1000:.2f} µs; {c}",
                        flush=True,
                    )
        res["foreign_cpu"] = load.take()
        if not args.no_concurrent:
            res["concurrent"] = measure_concurrent(args, tools, work)
            res["foreign_cpu_concurrent"] = load.take()
    finally:
        load.stop()
    res["summary"] = summarize(res, modes)
    return res


# The concurrent case: two readers at once, one on each CPU; servers not pinned by the
# caller. name -> (uring_fuse mode, /dev/fuse threads, queue thread q pinned to CPU q)
CONCURRENT = {
    "classic": ("classic", 1, False),
    "classic-2t": ("classic", 2, False),
    "uring": ("uring", 1, True),
    "uring-defer": ("uring-defer", 1, True),
}


def reader_pair(reader: str, path: str, reads: int, warm: int, seed: int) -> dict:
    """Readers on CPU 0 and CPU 1 at once; their results and the reads/s of both together."""
    procs = [
        subprocess.Popen(
            [
                *ft.taskset(cpu),
                reader,
                "rand",
                path,
                "--direct",
                "--n",
                str(reads),
                "--warm-rand",
                str(warm),
                "--seed",
                str(seed + cpu),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for cpu in (0, 1)
    ]
    res = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"reader failed ({p.returncode})")
        res.append(json.loads(out))
    return {
        "readers": res,
        "reads_per_s": sum(r["n"] / r["wall_ns"] * 1e9 for r in res),
        "p50_ns": statistics.mean(r["median_ns"] for r in res),
        "p99_ns": statistics.mean(r["p99_ns"] for r in res),
    }


def measure_concurrent(args: argparse.Namespace, tools: dict[str, str], work: Path) -> dict:
    src, mnt, log = work / "data.bin", work / "mnt", work / "server.log"
    names = list(CONCURRENT)
    runs = []
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            mode, threads, pin = CONCURRENT[name]
            with Server(tools, mode, src, mnt, None, args.depth, log, threads, pin) as srv:
                assert srv.proc is not None
                s0 = cpu_ns(srv.proc.pid)
                r = reader_pair(tools["reader"], srv.path, args.reads, args.warm, 200 + rnd)
                r["server_cpu_ns_per_read"] = (cpu_ns(srv.proc.pid) - s0) / (
                    2 * (args.reads + args.warm)
                )
            c = srv.counters
            if mode in URING_MODES and c.get("ring_requests", 0) < 2 * args.reads:
                raise RuntimeError(f"{name}: the reads did not use the ring: {c}")
            r.update(mode=name, round=rnd, server=c)
            runs.append(r)
            print(
                f"concurrent round {rnd} {name:11} {r['reads_per_s']:8.0f} reads/s, p50 "
                f"{r['p50_ns'] / 1000:5.1f} p99 {r['p99_ns'] / 1000:6.1f} µs (mean of the two "
                f"readers); server CPU/read {r['server_cpu_ns_per_read'] / 1000:.2f} µs; {c}",
                flush=True,
            )
    summary: dict = {}
    for name in names:
        rs = [r for r in runs if r["mode"] == name]
        summary[name] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("reads_per_s", "p50_ns", "p99_ns", "server_cpu_ns_per_read")
        }
        summary[name]["reads_per_s_runs"] = [round(r["reads_per_s"]) for r in rs]
    for base in ("classic", "classic-2t"):
        for name in ("uring", "uring-defer"):
            per_round = [
                next(r for r in runs if r["mode"] == name and r["round"] == i)["reads_per_s"]
                / next(r for r in runs if r["mode"] == base and r["round"] == i)["reads_per_s"]
                for i in range(args.rounds)
            ]
            summary[f"{name}/{base}"] = {
                "median": statistics.median(per_round),
                "rounds": [round(x, 3) for x in per_round],
            }
    return {"runs": runs, "summary": summary}


def summarize(res: dict, modes: list[str]) -> dict:
    """Per (mode, server CPU): medians over rounds. Per io_uring mode and server CPU:
    classic / that mode in each round (same round, same CPU) and the median of those."""
    out: dict = {"modes": {}, "ratios": {}}
    runs = res["runs"]

    def run(mode: str, cpu: int, rnd: int) -> dict:
        return next(
            r for r in runs if r["mode"] == mode and r["server_cpu"] == cpu and r["round"] == rnd
        )

    for cpu in SERVER_CPUS:
        for mode in modes:
            rs = [r for r in runs if r["mode"] == mode and r["server_cpu"] == cpu]
            med = {k: statistics.median(r[k] for r in rs) for k in ("median_ns", "p99_ns")}
            for k in ("mean_ns", "server_cpu_ns_per_read", "reader_cpu_ns_per_read"):
                med[k] = statistics.median(r[k] for r in rs)
            med["p50_runs_ns"] = [r["median_ns"] for r in rs]
            med["p99_runs_ns"] = [r["p99_ns"] for r in rs]
            out["modes"][f"{mode}/{cpu}"] = med
        for base, mode in PAIRS:
            if mode not in modes:
                continue
            ratios: dict[str, list[float]] = {"p50": [], "p99": [], "mean": []}
            for rnd in range(res["rounds"]):
                c, u = run(base, cpu, rnd), run(mode, cpu, rnd)
                for key, field in (("p50", "median_ns"), ("p99", "p99_ns"), ("mean", "mean_ns")):
                    ratios[key].append(c[field] / u[field])
            out["ratios"][f"{base} / {mode}/{cpu}"] = {
                k: {"median": statistics.median(v), "rounds": [round(x, 3) for x in v]}
                for k, v in ratios.items()
            }
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    us = " ".join
    lines = [
        "| server | server CPU | p50 µs | p99 µs | mean µs | server CPU µs/read | "
        "reader CPU µs/read | p50 per round µs | p99 per round µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in s["modes"].items():
        mode, cpu = key.rsplit("/", 1)
        lines.append(
            f"| {mode} | {cpu} | {v['median_ns'] / 1000:.1f} | {v['p99_ns'] / 1000:.1f} | "
            f"{v['mean_ns'] / 1000:.1f} | {v['server_cpu_ns_per_read'] / 1000:.2f} | "
            f"{v['reader_cpu_ns_per_read'] / 1000:.2f} | "
            f"{us(f'{x / 1000:.1f}' for x in v['p50_runs_ns'])} | "
            f"{us(f'{x / 1000:.1f}' for x in v['p99_runs_ns'])} |"
        )
    lines += [
        "",
        "| ratio | server CPU | p50 | p99 | mean | p50 per round | p99 per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in s["ratios"].items():
        mode, cpu = key.rsplit("/", 1)
        lines.append(
            f"| {mode} | {cpu} | {r['p50']['median']:.2f}x | {r['p99']['median']:.2f}x | "
            f"{r['mean']['median']:.2f}x | {us(f'{x:.2f}' for x in r['p50']['rounds'])} | "
            f"{us(f'{x:.2f}' for x in r['p99']['rounds'])} |"
        )
    f = res.get("foreign_cpu", {})
    lines += [
        "",
        f"Other processes' CPU time during the one-reader runs: {f.get('cpu_seconds')} s "
        f"(top: {f.get('top')}).",
    ]
    if "concurrent" in res:
        cs = res["concurrent"]["summary"]
        lines += [
            "",
            "Two readers at once (CPU 0 and CPU 1), servers not pinned (uring: queue q's "
            "thread on CPU q):",
            "",
            "| server | reads/s, both readers | p50 µs | p99 µs | server CPU µs/read | "
            "reads/s per round |",
            "|---|---|---|---|---|---|",
        ]
        for name in CONCURRENT:
            v = cs[name]
            lines.append(
                f"| {name} | {v['reads_per_s']:.0f} | {v['p50_ns'] / 1000:.1f} | "
                f"{v['p99_ns'] / 1000:.1f} | {v['server_cpu_ns_per_read'] / 1000:.2f} | "
                f"{us(str(x) for x in v['reads_per_s_runs'])} |"
            )
        lines += ["", "| reads/s ratio | median | per round |", "|---|---|---|"]
        for key, v in cs.items():
            if "/" in key:
                rounds = us(f"{x:.2f}" for x in v["rounds"])
                lines.append(f"| {key} | {v['median']:.2f}x | {rounds} |")
        f = res.get("foreign_cpu_concurrent", {})
        lines += [
            "",
            f"Other processes' CPU time during the two-reader runs: {f.get('cpu_seconds')} s "
            f"(top: {f.get('top')}).",
        ]
    lines += ["", f"Command: `{res['command']}`; started {res['started']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memlend.bench.fuse_uring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--reads", type=int, default=10000, help="timed 4 KiB reads per run")
    ap.add_argument("--warm", type=int, default=1000, help="untimed reads first")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of every (mode, server CPU)")
    ap.add_argument("--depth", type=int, default=4, help="ring entries per queue (power of 2)")
    ap.add_argument("--size-mib", type=int, default=64, help="file size (held in the server)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to use under 5%% of a CPU",
    )
    ap.add_argument(
        "--no-python", action="store_true", help="skip the Python servers (uring_fuse_py)"
    )
    ap.add_argument(
        "--no-concurrent", action="store_true", help="skip the two-reader throughput runs"
    )
    ap.add_argument("--no-libfuse", action="store_true", help="skip the minimal_fuse anchor")
    ap.add_argument("--out", default="fuse_uring.json", help="JSON results file")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary files go")
    ap.add_argument("--markdown", metavar="JSON", help="print an earlier result as Markdown")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if os.geteuid() != 0:
        print("fuse_uring: needs root (mount(2), /dev/fuse, enable_uring)", file=sys.stderr)
        return 2
    if not ENABLE_URING.exists():
        print(
            f"fuse_uring: {ENABLE_URING} is missing: this kernel has no FUSE over io_uring "
            "(Linux 6.14+, CONFIG_FUSE_IO_URING)",
            file=sys.stderr,
        )
        return 2
    if (os.cpu_count() or 1) < 2:
        print("fuse_uring: needs at least 2 CPUs", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    if args.wait_quiet:
        from memlend.bench.fuse_latency import wait_quiet

        wait_quiet(args.wait_quiet)
    saved = read_param()
    work = Path(tempfile.mkdtemp(prefix="memlend-uring-", dir=args.workdir))
    try:
        write_param("Y")
        res = measure(args, work)
        res["enable_uring_before"] = saved
    finally:
        unmount(work / "mnt")
        with contextlib.suppress(OSError, RuntimeError):
            write_param(saved)
        if read_param() != saved:
            print(f"fuse_uring: could not restore {ENABLE_URING} to {saved}", file=sys.stderr)
        if ft.is_mounted(str(work / "mnt")):
            print(f"fuse_uring: {work / 'mnt'} is still mounted; left {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(markdown(res))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
