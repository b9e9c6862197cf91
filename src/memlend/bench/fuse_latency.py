"""Mount benchmark: cached reads and sequential throughput of memlend, against baselines.

    .venv/bin/python -m memlend.bench.fuse_latency [--quick] [--out FILE.json] [--plot FILE.png]

Needs root, /dev/fuse, gcc, libfuse3-dev, pkg-config and taskset. In one run it
builds a small C reader and a minimal libfuse server (minimal_fuse.c), creates
test files in a temporary directory, and measures:

1. cached 4 KiB random pread latency: kernel page cache, the minimal C FUSE
   server (direct_io, serving from memory), memlend at every block size;
2. sequential 1 MiB re-reads of a cached file (MB/s);
3. sequential cold 1 MiB reads: memlend (fresh daemon, fadvise DONTNEED on the
   backing file) against O_DIRECT (and buffered) reads of the backing file;
4. the daemon's peak resident memory over a data set 2x its cache;
5. cold random 4 KiB reads per block size (throughput and read amplification).

Pinning: every server (minimal_fuse, and all memlend daemon threads via
`taskset -a -p -c 0 PID`) runs on CPU 0; the reader runs on CPU 0 ("same CPU")
or CPU 1 ("cross CPU"). MB/s means 10^6 bytes per second. Every mount and
process started here is unmounted/killed on every exit path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memlend import plotting
from memlend.bench import fuse_tools as ft

MiB = 1 << 20
SERVER_CPU = 0
PINNINGS = {"same": 0, "cross": 1}  # reader CPU; the server is always on SERVER_CPU
BLOCK_SIZES = ["4K", "16K", "64K", "256K"]
THREADS = 16  # memlend mount's default --threads
GOAL = 1.5  # the issue: memlend within 1.5x of the minimal C server

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Plan:
    lat_file: int = 64 * MiB
    seq_file: int = 256 * MiB
    big_file: int = 512 * MiB
    lat_reads: int = 20000
    lat_warm_rand: int = 2000
    lat_repeats: int = 3
    seq_passes: int = 3
    cached_cache: str = "512M"  # holds lat_file + seq_file at every block size
    cold_repeats: int = 2
    cold_cache: str = "768M"  # holds big_file: a cold run never evicts
    rss_cache: str = "256M"
    rss_random_reads: int = 20000
    rand_cache: str = "128M"
    rand_reads: int = 4000
    default_block: str = "16K"
    block_sizes: list[str] = field(default_factory=lambda: list(BLOCK_SIZES))


def quick_plan() -> Plan:
    return Plan(
        seq_file=128 * MiB,
        lat_reads=5000,
        lat_warm_rand=1000,
        lat_repeats=1,
        seq_passes=2,
        cached_cache="384M",
        cold_repeats=1,
        rss_random_reads=4000,
        rand_reads=1000,
    )


def _default_block() -> str:
    try:
        from memlend.cli import DEFAULT_BLOCK

        return DEFAULT_BLOCK
    except ImportError:  # pragma: no cover
        return "16K"


def _size_bytes(text: str) -> int:
    from memlend.sizes import parse_size

    return parse_size(text)


def _mbps(res: dict) -> list[float]:
    return [p["bytes"] / p["ns"] * 1e3 for p in res["passes"]]


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _combine_lat(runs: list[dict]) -> dict:
    """Per-statistic median over repeated runs; the runs are kept as they were."""
    keys = ["median_ns", "p90_ns", "p99_ns", "p999_ns", "mean_ns", "min_ns", "max_ns"]
    out = {k: _med([r[k] for r in runs]) for k in keys}
    out["runs"] = runs
    out["reads_per_run"] = runs[0]["n"]
    out["reader_cpu"] = runs[0]["reader_cpu"]
    return out


class Bench:
    def __init__(self, plan: Plan, work: Path, quick: bool) -> None:
        self.plan, self.work, self.quick = plan, work, quick
        self.backing = work / "backing"
        self.mnt = work / "mnt"
        self.backing.mkdir()
        self.mnt.mkdir()
        self.tools = ft.build_tools(work)
        self.results: dict = {"plan": asdict(plan), "quick": quick}
        self.log = work / "daemon.log"

    # ---- helpers ------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.backing / name

    def _lat(self, path: str, cpu: int, **kw: object) -> dict:
        p = self.plan
        runs = []
        for i in range(p.lat_repeats):
            args = ["--n", str(p.lat_reads), "--warm-rand", str(p.lat_warm_rand)]
            args += ["--seed", str(1000 + i)]
            if kw.get("warm_seq", True):
                args.append("--warm-seq")
            runs.append(ft.run_reader(self.tools, cpu, path, "rand", *args))
        return _combine_lat(runs)

    def _seq_cached(self, path: str, cpu: int) -> dict:
        # One warm pass, then the measured passes.
        res = ft.run_reader(self.tools, cpu, path, "seq", "--passes", str(self.plan.seq_passes + 1))
        rates = _mbps(res)[1:]
        return {"mbps": _med(rates), "passes_mbps": rates, "reader_cpu": cpu}

    def _memlend(self, block: str, cache: str, threads: int = THREADS) -> ft.Memlend:
        return ft.Memlend(
            self.backing,
            self.mnt,
            cache_size=cache,
            block_size=block,
            threads=threads,
            log_file=self.log,
            local_tier="memlend",  # its cache sizes and block sizes are the memlend tier's
        )

    def _verify(self, mounted: str, original: Path, count: int = 64) -> bool:
        """A few random 4 KiB blocks read through the mount equal the original's."""
        size = original.stat().st_size
        import random

        rnd = random.Random(7)
        with open(mounted, "rb", buffering=0) as a, open(original, "rb", buffering=0) as b:
            for _ in range(count):
                off = rnd.randrange(size // 4096) * 4096
                if os.pread(a.fileno(), 4096, off) != os.pread(b.fileno(), 4096, off):
                    return False
        return True

    # ---- sections --------------------------------------------------------------

    def setup(self) -> None:
        p = self.plan
        t0 = time.monotonic()
        ft.make_file(self._file("lat.bin"), p.lat_file, 1)
        ft.make_file(self._file("seq.bin"), p.seq_file, 2)
        ft.make_file(self._file("big.bin"), p.big_file, 3)
        fstype = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(self.backing)],
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.results["backing_fs"] = fstype
        self.results["setup_s"] = round(time.monotonic() - t0, 2)

    def cached(self) -> None:
        """Sections 1, 2 and the cached half of 5: every target, both pinnings."""
        lat: dict[str, dict] = {}
        seq: dict[str, dict] = {}
        pins: dict[str, object] = {}
        lat_path, seq_path = str(self._file("lat.bin")), str(self._file("seq.bin"))

        console.print("[bold]cached reads: kernel page cache")
        for pin, cpu in PINNINGS.items():
            lat[f"pagecache/{pin}"] = self._lat(lat_path, cpu)
            seq[f"pagecache/{pin}"] = self._seq_cached(seq_path, cpu)
        self.results["pagecache_resident"] = {
            "lat.bin": ft.cached_pages(lat_path),
            "seq.bin": ft.cached_pages(seq_path),
        }

        console.print("[bold]cached reads: minimal C FUSE server (libfuse low-level, 1 thread)")
        for name, src in (("lat", self._file("lat.bin")), ("seq", self._file("seq.bin"))):
            with ft.MinimalServer(
                self.tools, src, self.mnt, SERVER_CPU, self.work / "minimal.log"
            ) as srv:
                pins[f"minimal/{name}"] = srv.threads_cpus()
                if not self._verify(srv.path, src):
                    raise RuntimeError("minimal_fuse returned wrong data")
                for pin, cpu in PINNINGS.items():
                    if name == "lat":
                        lat[f"minimal/{pin}"] = self._lat(srv.path, cpu)
                    else:
                        seq[f"minimal/{pin}"] = self._seq_cached(srv.path, cpu)

        variants = [(bs, THREADS) for bs in self.plan.block_sizes]
        variants.append((self.plan.default_block, 1))
        for bs, threads in variants:
            tag = f"memlend-{bs}" + ("" if threads == THREADS else f"-t{threads}")
            console.print(f"[bold]cached reads: memlend --block-size {bs} --threads {threads}")
            with self._memlend(bs, self.plan.cached_cache, threads) as m:
                pins[tag] = m.pin(SERVER_CPU)
                mlat, mseq = str(self.mnt / "lat.bin"), str(self.mnt / "seq.bin")
                if not self._verify(mlat, self._file("lat.bin")):
                    raise RuntimeError(f"{tag} returned wrong data")
                # Load both files into memlend's cache before anything is timed.
                ft.run_reader(self.tools, 1, mlat, "seq")
                if threads == THREADS:
                    ft.run_reader(self.tools, 1, mseq, "seq")
                before = m.stats()
                for pin, cpu in PINNINGS.items():
                    lat[f"{tag}/{pin}"] = self._lat(mlat, cpu)
                    if threads == THREADS:
                        seq[f"{tag}/{pin}"] = self._seq_cached(mseq, cpu)
                after = m.stats()
                disk = after["disk_read_bytes"] - before["disk_read_bytes"]
                self.results.setdefault("cached_check", {})[tag] = {
                    "disk_read_bytes_while_timed": disk,
                    "resident_blocks": after["resident_blocks"],
                    "slots": after["slots"],
                    "evictions": after["evictions"],
                }
                if disk:
                    console.print(f"[red]{tag}: {disk} bytes read from disk during cached runs")
        self.results["cached_latency"] = lat
        self.results["cached_seq"] = seq
        self.results["thread_cpus"] = pins

    def cold_seq(self) -> None:
        """Section 3: sequential 1 MiB reads with nothing cached."""
        big = self._file("big.bin")
        runs: dict[str, list[float]] = {}

        def add(key: str, mbps: float) -> None:
            runs.setdefault(key, []).append(mbps)

        for rep in range(self.plan.cold_repeats):
            for pin, cpu in PINNINGS.items():
                console.print(f"[bold]cold sequential: repeat {rep + 1}, reader CPU {cpu}")
                ft.drop_cache(big)
                res = ft.run_reader(self.tools, cpu, str(big), "seq", "--direct")
                add(f"odirect/{pin}", _mbps(res)[0])
                ft.drop_cache(big)
                res = ft.run_reader(self.tools, cpu, str(big), "seq")
                add(f"buffered/{pin}", _mbps(res)[0])
                ft.drop_cache(big)
                for bs in (self.plan.default_block, "4K"):
                    ft.drop_cache(big)
                    with self._memlend(bs, self.plan.cold_cache) as m:
                        m.pin(SERVER_CPU)
                        res = ft.run_reader(self.tools, cpu, str(self.mnt / "big.bin"), "seq")
                        st = m.stats()
                    add(f"memlend-{bs}/{pin}", _mbps(res)[0])
                    self.results.setdefault("cold_seq_disk", []).append(
                        {
                            "bs": bs,
                            "pin": pin,
                            "disk_reads": st["disk_reads"],
                            "disk_read_bytes": st["disk_read_bytes"],
                        }
                    )
                    if st["disk_read_bytes"] != big.stat().st_size:
                        console.print(
                            f"[yellow]memlend-{bs}: read {st['disk_read_bytes']} "
                            "bytes from disk for a cold pass"
                        )
        self.results["cold_seq"] = {
            k: {"mbps": _med(v), "runs_mbps": v, "reader_cpu": PINNINGS[k.split("/")[1]]}
            for k, v in runs.items()
        }

    def rss(self) -> None:
        """Section 4: peak resident memory of the daemon, data set 2x the cache."""
        big = self._file("big.bin")
        out = {}
        cache = _size_bytes(self.plan.rss_cache)
        for bs in ("4K", "64K"):
            console.print(
                f"[bold]daemon memory: --block-size {bs} --cache-size {self.plan.rss_cache}"
            )
            ft.drop_cache(big)
            with self._memlend(bs, self.plan.rss_cache) as m:
                m.pin(SERVER_CPU)
                base = m.status()
                peak = {"VmRSS": 0}
                stop = threading.Event()

                def sample(m: ft.Memlend = m, peak: dict = peak, stop: threading.Event = stop):
                    while not stop.is_set():
                        try:
                            peak["VmRSS"] = max(peak["VmRSS"], m.status()["VmRSS"])
                        except OSError:
                            return
                        stop.wait(0.05)

                th = threading.Thread(target=sample, daemon=True)
                th.start()
                path = str(self.mnt / "big.bin")
                t0 = time.monotonic()
                try:
                    ft.run_reader(self.tools, 1, path, "seq")
                    rnd = ft.run_reader(
                        self.tools, 1, path, "rand", "--n", str(self.plan.rss_random_reads)
                    )
                    ft.run_reader(self.tools, 1, path, "seq")
                finally:
                    stop.set()
                    th.join()
                st, end = m.stats(), m.status()
            limit = cache + 64 * MiB
            out[bs] = {
                "cache_size": cache,
                "data_set": big.stat().st_size,
                "VmRSS_at_start": base["VmRSS"],
                "VmHWM": end["VmHWM"],
                "VmRSS_end": end["VmRSS"],
                "VmRSS_peak_sampled": peak["VmRSS"],
                "limit": limit,
                "within_limit": end["VmHWM"] <= limit,
                "resident_blocks": st["resident_blocks"],
                "slots": st["slots"],
                "evictions": st["evictions"],
                "random_reads": rnd["n"],
                "random_median_ns": rnd["median_ns"],
                "seconds": round(time.monotonic() - t0, 2),
            }
        self.results["rss"] = out

    def cold_random(self) -> None:
        """Section 5 (cold half): random 4 KiB reads over a file 4x the cache."""
        big = self._file("big.bin")
        n = str(self.plan.rand_reads)
        out = {}
        for pin, cpu in PINNINGS.items():
            console.print(f"[bold]cold random 4 KiB: O_DIRECT on the backing file, CPU {cpu}")
            ft.drop_cache(big)
            res = ft.run_reader(
                self.tools, cpu, str(big), "rand", "--n", n, "--direct", "--seed", "9"
            )
            res["iops"] = res["n"] / res["wall_ns"] * 1e9
            res["disk_bytes_per_read"] = 4096
            out[f"odirect/{pin}"] = res
            for bs in self.plan.block_sizes:
                console.print(f"[bold]cold random 4 KiB: memlend --block-size {bs}, CPU {cpu}")
                ft.drop_cache(big)
                with self._memlend(bs, self.plan.rand_cache) as m:
                    m.pin(SERVER_CPU)
                    res = ft.run_reader(
                        self.tools, cpu, str(self.mnt / "big.bin"), "rand", "--n", n, "--seed", "9"
                    )
                    st = m.stats()
                res["iops"] = res["n"] / res["wall_ns"] * 1e9
                res["disk_read_bytes"] = st["disk_read_bytes"]
                res["disk_reads"] = st["disk_reads"]
                res["disk_bytes_per_read"] = st["disk_read_bytes"] / res["n"]
                hits, misses = st["local_hits"], st["local_misses"]
                res["hit_ratio"] = hits / max(1, hits + misses)
                out[f"memlend-{bs}/{pin}"] = res
        self.results["cold_random"] = out


