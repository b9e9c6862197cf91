"""Benchmark: what a 4 KiB read through the mount costs from each tier, in one run.

    .venv/bin/python -m memlend.bench.remote_latency [--quick] [--json FILE]
        [--wait-quiet SECONDS] [--keep]

Needs root, /dev/fuse, gcc, taskset and memcached. Pinning: the C reader and every
thread of the mount daemon on CPU 0 (the daemon is started under `taskset -c 0`
and then checked with `taskset -a -p`); the lender and memcached on CPU 1, as a
client VM and a lender VM would be. In one run it measures 4 KiB random preads of
one file through `memlend mount` when they are served by:

  (a) the first tier, warmed: the page cache (the default mode), and (a') memlend's
      own tier (`--local-tier memlend`, a cache holding the whole file);
  (b) a lender: memlend's tier with a local cache of 2M of 16K blocks, the file 64M
      (32M with --quick); the lender is prefilled by reading every block once; the
      stats of the measured phase say which tier served what (remote hit ratio);
  (c) memcached as the remote tier, the same way;
  (d) the disk: local cache 2M, no lender (the daemon's O_DIRECT backing reads);
  (e) a lender in the default mode (the page cache as first tier): the reader opens
      the file with O_DIRECT, so every read misses the page cache and is a FUSE READ;

with baselines from the same run: the minimal C libfuse server on CPU 0 (the FUSE
round trip), O_DIRECT 4 KiB reads of the backing file without FUSE, RemoteTier
get_many of one 16 KiB block from this process on CPU 0 (the network round trip of
a remote hit, unsealing included), AES-GCM open of a 16 KiB blob, and
memlend.bench.tierbench (lender against memcached, 4 KiB gets one at a time and in
batches of 32). Every process and mount started here is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from memlend.bench import fuse_tools as ft
from memlend.bench.tierbench import wait_port

MiB = 1 << 20
CLIENT_CPU = 0  # reader and mount daemon
SERVER_CPU = 1  # lender and memcached
BLOCK = "16K"
BS = 16 << 10


@dataclass
class Plan:
    file_size: int = 64 * MiB
    reads: int = 20000
    warm_reads: int = 1000
    tier_n: int = 3000  # tierbench --n
    micro_n: int = 3000  # in-process RemoteTier / sealing timings
    small_cache: str = "2M"
    big_cache: str = "256M"
    lender_memory: str = "256M"
    lender_spins: tuple[int, ...] = (0, 50)  # besides the default 200


def quick_plan() -> Plan:
    return Plan(file_size=32 * MiB, reads=4000, warm_reads=500, tier_n=600, micro_n=800)


# ---- processes and mounts we start (stopped in cleanup()) ----------------------------

_procs: list[subprocess.Popen] = []
_mounts: list[str] = []
_daemons: list[int] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cmd: list[str], port: int, what: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            ft.taskset(SERVER_CPU) + cmd, stdout=f, stderr=f, stdin=subprocess.DEVNULL
        )
    _procs.append(proc)
    wait_port(port, proc, what, timeout=15)
    return proc


def _memlend(*args: str, cpu: int | None = None, timeout: float = 60) -> str:
    cmd = [*ft.taskset(cpu), sys.executable, "-m", "memlend", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {res.stderr.strip()}")
    return res.stdout


def cleanup() -> None:
    for m in reversed(_mounts):
        if ft.is_mounted(m) and subprocess.run(["umount", m], capture_output=True).returncode:
            subprocess.run(["umount", "-l", m], capture_output=True)
    for pid in _daemons:
        ft.kill_pid(pid)
    for p in _procs:
        ft.stop(p)
    _mounts.clear()
    _daemons.clear()
    _procs.clear()
    ft.cleanup()


class Mount:
    """`memlend mount` started under taskset -c CLIENT_CPU; every thread checked."""

    def __init__(self, backing: Path, mnt: Path, cache: str, extra: list[str], log: Path):
        self.backing, self.mnt, self.cache, self.extra, self.log = backing, mnt, cache, extra, log
        self.pid = 0
        self.cpus: list[str] = []

    def __enter__(self) -> Mount:
        _mounts.append(str(self.mnt))
        args = ["mount", str(self.backing), str(self.mnt), "--cache-size", self.cache]
        args += ["--block-size", BLOCK, "--log-file", str(self.log), *self.extra]
        _memlend(*args, cpu=CLIENT_CPU)
        self.pid = int(self.stats()["pid"])
        _daemons.append(self.pid)
        self.cpus = ft.pin_all_threads(self.pid, CLIENT_CPU)
        return self

    def stats(self) -> dict:
        return json.loads(_memlend("stats", str(self.mnt), "--json"))

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            _memlend("umount", str(self.mnt))
        if ft.is_mounted(str(self.mnt)):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        ft.kill_pid(self.pid)


# The cases built on a small local cache run memlend's own tier (direct I/O: every read
# is a FUSE request); the default mode's are (a) and (e).
MEMLEND_TIER = ["--local-tier", "memlend"]
COUNTERS = (
    "local_hits",
    "local_misses",
    "remote_hits",
    "remote_misses",
    "remote_timeouts",
    "remote_errors",
    "seal_failures",
    "disk_reads",
    "remote_put_blocks",
    "remote_put_skipped",
    "remote_dropped_puts",
)


def _delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS if k in after}


def _prefill(path: Path, size: int, m: Mount) -> dict:
    """Read every block once in random order (pinned like the reader), then wait
    until the mount has sent its evicted blocks to the remote tier."""
    blocks = list(range(size // BS))
    random.Random(7).shuffle(blocks)
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in blocks:
            os.pread(fd, 4096, b * BS)
        end = time.monotonic() + 30
        while True:
            s = m.stats()
            if not s.get("remote_queued_blocks") or time.monotonic() > end:
                break
            time.sleep(0.1)
    finally:
        os.close(fd)
    time.sleep(0.3)  # the put thread's last batch is acknowledged
    return m.stats()


def _reader(tools: ft.Tools, path: str, plan: Plan, *extra: str) -> dict:
    return ft.run_reader(
        tools, CLIENT_CPU, path, "rand", "--n", str(plan.reads), "--bs", "4096", *extra
    )


def _us(ns: float) -> float:
    return ns / 1000


# ---- in-process micro timings (this process pinned to CLIENT_CPU) -----------------------


def _micro(lport: int, mport: int, secret_file: str, plan: Plan) -> dict[str, dict]:
    from memlend.bench.tierbench import _pct, _time
    from memlend.remote.sealing import Sealer
    from memlend.remote.secret import load_secret
    from memlend.remote.tier import RemoteTier

    out: dict[str, dict] = {}
    seal = os.urandom(32)
    auth = load_secret(secret_file)
    keys = [b"MICRO" + i.to_bytes(27, "big") for i in range(64)]
    block = os.urandom(BS)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        sealer = Sealer(os.urandom(32))
        blob = sealer.seal(keys[0], block)
        xs = _time(lambda: sealer.open(keys[0], blob), plan.micro_n)
        out["AES-GCM open, 16 KiB"] = {"median": _pct(xs, 0.5), "p99": _pct(xs, 0.99)}
        # The raw clients alone (no tier, no unsealing): what the servers cost.
        from memlend.remote.client import LenderClient
        from memlend.remote.memcached import MemcachedClient
        from memlend.remote.secret import auth_key

        raws = (
            ("LenderClient", LenderClient(("127.0.0.1", lport), auth_key(auth), b"micro-raw")),
            ("MemcachedClient", MemcachedClient(("127.0.0.1", mport), b"micro-raw")),
        )
        for name, client in raws:
            try:
                client.put_many([(k, blob) for k in keys])
                xs = _time(lambda c=client: c.multi_get(keys[:1]), plan.micro_n)
                out[f"raw {name}.multi_get, 1 key"] = {
                    "median": _pct(xs, 0.5),
                    "p99": _pct(xs, 0.99),
                }
                xs = _time(lambda c=client: c.multi_get(keys[:32]), plan.micro_n // 4)
                out[f"raw {name}.multi_get, 32 keys"] = {
                    "median": _pct(xs, 0.5),
                    "p99": _pct(xs, 0.99),
                }
            finally:
                client.close()
        for name, url, a in (
            ("lender", f"memlend://127.0.0.1:{lport}", auth),
            ("memcached", f"memcached://127.0.0.1:{mport}", None),
        ):
            tier = RemoteTier([url], a, seal, deadline=0.002)
            try:
                for k in keys:
                    tier.put(k, block)
                tier.flush(10)
                it = iter(range(1 << 62))
                xs = _time(lambda t=tier, it=it: t.get_many([keys[next(it) % 64]]), plan.micro_n)
                snap = tier.snapshot()
                out[f"RemoteTier -> {name}, one 16 KiB block"] = {
                    "median": _pct(xs, 0.5),
                    "p99": _pct(xs, 0.99),
                    "misses": snap["remote_misses"],
                    "timeouts": snap["remote_timeouts"],
                }
            finally:
                tier.close()
    finally:
        os.sched_setaffinity(0, old)
    return out


def _tierbench(plan: Plan) -> tuple[str, dict[str, dict]]:
    cmd = [sys.executable, "-m", "memlend.bench.tierbench", "--n", str(plan.tier_n)]
    cmd += ["--client-cpu", str(CLIENT_CPU), "--server-cpu", str(SERVER_CPU)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"tierbench failed: {res.stderr.strip()}")
    rows: dict[str, dict] = {}
    for line in res.stdout.splitlines():
        parts = line.rsplit(None, 3)
        if len(parts) == 4:
            with contextlib.suppress(ValueError):
                med, p90, p99 = (float(x) for x in parts[1:])
                rows[parts[0].strip()] = {"median": med, "p90": p90, "p99": p99}
    return res.stdout, rows


# ---- the run -------------------------------------------------------------------


def run(plan: Plan, work: Path) -> dict:
    result: dict = {"plan": plan.__dict__, "machine": ft.machine()}
    result["loadavg_start"] = os.getloadavg()
    load = ft.ForeignLoad(interval=2.0).start()
    tools = ft.build_tools(work)
    backing, mnt = work / "backing", work / "mnt"
    backing.mkdir()
    mnt.mkdir()
    data = backing / "data"
    ft.make_file(data, plan.file_size, seed=1)
    secret = work / "lend.key"
    seal = work / "seal.key"
    for f in (secret, seal):
        _memlend("genkey", str(f))
    lport, mport = _free_port(), _free_port()
    lender_cmd = [sys.executable, "-m", "memlend.lender", "--listen", f"127.0.0.1:{lport}"]
    lender_cmd += ["--memory", plan.lender_memory, "--block-size", BLOCK, "--reserve", "64M"]
    lender_cmd += ["--secret-file", str(secret), "--foreground"]
    lender = _start_server(lender_cmd, lport, "lender", work / "lender.log")
    # The same lender with other spins after each request (--busy-poll-us; default 200).
    spin_ports = {}
    for spin in plan.lender_spins:
        port = _free_port()
        cmd = [*lender_cmd, "--busy-poll-us", str(spin)]
        cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{port}"
        _start_server(cmd, port, f"lender spin {spin}", work / f"lender-{spin}.log")
        spin_ports[spin] = port
    mc_cmd = ["memcached", "-p", str(mport), "-l", "127.0.0.1", "-U", "0", "-m", "256"]
    mc_cmd += ["-u", "root"] if os.geteuid() == 0 else []
    memcached = _start_server(mc_cmd, mport, "memcached", work / "memcached.log")
    result["server_cpus"] = {
        "lender": ft.thread_cpus(lender.pid),
        "memcached": ft.thread_cpus(memcached.pid),
    }
    mc_version = subprocess.run(["memcached", "-V"], capture_output=True, text=True).stdout
    result["memcached"] = mc_version.strip()
    cases: dict[str, dict] = {}
    remote = ["--secret-file", str(secret), "--seal-key-file", str(seal)]
    fpath = str(mnt / "data")

    def say(msg: str) -> None:
        print(msg, flush=True)

    # Baselines without memlend: the disk (O_DIRECT) and the minimal C FUSE server.
    ft.drop_cache(data)
    r = _reader(tools, str(data), plan, "--direct", "--warm-rand", str(plan.warm_reads))
    cases["disk, O_DIRECT pread of the backing file (no FUSE)"] = r
    say(f"O_DIRECT backing: median {_us(r['median_ns']):.1f} µs")
    mmnt = work / "minimal"
    mmnt.mkdir()
    with ft.MinimalServer(tools, data, mmnt, CLIENT_CPU, work / "minimal.log") as srv:
        r = _reader(tools, srv.path, plan, "--warm-rand", str(plan.warm_reads))
        r["server_cpus"] = srv.threads_cpus()
    cases["minimal C libfuse server, from memory (FUSE floor)"] = r
    say(f"minimal FUSE: median {_us(r['median_ns']):.1f} µs")

    # (a) local hit: the page cache (the default mode) and memlend's own tier.
    for label, tier in (
        ("(a) default mode, page-cache hit", []),
        ("(a') memlend tier, local hit", MEMLEND_TIER),
    ):
        with Mount(backing, mnt, plan.big_cache, tier, work / "mount-local.log") as m:
            ft.run_reader(tools, CLIENT_CPU, fpath, "seq", "--req", str(1 << 20))
            before = m.stats()
            r = _reader(tools, fpath, plan, "--warm-rand", str(plan.warm_reads))
            r["stats"] = _delta(before, m.stats())
            r["daemon_cpus"] = sorted(set(m.cpus))
        cases[label] = r
        say(f"{label}: median {_us(r['median_ns']):.1f} µs {r['stats']}")

    # (b), (c) local miss, remote hit.
    remotes = [
        ("(b) memlend, local miss -> lender", f"memlend://127.0.0.1:{lport}"),
        ("(c) memlend, local miss -> memcached", f"memcached://127.0.0.1:{mport}"),
    ]
    for spin, port in spin_ports.items():
        remotes.append(
            (f"(b') as (b), lender --busy-poll-us {spin}", f"memlend://127.0.0.1:{port}")
        )
    # The default mode (the page cache as first tier) with a lender: the reader opens
    # the file O_DIRECT, so every read misses the page cache and reaches the daemon.
    lender_url = f"memlend://127.0.0.1:{lport}"
    remotes.append(("(e) default mode, page-cache miss -> lender", lender_url))
    for label, url in remotes:
        kernel = label.startswith("(e)")
        extra = ["--lender", url, *remote, *([] if kernel else MEMLEND_TIER)]
        tag = url.split(":")[0] + "-" + url.rsplit(":", 1)[1]
        with Mount(backing, mnt, plan.small_cache, extra, work / f"mount-{tag}.log") as m:
            t = time.monotonic()
            pre = _prefill(Path(fpath), plan.file_size, m)
            prefill = {k: pre.get(k, 0) for k in COUNTERS}
            prefill["seconds"] = round(time.monotonic() - t, 1)
            before = m.stats()
            direct = ["--direct"] if kernel else []
            r = _reader(tools, fpath, plan, *direct, "--warm-rand", str(plan.warm_reads))
            after = m.stats()
            r["stats"] = _delta(before, after)
            r["prefill"] = prefill
            r["daemon_cpus"] = sorted(set(m.cpus))
            r["lenders"] = after.get("lenders")
            r["remote_latency_us"] = after.get("remote_latency_us")
        st = r["stats"]
        # The warm-up reads are inside the delta too (same distribution): ratios over all.
        served = st["local_hits"] + st["local_misses"]
        r["remote_hit_ratio"] = st["remote_hits"] / max(1, st["local_misses"])
        r["served_by"] = {
            "local": st["local_hits"] / max(1, served),
            "remote": st["remote_hits"] / max(1, served),
            "disk": (st["local_misses"] - st["remote_hits"]) / max(1, served),
        }
        cases[label] = r
        say(f"{label}: median {_us(r['median_ns']):.1f} µs, served by {r['served_by']}")

    # (d) the disk through the mount.
    with Mount(backing, mnt, plan.small_cache, MEMLEND_TIER, work / "mount-disk.log") as m:
        ft.drop_cache(data)
        before = m.stats()
        r = _reader(tools, fpath, plan, "--warm-rand", str(plan.warm_reads))
        r["stats"] = _delta(before, m.stats())
        r["daemon_cpus"] = sorted(set(m.cpus))
    cases["(d) memlend, local miss -> disk (no lender)"] = r
    say(f"(d) disk via mount: median {_us(r['median_ns']):.1f} µs {r['stats']}")
    result["cases"] = cases
    result["load_during_reads"] = load.take()

    result["micro"] = _micro(lport, mport, str(secret), plan)
    say(f"micro: {result['micro']}")
    result["tierbench_output"], result["tierbench"] = _tierbench(plan)
    result["load_during_tierbench"] = load.take()
    load.stop()
    result["loadavg_end"] = os.getloadavg()
    result["lender_alive"] = lender.poll() is None and memcached.poll() is None
    return result


def report(res: dict) -> None:
    c = res["cases"]
    m = res["machine"]
    print()
    print(
        f"machine: {m.get('cpu')}, {m.get('nproc')} CPUs, kernel {m.get('kernel')}, "
        f"Python {m.get('python')}, {res['memcached']}"
    )
    print(
        f"pinning: reader and mount daemon on CPU {CLIENT_CPU}, lender and memcached on CPU "
        f"{SERVER_CPU}; block size {BLOCK}; 4 KiB random preads of a "
        f"{res['plan']['file_size'] >> 20} MiB file, {res['plan']['reads']} timed reads each"
    )
    print(
        f"load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at "
        f"end; foreign CPU during the reads {res['load_during_reads']}"
    )
    print()
    print(f"{'4 KiB read served by':58} {'median':>8} {'p90':>8} {'p99':>8}  µs")
    for name, r in c.items():
        print(
            f"{name:58} {_us(r['median_ns']):8.1f} {_us(r['p90_ns']):8.1f} {_us(r['p99_ns']):8.1f}"
        )
    for label, r in c.items():
        if "served_by" not in r:
            continue
        sb = r["served_by"]
        print(
            f"{label}: remote hit ratio of local misses {r['remote_hit_ratio']:.3f}; served by "
            f"local {sb['local']:.3f} / remote {sb['remote']:.3f} / disk {sb['disk']:.3f}; "
            f"timeouts {r['stats'].get('remote_timeouts')}, "
            f"errors {r['stats'].get('remote_errors')}; tier get_many {r['remote_latency_us']}"
        )
    print()
    print(f"{'baseline in the same run':58} {'median':>8} {'p99':>8}  µs")
    for name, v in res["micro"].items():
        bad = v.get("misses") or v.get("timeouts")
        note = f"  INVALID: {v['misses']} misses, {v['timeouts']} timeouts" if bad else ""
        print(f"{name:58} {v['median']:8.1f} {v['p99']:8.1f}{note}")
    print()
    med = {k: _us(v["median_ns"]) for k, v in c.items()}
    local = med["(a') memlend tier, local hit"]
    lender = med["(b) memlend, local miss -> lender"]
    mc = med["(c) memlend, local miss -> memcached"]
    disk = med["(d) memlend, local miss -> disk (no lender)"]
    print("ratios of medians:")
    print(f"  remote (lender) / local hit      = {lender / local:.2f}")
    print(f"  remote (memcached) / local hit   = {mc / local:.2f}")
    print(f"  disk via mount / remote (lender) = {disk / lender:.2f}")
    print(f"  disk via mount / remote (memc.)  = {disk / mc:.2f}")
    print(f"  lender / memcached (via mount)   = {lender / mc:.2f}")
    opn = res["micro"]["AES-GCM open, 16 KiB"]["median"]
    for label, tag in (
        ("(b) memlend, local miss -> lender", "lender"),
        ("(c) memlend, local miss -> memcached", "memcached"),
    ):
        total = med[label]
        inside = (c[label].get("remote_latency_us") or {}).get("p50", float("nan"))
        alone = res["micro"][f"RemoteTier -> {tag}, one 16 KiB block"]["median"]
        print(
            f"where a {tag} hit's {total:.0f} µs go (rough, medians): FUSE round trip + "
            f"hit path ≈ local hit {local:.0f}; the tier's get_many inside the mount "
            f"{inside:.0f} (the same call from a tight loop in this process: {alone:.0f}; "
            f"unsealing 16 KiB {opn:.1f}); the rest (miss path, insert and eviction into "
            f"the local cache) ≈ {total - local - inside:.0f}"
        )
    goal_cases = (
        "(b) memlend, local miss -> lender",
        "(e) default mode, page-cache miss -> lender",
    )
    for label in goal_cases:
        r = c[label]
        print(
            f"goal (issue 13: a remote hit through the mount p50 <= 45, p99 <= 150 µs): {label}: "
            f"p50 {_us(r['median_ns']):.1f}, p99 {_us(r['p99_ns']):.1f}"
        )
    problems = [
        f"{k}: {r['stats'].get('remote_timeouts')} timeouts, remote hit ratio "
        f"{r['remote_hit_ratio']:.3f}"
        for k, r in c.items()
        if "served_by" in r
        and (
            (r["stats"].get("remote_timeouts") or 0) > r["n"] / 1000 or r["remote_hit_ratio"] < 0.99
        )
    ]
    for p in problems:
        print(f"  DISTURBED: {p}")
    print()
    print("memlend.bench.tierbench in the same run (4 KiB blocks):")
    print(res["tierbench_output"].rstrip())
    for line in res["tierbench_output"].splitlines():
        if "timeouts" in line and ("timeouts 0," not in line or "misses 0," not in line):
            print(f"  DISTURBED tierbench (its medians then time misses): {line.strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller file, fewer reads")
    ap.add_argument("--json", metavar="FILE", help="write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to use under 5%% of a CPU",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("remote_latency: needs root (FUSE mounts, memcached -u root)", file=sys.stderr)
        return 2
    for tool in ("gcc", "taskset", "memcached"):
        if shutil.which(tool) is None:
            print(f"remote_latency: {tool} not found", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("remote_latency: needs two CPUs", file=sys.stderr)
        return 2
    plan = quick_plan() if args.quick else Plan()
    if args.wait_quiet:
        from memlend.bench.fuse_latency import wait_quiet

        wait_quiet(args.wait_quiet)
    work = Path(tempfile.mkdtemp(prefix="memlend-remote-lat-", dir="/var/tmp"))
    try:
        res = run(plan, work)
        report(res)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    finally:
        cleanup()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
