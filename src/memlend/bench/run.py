"""`memlend bench`: build the testbed, run the matrix, write results.json, report, plots.

    python -m memlend.bench.run [--quick] [--out DIR] [--disk PROFILE] ...

One cell = (config, workload, disk profile). Per config the testbed is built afresh
(client cgroup, mount, lenders), the data set is read once unthrottled (warm-up: every
16 KiB block once in random order, so caches and lenders hold what they can), then each
workload runs for a fixed time with the backing disk capped by the profile. Everything is
torn down after each config and, whatever happens, at the end (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from memlend.bench import fuse_tools as ft
from memlend.bench import postmark
from memlend.bench import testbed as tb
from memlend.bench import workloads as wl
from memlend.bench.matrix import (
    CONFIGS,
    DISKS,
    EXTRA_CONFIGS,
    QUICK_CONFIGS,
    REMOTE_CONFIGS,
    add_bench_arguments,
)
from memlend.errors import UserError
from memlend.sizes import parse_size

MiB = 1 << 20

PUT_COUNTERS = ("remote_put_blocks", "remote_put_skipped", "remote_dropped_puts")
MAX_WARM_PASSES = 5
WARM_DROP_OK = 256  # puts a last warm-up pass may drop (of 65,536 blocks per GiB)


@dataclass
class Plan:
    out: Path
    disks: list[str]
    client_memory: int
    dataset: int
    workloads: list[str]
    configs: list[str]
    seconds: float
    quick: bool
    netns: bool
    keep_logs: bool = False
    sqlite_rows: int = 0
    shim: Path | None = None  # readcheck.so, built when postmark is in the plan
    cfuse: str | None = None  # the C FUSE passthrough binary of config cfuse


def _plan(args: argparse.Namespace) -> Plan:
    try:
        mem = (
            parse_size(args.client_memory)
            if args.client_memory
            else (192 if args.quick else 512) * MiB
        )
        ds = parse_size(args.dataset) if args.dataset else 4 * mem
    except ValueError as e:
        raise UserError(f"bad size: {e}") from None
    if mem < 64 * MiB:
        raise UserError("--client-memory must be at least 64M")
    if ds < 16 * MiB:
        raise UserError("--dataset must be at least 16M")
    disks = args.disk or ["cloud"]
    for d in disks:
        if d not in DISKS:
            raise UserError(f"unknown disk profile {d!r} (choose from {', '.join(DISKS)})")
    works = args.workload or list(wl.QUICK_WORKLOADS if args.quick else wl.WORKLOADS)
    for w in works:
        if w not in wl.WORKLOADS:
            raise UserError(f"unknown workload {w!r} (choose from {', '.join(wl.WORKLOADS)})")
    confs = args.config or list(QUICK_CONFIGS if args.quick else CONFIGS)
    for c in confs:
        if c not in CONFIGS + EXTRA_CONFIGS:
            raise UserError(f"unknown config {c!r} (choose from {', '.join(CONFIGS)}, cfuse)")
    cfuse = None
    if "cfuse" in confs:
        if not args.cfuse:
            raise UserError("config cfuse needs --cfuse BINARY (a C FUSE passthrough)")
        cfuse = shutil.which(args.cfuse) or args.cfuse
        if not os.access(cfuse, os.X_OK):
            raise UserError(f"--cfuse {args.cfuse}: not an executable")
        cfuse = os.path.abspath(cfuse)
    secs = args.seconds or (6.0 if args.quick else 20.0)
    return Plan(
        Path(args.out), disks, mem, ds, works, confs, secs, args.quick, not args.no_netns,
        keep_logs=args.keep_logs, cfuse=cfuse,
    )  # fmt: skip


def local_tier(config: str) -> str | None:
    """The mount's --local-tier in a configuration; None where nothing is mounted."""
    if config in ("pagecache", "ideal", "cfuse"):
        return None
    return "kernel" if config.startswith("kernel") else "memlend"