# ---- report -------------------------------------------------------------------


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summarize(res: dict) -> dict:
    """Ratios memlend / baselines and the verdict on the 1.5x goal."""
    lat = res["cached_latency"]
    default = res["plan"]["default_block"]
    out: dict = {"goal": GOAL, "ratios": {}}
    for bs in (f"memlend-{b}" for b in res["plan"]["block_sizes"]):
        for pin in PINNINGS:
            m, c, pc = lat[f"{bs}/{pin}"], lat[f"minimal/{pin}"], lat[f"pagecache/{pin}"]
            out["ratios"][f"{bs}/{pin}"] = {
                stat: {"vs_minimal": m[stat] / c[stat], "vs_pagecache": m[stat] / pc[stat]}
                for stat in ("median_ns", "p99_ns", "mean_ns")
            }
    verdict = {}
    for bs in ("4K", default):
        for pin in PINNINGS:
            r = out["ratios"][f"memlend-{bs}/{pin}"]["median_ns"]["vs_minimal"]
            verdict[f"memlend-{bs}/{pin}"] = {"median_ratio": r, "met": r <= GOAL}
    out["goal_met"] = verdict
    return out


def print_report(res: dict) -> None:
    lat, plan = res["cached_latency"], res["plan"]
    m = res["machine"]
    console.print(
        f"\nmachine: {m['nproc']} CPUs ({m.get('cpu', '?')}), kernel {m['kernel']}, "
        f"Python {m['python']}, libfuse {m['fuse3']}; backing fs {res['backing_fs']}"
    )
    console.print(f"servers pinned on CPU {SERVER_CPU}; reader on CPU 0 (same) or CPU 1 (cross)")

    t = Table(
        title=f"Cached 4 KiB random pread latency, µs ({plan['lat_reads']} reads x "
        f"{plan['lat_repeats']} runs, {plan['lat_file'] // MiB} MiB file)"
    )
    for col in (
        "target",
        "reader CPU",
        "median",
        "p99",
        "mean",
        "median vs C",
        "p99 vs C",
        "mean vs C",
        "median vs page cache",
    ):
        t.add_column(col, justify="right" if col != "target" else "left")
    for key, r in lat.items():
        name, pin = key.split("/")
        c, pc = lat[f"minimal/{pin}"], lat[f"pagecache/{pin}"]
        t.add_row(
            name,
            str(r["reader_cpu"]),
            _us(r["median_ns"]),
            _us(r["p99_ns"]),
            _us(r["mean_ns"]),
            _ratio(r["median_ns"], c["median_ns"]),
            _ratio(r["p99_ns"], c["p99_ns"]),
            _ratio(r["mean_ns"], c["mean_ns"]),
            _ratio(r["median_ns"], pc["median_ns"]),
        )
    console.print(t)

    t = Table(
        title=f"Sequential re-read of a cached {plan['seq_file'] // MiB} MiB file, "
        "1 MiB preads, MB/s (median of passes)"
    )
    for col in ("target", "reader CPU", "MB/s", "vs page cache", "vs minimal C"):
        t.add_column(col, justify="right" if col != "target" else "left")
    seq = res["cached_seq"]
    for key, r in seq.items():
        name, pin = key.split("/")
        t.add_row(
            name,
            str(r["reader_cpu"]),
            f"{r['mbps']:.0f}",
            _ratio(r["mbps"], seq[f"pagecache/{pin}"]["mbps"]),
            _ratio(r["mbps"], seq[f"minimal/{pin}"]["mbps"]),
        )
    console.print(t)

    t = Table(
        title=f"Cold sequential read of a {plan['big_file'] // MiB} MiB file, 1 MiB "
        f"requests, MB/s (median of {plan['cold_repeats']})"
    )
    for col in ("target", "reader CPU", "MB/s", "runs", "vs O_DIRECT"):
        t.add_column(col, justify="right" if col != "target" else "left")
    cold = res["cold_seq"]
    for key, r in cold.items():
        name, pin = key.split("/")
        t.add_row(
            name,
            str(r["reader_cpu"]),
            f"{r['mbps']:.0f}",
            " ".join(f"{x:.0f}" for x in r["runs_mbps"]),
            _ratio(r["mbps"], cold[f"odirect/{pin}"]["mbps"]),
        )
    console.print(t)

    t = Table(title="Daemon memory, data set 2x the cache (seq pass, random 4 KiB reads, seq pass)")
    for col in (
        "block",
        "cache",
        "VmHWM",
        "VmRSS end",
        "limit cache+64M",
        "within",
        "resident blocks/slots",
    ):
        t.add_column(col, justify="right")
    for bs, r in res["rss"].items():
        t.add_row(
            bs,
            f"{r['cache_size'] / MiB:.0f} MiB",
            f"{r['VmHWM'] / MiB:.1f} MiB",
            f"{r['VmRSS_end'] / MiB:.1f} MiB",
            f"{r['limit'] / MiB:.0f} MiB",
            "yes" if r["within_limit"] else "NO",
            f"{r['resident_blocks']}/{r['slots']}",
        )
    console.print(t)

    cr = res["cold_random"]
    for pin, cpu in PINNINGS.items():
        t = Table(
            title=f"Block size, reader CPU {cpu}: cached 4 KiB latency (µs, median), cached "
            f"sequential MB/s, and cold random 4 KiB reads over {plan['big_file'] // MiB} MiB "
            f"with cache {plan['rand_cache']} ({plan['rand_reads']} reads)"
        )
        for col in (
            "target",
            "cached lat",
            "cached seq MB/s",
            "cold IOPS",
            "cold median µs",
            "cold p99 µs",
            "disk KiB/read",
            "hit ratio",
        ):
            t.add_column(col, justify="right" if col != "target" else "left")
        o = cr[f"odirect/{pin}"]
        t.add_row(
            "O_DIRECT backing",
            "-",
            "-",
            f"{o['iops']:.0f}",
            _us(o["median_ns"]),
            _us(o["p99_ns"]),
            "4.0",
            "-",
        )
        for bs in plan["block_sizes"]:
            k = f"memlend-{bs}"
            r = cr[f"{k}/{pin}"]
            t.add_row(
                k,
                _us(lat[f"{k}/{pin}"]["median_ns"]),
                f"{res['cached_seq'][f'{k}/{pin}']['mbps']:.0f}",
                f"{r['iops']:.0f}",
                _us(r["median_ns"]),
                _us(r["p99_ns"]),
                f"{r['disk_bytes_per_read'] / 1024:.1f}",
                f"{r['hit_ratio']:.3f}",
            )
        console.print(t)

    for name, f in res.get("foreign_cpu", {}).items():
        share = f["cpu_seconds"] / max(f["section_seconds"], 0.1)
        style = "[yellow]" if share > 0.05 else ""
        console.print(
            f"{style}other processes during {name} ({f['section_seconds']} s): "
            f"{f['cpu_seconds']} CPU-s ({share:.0%} of one CPU) {f['top']}"
        )
    for key, v in res["summary"]["goal_met"].items():
        ok = "[green]met" if v["met"] else "[red]NOT met"
        console.print(
            f"goal memlend <= {GOAL}x minimal C server (median), {key}: "
            f"{v['median_ratio']:.2f}x {ok}"
        )