def cache_size(client_memory: int) -> int:
    """memlend's --cache-size inside a client of `client_memory`: what is left once the
    daemon's own memory and the workload's processes have room. Measured (the rows'
    `daemon_memory`): beyond its --cache-size the daemon held up to 96 MiB (1 MiB reads,
    16 workers, lenders' put queue), and 16 fio jobs or SQLite take 10-30 MiB more; with
    client - 112 MiB a 512 MiB client's daemon was OOM-killed in four cells of a run. So
    64 MiB plus 15% of the client memory (at least a quarter of it stays the cache)."""
    return max(client_memory // 4, client_memory - 64 * MiB - client_memory * 15 // 100)


# ---- one configuration ----------------------------------------------------------


class ConfigRun:
    """The testbed of one configuration: client group, mount, lenders."""

    def __init__(self, bed: tb.Testbed, plan: Plan, config: str) -> None:
        self.bed, self.plan, self.config = bed, plan, config
        self.mnt: str | None = None
        self.daemon = 0
        self.procs: list[subprocess.Popen] = []
        self.lender_groups: list[tb.BaseGroup] = []
        self.client: tb.BaseGroup | None = None
        self.where = "loopback"
        self.lend_mem = 0
        self.cfuse: subprocess.Popen | None = None
        self.check_group: tb.Group | None = None  # the read checker's reads (postmark)

    def __enter__(self) -> ConfigRun:
        bed, plan, c = self.bed, self.plan, self.config
        mem = None if c == "ideal" else plan.client_memory
        self.client = bed.group("client", memory=mem, cpu=tb.CLIENT_CPU, blkio=True)
        extra: list[str] = []
        if c in REMOTE_CONFIGS:
            extra = self._start_lenders()
        if c == "cfuse":
            self._mount_cfuse()
        tier = local_tier(c)
        if tier is not None:
            extra += ["--local-tier", tier]
            if c == "kernel-wb":
                extra += ["--writeback-cache"]
            self.mnt, self.daemon = bed.mount(self.client, cache_size(plan.client_memory), extra)
        return self

    def _mount_cfuse(self) -> None:
        """The reference: a C FUSE passthrough of the same backing directory, its daemon
        in the client group as memlend's would be (attributes and names cached 1 s, as
        memlend's defaults; xattrs and permission checks on, as memlend has them)."""
        bed, plan = self.bed, self.plan
        assert plan.cfuse is not None and self.client is not None
        mnt = str(bed.work / "mnt")
        opts = f"source={bed.work / 'backing'},xattr,default_permissions,timeout=1"
        p = bed.spawn([plan.cfuse, "-f", "-o", opts, mnt], self.client,
                      log=bed.work / "cfuse.log", netns=bed.client_ns)  # fmt: skip
        deadline = time.monotonic() + 10
        while not ft.is_mounted(mnt):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{plan.cfuse} did not mount (see {bed.work / 'cfuse.log'})")
            time.sleep(0.05)
        bed.mounts.append(mnt)
        self.mnt, self.daemon, self.cfuse = mnt, p.pid, p

    def _start_lenders(self) -> list[str]:

        bed, plan, c = self.bed, self.plan, self.config
        n = 2 if c == "lenders" else 1
        total = plan.dataset * (2 if plan.sqlite_rows else 1)
        lend_mem = self.lend_mem = max(64 * MiB, total * 5 // 4 // n)
        secret = bed.work / "secret"
        for key in (secret, bed.work / "seal.key"):
            if not key.exists():
                bed.memlend_cli("genkey", str(key))
        extra = ["--secret-file", str(secret), "--seal-key-file", str(bed.work / "seal.key")]
        for i in range(n):
            g = bed.group(f"lender{i}", memory=lend_mem + 160 * MiB, cpu=tb.LENDER_CPU, blkio=False)
            self.lender_groups.append(g)
            ns, host = None, "127.0.0.1"
            if plan.netns and bed.netns:
                ns, host = bed.add_netns(i)
                self.where = "veth between network namespaces (client's and lender's)"
            port = tb._free_port() if ns is None else 7070
            log = bed.work / f"{c}-lender{i}.log"
            if c == "memcached":
                cmd = ["memcached", "-U", "0", "-l", host, "-p", str(port)]
                cmd += [
                    "-m",
                    str(lend_mem // MiB),
                    "-P",
                    str(bed.work / f"mc{i}.pid"),
                    "-u",
                    "root",
                ]
                url = f"memcached://{host}:{port}"
            else:
                cmd = [sys.executable, "-m", "memlend", "lend", "--listen", f"{host}:{port}"]
                cmd += ["--memory", str(lend_mem), "--secret-file", str(secret), "--foreground"]
                cmd += ["--log-file", str(log), "--reserve", "64M"]
                url = f"memlend://{host}:{port}"
            p = bed.spawn(cmd, g, log=log, netns=ns)
            self.procs.append(p)
            bed.wait_port(host, port, p, c)
            extra += ["--lender", url]
        return extra

    def path(self) -> str:
        return os.path.join(self.mnt or str(self.bed.work / "backing"), wl.DATA)

    def stats(self) -> dict:
        return self.bed.stats(self.mnt) if self.mnt and not self.cfuse else {}

    def warm(self) -> dict:
        """Unthrottled passes, each reading every 16 KiB block once in random order;
        after each, wait for the mount's puts to the lenders to drain.

        Two passes for every configuration. A remote tier gets up to MAX_WARM_PASSES
        while the last pass still dropped puts: the first pass outruns the put queue
        (it drops puts when full: one Python lender takes about 10k blocks/s, a block
        comes from the unthrottled disk faster), and the lender configurations are
        defined as lenders that hold the data set."""
        assert self.client is not None
        self.bed.throttle(self.client, None, None)
        cmds = [_warm_read_cmd("warm", self.path(), f"--size={self.plan.dataset}", *wl.VERIFY)]
        if self.plan.sqlite_rows:
            # the database first: the data set, which most workloads read, is read last
            # (a page cache holds what came last; it held the database and answered no
            # uniform read of the data set from memory)
            cmds.insert(0, self._warm_db_cmd())
        remote = self.config in REMOTE_CONFIGS
        t0 = time.monotonic()
        s0 = self.stats()
        passes = 0
        while True:
            before = self.stats()
            for cmd in cmds:
                r = self.bed.run(cmd, self.client, timeout=1800, netns=self.bed.client_ns)
                res = wl.parse_fio(r.stdout)
                if r.returncode or res["fio_error"]:
                    raise RuntimeError(f"warm-up failed: {r.stderr.strip()[-300:]}")
            passes += 1
            if not remote:
                if passes == 2:
                    break
                continue
            end = time.monotonic() + 30
            while self.stats().get("remote_queued_blocks") and time.monotonic() < end:
                time.sleep(0.1)
            time.sleep(0.3)
            drops = "remote_dropped_puts"
            dropped = self.stats().get(drops, 0) - before.get(drops, 0)
            if passes >= MAX_WARM_PASSES or (passes >= 2 and dropped <= WARM_DROP_OK):
                break
        s1 = self.stats()
        return {
            "warm_seconds": round(time.monotonic() - t0, 1),
            "warm_passes": passes,
            "warm_verified": True,
            # the page cache of files read inside the client group is charged to it
            "client_cache_after_warm": self.client.cache_bytes(),
            "warm_counters": {k: s1.get(k, 0) - s0.get(k, 0) for k in PUT_COUNTERS if k in s1},
            "lender_blocks_after_warm": [ld.get("blocks_held") for ld in s1.get("lenders", [])],
        }

    def _warm_db_cmd(self) -> list[str]:
        return _warm_read_cmd("warmdb", os.path.join(os.path.dirname(self.path()), wl.DB))

    def measure(self, work: wl.Workload, disk: str) -> dict:
        assert self.client is not None
        iops, bps = DISKS[disk]
        warm = None
        if work.hot_warm:  # both caches start the run holding the hot set (if they can)
            warm = work.warm_cmd(self.path(), self.plan.client_memory)
        elif work is wl.SQLITE:  # the workloads before it read only the data set
            warm = self._warm_db_cmd()
        if warm:
            r = self.bed.run(warm, self.client, timeout=1800, netns=self.bed.client_ns)
            if r.returncode or wl.parse_fio(r.stdout)["fio_error"]:
                raise RuntimeError(f"warm-up before {work.name} failed: {r.stderr.strip()[-300:]}")
        self.bed.throttle(self.client, iops, bps)
        cmd = work.cmd(self.path(), self.plan.dataset, self.plan.client_memory, self.plan.seconds)
        if work is wl.SQLITE:
            db = os.path.join(os.path.dirname(self.path()), wl.DB)
            cmd = wl.sqlite_cmd(sys.executable, db, self.plan.seconds, self.plan.sqlite_rows)
        elif work is wl.POSTMARK:
            assert self.plan.shim is not None
            ref = str(self.bed.work / "backing")
            files = postmark.files_for(self.plan.dataset)
            trans = max(1000, int(400 * self.plan.seconds))
            where = os.path.dirname(self.path())
            tasks = self._check_tasks()
            cmd = postmark.cmd(sys.executable, where, ref, files, trans, self.plan.shim, tasks)
        spike: dict = {}
        timer = None
        if work is wl.SPIKE:
            if not self.lender_groups:
                raise RuntimeError(
                    "lender-spike needs a lender (configs lender, lenders, memcached)"
                )
            timer = threading.Timer(self.plan.seconds / 3, self._spike, (spike,))
            timer.start()
        s0, b0 = self.stats(), self.client.io_serviced(self.bed.disk)
        c0 = self.check_group.io_serviced(self.bed.disk) if self.check_group else (0, 0)
        oom0 = self.client.oom_kills()
        with contextlib.suppress(OSError):  # the peak below is this cell's
            self.client.reset_peak()
        lcpu0 = [tb.proc_cpu_seconds(p.pid) for p in self.procs]
        cpu0 = tb.cpu_times()
        try:
            r = self.bed.run(
                cmd, self.client, timeout=self.plan.seconds * 5 + 120, netns=self.bed.client_ns
            )
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
        oom = self.client.oom_kills() - oom0
        if oom:
            raise RuntimeError(
                f"the client cgroup's OOM killer killed {oom} process(es) (see dmesg): "
                "the mount daemon or the workload outgrew --client-memory"
            )
        cpu1 = tb.cpu_times()
        lcpu1 = [tb.proc_cpu_seconds(p.pid) for p in self.procs]
        s1, b1 = self.stats(), self.client.io_serviced(self.bed.disk)
        c1 = self.check_group.io_serviced(self.bed.disk) if self.check_group else (0, 0)
        if spike:
            spike.update(self._spike_end(spike))
        self.bed.throttle(self.client, None, None)
        if work is wl.SQLITE or work is wl.POSTMARK:
            if r.returncode:
                raise RuntimeError(f"{work.name} failed: {r.stderr.strip()[-300:]}")
            res = (wl.parse_sqlite if work is wl.SQLITE else postmark.parse)(r.stdout)
        else:
            res = wl.parse_fio(r.stdout, work.main_job)
        row: dict = dict(res)
        row["disk_ios"] = b1[0] - b0[0]
        row["disk_bytes"] = b1[1] - b0[1]
        if work is wl.POSTMARK:  # not in disk_ios: the checker's reads, made apart
            row["check_disk_ios"], row["check_disk_bytes"] = c1[0] - c0[0], c1[1] - c0[1]
        if self.mnt and not self.cfuse:
            d = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1 if isinstance(s1.get(k), int | float)}
            lh, lm = d.get("local_hits", 0), d.get("local_misses", 0)
            rh = d.get("remote_hits", 0)
            if local_tier(self.config) == "memlend":
                row["hit_ratio"] = {
                    "local": round(lh / max(1, lh + lm), 4),
                    "remote": round(rh / max(1, lh + lm), 4),
                    "disk": round(d.get("disk_reads", 0) / max(1, lh + lm), 4),
                }
            elif work.name != "seqread" and work not in (wl.SQLITE, wl.POSTMARK):
                # page-cache hits never reach memlend: a 4 KiB fadvise-RANDOM read that
                # misses is one request of one block to the daemon
                ios = max(1, res["ios"])
                row["hit_ratio"] = {
                    "pagecache": round(max(0.0, 1 - lm / ios), 4),
                    "remote": round(rh / ios, 4),
                    "disk": round(d.get("disk_reads", 0) / ios, 4),
                }
            row["mount_counters"] = {
                k: d.get(k, 0)
                for k in (
                    "local_hits",
                    "local_misses",
                    "remote_hits",
                    "remote_misses",
                    "remote_timeouts",
                    "disk_reads",
                    "disk_read_bytes",
                    *PUT_COUNTERS,
                    "written_lent_blocks",
                )
            }
        elif work is not wl.SQLITE and work is not wl.POSTMARK:
            # kernel page cache: 4 KiB reads with fadvise RANDOM: one disk I/O per miss
            per_io = 256 if work.name == "seqread" else 1
            pages = res["ios"] * per_io
            pc = max(0.0, 1 - row["disk_ios"] / max(1, pages))
            row["hit_ratio"] = {"pagecache": round(pc, 4), "disk": round(1 - pc, 4)}
        else:  # a query or transaction reads an unknown number of pages
            row["hit_ratio"] = {}
            row["hit_ratio_note"] = "not measured: pages read per query are not known"
        if work.main_job:  # a background job's reads share every counter above
            row["hit_ratio"] = {}
            row["hit_ratio_note"] = "not measured: the background job's reads share the counters"
        row["client_cgroup"] = {
            "cache_bytes": self.client.cache_bytes(),
            "rss_bytes": self.client.rss_bytes(),
            "peak_bytes": self.client.peak(),
            "limit": None if self.config == "ideal" else self.plan.client_memory,
        }
        row["cpu"] = tb.cpu_usage(cpu0, cpu1)
        if self.daemon:  # the daemon's memory beyond its --cache-size (see cache_size)
            with contextlib.suppress(OSError):
                st = ft.proc_status(self.daemon)
                row["daemon_memory"] = {
                    "rss": st.get("VmRSS", 0),
                    "hwm": st.get("VmHWM", 0),
                    "rss_anon": st.get("RssAnon", 0),
                    "cache_size": cache_size(self.plan.client_memory),
                }
        if self.procs:
            # CPUs' worth of time each lender (or memcached) used during the cell
            secs = max(1e-9, self.plan.seconds)
            used = zip(lcpu0, lcpu1, strict=True)
            row["lender_cpu"] = [round((b - a) / secs, 3) for a, b in used]
        if spike:
            row["spike"] = {k: v for k, v in spike.items() if k != "proc"}
        row["verified"] = r.returncode == 0 and res["fio_error"] == 0
        if not row["verified"]:
            row["error"] = f"fio failed (status {r.returncode}): {r.stderr.strip()[-300:]}"
        return row

    def _check_tasks(self) -> str | None:
        """The tasks file of a blkio group, never throttled, for the Postmark read
        checker's reads of the backing files (readcheck.c). Through a mount that reads
        the disk with O_DIRECT they are disk reads the workload does not make (about
        4,200 per cell at 2 GiB, docs/benchmarks.md "Postmark's extra disk I/O,
        traced"); in the client's group they were throttled and counted as its own.
        cgroup v1 only: on v2 a thread cannot leave its process's io group, so None
        and the checker reads in the client's group, as before (the row's
        postmark.check_reads_apart says which)."""
        if self.bed.cgroup != 1:
            return None
        if self.check_group is None:
            self.check_group = self.bed.io_group("check")
        return str(self.check_group.path("blkio") / "tasks")

    def _spike(self, out: dict) -> None:
        g = self.lender_groups[0]
        n = self.lend_mem * 4 // 5
        out["lender_usage_before"] = g.usage()
        out["lender_blocks_before"] = self._lender_blocks()
        out["spike_bytes"] = n
        out["at_seconds"] = round(self.plan.seconds / 3, 1)
        cmd = [sys.executable, "-c", wl.SPIKE_CODE, str(n), f"{tb.PREFIX}-spike"]
        out["proc"] = self.bed.spawn(cmd, g, log=self.bed.work / "spike.log")

    def _lender_blocks(self) -> int | None:
        """Blocks the first lender holds, as its STATS said at the mount's last probe."""
        lenders = self.stats().get("lenders") or [{}]
        return lenders[0].get("blocks_held")

    def _spike_end(self, out: dict) -> dict:
        g = self.lender_groups[0]
        p: subprocess.Popen = out["proc"]
        res = {
            "spike_alive_at_end": p.poll() is None,
            "lender_alive_at_end": self.procs[0].poll() is None,
            "lender_group_usage_at_end": g.usage(),
            "lender_blocks_at_end": self._lender_blocks(),
            "lender_group_limit": g.limit(),
            "oom_kills": g.oom_kills(),
        }
        self.bed.stop(p)
        return res

    def __exit__(self, *exc: object) -> None:
        if self.mnt:
            self.bed.umount(self.mnt)
        if self.cfuse is not None:
            self.bed.stop(self.cfuse)
        for p in self.procs:
            self.bed.stop(p)
        for g in [self.client, *self.lender_groups]:
            if g is not None:
                self.bed.drop_group(g)
        for ns in list(self.bed.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self.bed.namespaces.remove(ns)
        self.bed.client_ns = None


# ---- the matrix -------------------------------------------------------------------


def _warm_read_cmd(name: str, path: str, *extra: str) -> list[str]:
    """fio reading every 16 KiB block of `path` once, in random order. randrepeat=0:
    fio's offsets do not depend on --randseed, and a warm-up in the measured order
    would favour caches that keep the first blocks read (LIRS)."""
    cmd = ["fio", f"--name={name}", f"--filename={path}", "--rw=randread", "--bs=16k"]
    return [*cmd, "--ioengine=psync", "--output-format=json", "--randrepeat=0", *wl.KEEP, *extra]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_matrix(plan: Plan, progress: bool = True, who: str = "memlend bench") -> dict:
    tb.check_environment(who)
    plan.out.mkdir(parents=True, exist_ok=True)
    bed = tb.Testbed(Path("/var/tmp") / f"{tb.PREFIX}-{os.getpid()}")
    if plan.keep_logs:
        bed.keep_logs = plan.out / "logs"
    # both installed explicitly: a SIGINT ignored by the parent (a background job of a
    # non-interactive shell) would otherwise stay ignored and ^C would do nothing
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    rows: list[dict] = []
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "memlend bench " + " ".join(a for a in sys.argv[1:] if a != "bench"),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "client_memory": plan.client_memory,
        "dataset": plan.dataset,
        "seconds_per_cell": plan.seconds,
        "cache_size": cache_size(plan.client_memory),
        "cgroup": f"v{bed.cgroup}",
        "pinning": {
            "client": f"cpuset CPU {tb.CLIENT_CPU}",
            "lenders": f"cpuset CPU {tb.LENDER_CPU}",
        },
        "disks": {d: {"read_iops": DISKS[d][0], "read_bps": DISKS[d][1]} for d in plan.disks},
    }
    try:
        bed.open()
        meta["backing_disk"] = bed.disk
        meta["network"] = (
            "veth between network namespaces" if (plan.netns and bed.netns) else "loopback"
        )
        data = bed.work / "backing" / wl.DATA
        fill = subprocess.run(
            wl.fill_cmd(str(data), plan.dataset), capture_output=True, text=True, cwd=bed.work
        )
        if fill.returncode:
            raise RuntimeError(f"writing the data set failed: {fill.stderr.strip()[-300:]}")
        if "sqlite" in plan.workloads:
            plan.sqlite_rows = wl.make_db(str(bed.work / "backing" / wl.DB), plan.dataset)
            meta["sqlite_rows"] = plan.sqlite_rows
        if "postmark" in plan.workloads:
            plan.shim = postmark.build_shim(bed.work)
        cells = [(c, w, d) for c in plan.configs for w in plan.workloads for d in plan.disks]
        with _Progress(progress, len(cells)) as bar:
            for config in plan.configs:
                ft.drop_cache(data)
                if plan.sqlite_rows:
                    ft.drop_cache(bed.work / "backing" / wl.DB)
                todo = [(w, d) for w in plan.workloads for d in plan.disks]
                try:
                    with ConfigRun(bed, plan, config) as cr:
                        bar.say(f"{config}: warm-up")
                        warm = cr.warm()
                        for w, d in todo:
                            bar.say(f"{config} / {w} / {d}")
                            row = _base(plan, config, w, d, cr.where)
                            try:
                                row.update(cr.measure(wl.WORKLOADS[w], d))
                            except (RuntimeError, OSError, ValueError) as e:
                                row.update(verified=False, error=str(e)[:400])
                            row.update(warm)
                            rows.append(row)
                            bar.advance()
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    done = {(r["workload"], r["disk"]) for r in rows if r["config"] == config}
                    for w, d in todo:
                        if (w, d) not in done:
                            row = _base(plan, config, w, d, "")
                            row.update(verified=False, error=f"{config} could not run: {e}"[:400])
                            rows.append(row)
                            bar.advance()
    finally:
        bed.close()
        for s, h in old.items():
            signal.signal(s, h)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = {"meta": meta, "rows": rows}
    (plan.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    from memlend.bench import report_bench

    report_bench.write_report(result, plan.out)
    return result


def _base(plan: Plan, config: str, w: str, d: str, where: str) -> dict:
    return {
        "config": config,
        "local_tier": local_tier(config),
        "workload": w,
        "disk": d,
        "client_memory": plan.client_memory,
        "dataset": plan.dataset,
        "iops": None,
        "mbps": None,
        "p50_us": None,
        "p99_us": None,
        "disk_ios": None,
        "hit_ratio": {},
        "pinning": {
            "client": f"cpuset {tb.CLIENT_CPU} (workload and mount daemon)",
            "lenders": f"cpuset {tb.LENDER_CPU}" if config in REMOTE_CONFIGS else None,
        },
        "lender_network": where or None,
        "verified": False,
        "error": None,
    }


class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._p = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import Progress

            self._p = Progress(transient=False)
            self._p.start()
            self._task = self._p.add_task("bench", total=self.total)
        return self

    def say(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=text)

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def run_bench(args: argparse.Namespace) -> int:
    plan = _plan(args)
    try:
        result = run_matrix(plan, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print("memlend bench: interrupted; the testbed was removed", file=sys.stderr)
        return 130
    bad = [r for r in result["rows"] if r.get("error")]
    print(
        f"wrote {plan.out}/results.json, {plan.out}/report.md "
        f"({len(result['rows'])} cells, {len(bad)} errors)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memlend bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_bench(args)
    except UserError as e:
        print(f"memlend bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