def plot(res: dict, path: str) -> None:
    plt = plotting.pyplot()

    lat = res["cached_latency"]
    names = ["pagecache", "minimal"] + [f"memlend-{b}" for b in res["plan"]["block_sizes"]]
    names += [f"memlend-{res['plan']['default_block']}-t1"]
    labels = {"pagecache": "page cache", "minimal": "minimal C\nFUSE server"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, pin in zip(axes, PINNINGS, strict=True):
        xs = range(len(names))
        med = [lat[f"{n}/{pin}"]["median_ns"] / 1000 for n in names]
        p99 = [lat[f"{n}/{pin}"]["p99_ns"] / 1000 for n in names]
        ax.bar([x - 0.2 for x in xs], med, 0.4, label="median")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        for x, v in zip(xs, med, strict=True):
            ax.text(x - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(
            [labels.get(n, n.replace("memlend-", "memlend\n")) for n in names], fontsize=8
        )
        reader = PINNINGS[pin]
        ax.set_title(f"reader CPU {reader}, server CPU {SERVER_CPU}")
        ax.set_ylabel("µs per 4 KiB pread (cached), log scale")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"Cached 4 KiB random reads, {m['nproc']} vCPU, Linux {m['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wait_quiet(limit: float) -> None:
    """Wait (up to `limit` s) until other processes use under 5% of a CPU for 3 s."""
    load = ft.ForeignLoad().start()
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            time.sleep(3)
            used = load.take()
            if used["cpu_seconds"] < 0.15:
                return
            console.print(f"waiting for a quiet machine: others used {used}")
        console.print("[yellow]machine not quiet; measuring anyway (see foreign_cpu in the JSON)")
    finally:
        load.stop()


def markdown(res: dict) -> str:
    """The result tables as Markdown (numbers straight from the JSON)."""
    lat, plan = res["cached_latency"], res["plan"]
    out = []

    def table(head: list[str], rows: list[list[str]]) -> None:
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        out.extend("| " + " | ".join(r) + " |" for r in rows)
        out.append("")

    rows = []
    for key, r in lat.items():
        name, pin = key.split("/")
        c, pc = lat[f"minimal/{pin}"], lat[f"pagecache/{pin}"]
        rows.append(
            [
                name,
                f"{SERVER_CPU if name != 'pagecache' else '-'}",
                str(r["reader_cpu"]),
                _us(r["median_ns"]),
                _us(r["p99_ns"]),
                _us(r["mean_ns"]),
                _ratio(r["median_ns"], c["median_ns"]),
                _ratio(r["p99_ns"], c["p99_ns"]),
                _ratio(r["mean_ns"], c["mean_ns"]),
                _ratio(r["median_ns"], pc["median_ns"]),
            ]
        )
    table(
        [
            "target",
            "server CPU",
            "reader CPU",
            "median µs",
            "p99 µs",
            "mean µs",
            "median / C",
            "p99 / C",
            "mean / C",
            "median / page cache",
        ],
        rows,
    )

    seq = res["cached_seq"]
    rows = []
    for key, r in seq.items():
        name, pin = key.split("/")
        rows.append(
            [
                name,
                str(r["reader_cpu"]),
                f"{r['mbps']:.0f}",
                " ".join(f"{x:.0f}" for x in r["passes_mbps"]),
                _ratio(r["mbps"], seq[f"pagecache/{pin}"]["mbps"]),
                _ratio(r["mbps"], seq[f"minimal/{pin}"]["mbps"]),
            ]
        )
    table(["target", "reader CPU", "MB/s (median)", "passes", "/ page cache", "/ minimal C"], rows)

    cold = res["cold_seq"]
    rows = []
    for key, r in cold.items():
        name, pin = key.split("/")
        rows.append(
            [
                name,
                str(r["reader_cpu"]),
                f"{r['mbps']:.0f}",
                " ".join(f"{x:.0f}" for x in r["runs_mbps"]),
                _ratio(r["mbps"], cold[f"odirect/{pin}"]["mbps"]),
            ]
        )
    table(["target", "reader CPU", "MB/s (median)", "runs", "/ O_DIRECT"], rows)

    rows = []
    for bs, r in res["rss"].items():
        rows.append(
            [
                bs,
                f"{r['cache_size'] / MiB:.0f}",
                f"{r['data_set'] / MiB:.0f}",
                f"{r['VmRSS_at_start'] / MiB:.1f}",
                f"{r['VmHWM'] / MiB:.1f}",
                f"{r['VmRSS_end'] / MiB:.1f}",
                f"{r['limit'] / MiB:.0f}",
                "yes" if r["within_limit"] else "NO",
                f"{r['resident_blocks']}/{r['slots']}",
                str(r["evictions"]),
            ]
        )
    table(
        [
            "block",
            "cache MiB",
            "data MiB",
            "RSS at start MiB",
            "VmHWM MiB",
            "VmRSS end MiB",
            "limit MiB",
            "within",
            "resident/slots",
            "evictions",
        ],
        rows,
    )

    cr = res["cold_random"]
    for pin, cpu in PINNINGS.items():
        rows = []
        o = cr[f"odirect/{pin}"]
        rows.append(
            [
                "O_DIRECT backing",
                "-",
                "-",
                f"{o['iops']:.0f}",
                _us(o["median_ns"]),
                _us(o["p99_ns"]),
                "4.0",
                "-",
            ]
        )
        for bs in plan["block_sizes"]:
            k = f"memlend-{bs}"
            r = cr[f"{k}/{pin}"]
            rows.append(
                [
                    k,
                    _us(lat[f"{k}/{pin}"]["median_ns"]),
                    f"{res['cached_seq'][f'{k}/{pin}']['mbps']:.0f}",
                    f"{r['iops']:.0f}",
                    _us(r["median_ns"]),
                    _us(r["p99_ns"]),
                    f"{r['disk_bytes_per_read'] / 1024:.1f}",
                    f"{r['hit_ratio']:.3f}",
                ]
            )
        out.append(f"reader CPU {cpu}:")
        out.append("")
        table(
            [
                "target",
                "cached 4K median µs",
                "cached seq MB/s",
                "cold IOPS",
                "cold median µs",
                "cold p99 µs",
                "disk KiB per 4 KiB read",
                "hit ratio",
            ],
            rows,
        )

    rows = []
    for name, f in res.get("foreign_cpu", {}).items():
        share = f["cpu_seconds"] / max(f["section_seconds"], 0.1)
        rows.append(
            [
                name,
                str(f["section_seconds"]),
                str(f["cpu_seconds"]),
                f"{share:.0%}",
                ", ".join(f"{k} {v}" for k, v in f["top"].items()),
            ]
        )
    table(["section", "seconds", "other processes' CPU-s", "of one CPU", "top"], rows)
    return "\n".join(out)


# ---- main -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memlend.bench.fuse_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller runs (under ~2 minutes)")
    ap.add_argument("--out", default="fuse_latency.json", help="JSON results file")
    ap.add_argument("--plot", help="write a PNG of the latency comparison here")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to use under 5%% of a CPU",
    )
    ap.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the temporary test tree goes; must be a disk file system "
        "that supports O_DIRECT (not tmpfs)",
    )
    ap.add_argument(
        "--markdown",
        metavar="JSON",
        help="print an earlier result file as Markdown tables (and --plot it); measure nothing",
    )
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            res = json.load(f)
        print(markdown(res))
        if args.plot:
            plot(res, args.plot)
        return 0
    if os.geteuid() != 0:
        print("fuse_latency: needs root (mounts, taskset -p)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("fuse_latency: needs at least 2 CPUs", file=sys.stderr)
        return 2
    plan = quick_plan() if args.quick else Plan()
    plan.default_block = _default_block()
    if plan.default_block not in plan.block_sizes:
        plan.block_sizes.append(plan.default_block)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    work = Path(tempfile.mkdtemp(prefix="memlend-bench-", dir=args.workdir))
    t0 = time.monotonic()
    try:
        b = Bench(plan, work, args.quick)
        b.results["machine"] = ft.machine()
        b.results["machine"]["cc"] = b.tools.cc
        b.results["command"] = " ".join(
            ["python -m memlend.bench.fuse_latency", *(argv or sys.argv[1:])]
        )
        b.results["started"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        load = ft.ForeignLoad().start()
        b.results["foreign_cpu"] = {}
        for name, section in (
            ("setup", b.setup),
            ("cached", b.cached),
            ("cold_seq", b.cold_seq),
            ("rss", b.rss),
            ("cold_random", b.cold_random),
        ):
            ts = time.monotonic()
            section()
            took = load.take()
            took["section_seconds"] = round(time.monotonic() - ts, 1)
            b.results["foreign_cpu"][name] = took
        load.stop()
        res = b.results
        res["summary"] = summarize(res)
        res["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        ft.cleanup()
        if ft.is_mounted(str(work / "mnt")):  # never recurse into a live mount
            console.print(f"[red]{work / 'mnt'} is still mounted; left {work} in place")
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_report(res)
    if args.plot:
        plot(res, args.plot)
        console.print(f"plot: {args.plot}")
    console.print(f"JSON: {args.out}; {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
