"""The Markdown report and PNG plots of a `memlend bench` results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memlend import plotting

MiB = 1 << 20
ORDER = (
    "pagecache",
    "local",
    "kernel",
    "kernel-wb",
    "cfuse",
    "lender",
    "kernel-lender",
    "lenders",
    "memcached",
    "ideal",
)


def _cell(rows: list[dict], config: str, workload: str, disk: str) -> dict | None:
    for r in rows:
        if (r["config"], r["workload"], r["disk"]) == (config, workload, disk):
            return r
    return None


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not a.get("iops") or not b.get("iops") or a.get("error") or b.get("error"):
        return "—"
    return f"{a['iops'] / b['iops']:.2f}x"


def _mbps(bps: int | None) -> str:
    return "∞" if not bps else f"{bps / 1e6:g}"


def _steal(r: dict) -> str:
    """CPU time the hypervisor took from this VM during the cell, per CPU."""
    cpu = r.get("cpu") or {}
    return "/".join(f"{v['steal']:.0%}" for _, v in sorted(cpu.items())) or "—"


def _hits(r: dict) -> str:
    h = r.get("hit_ratio") or {}
    return " / ".join(f"{k} {v:.2f}" for k, v in h.items()) or "—"


# What "IOPS" counts in each workload's row.
UNITS = {
    "seqread": "1 MiB reads/s",
    "hotscan": "hot-set 4 KiB reads/s",
    "sqlite": "queries/s",
    "postmark": "transactions/s",
}
TITLES = {
    "local": "the two local tiers, without lenders, vs the kernel page cache alone "
    "(same client memory): memlend's own cache (`local`) and the page cache as memlend's "
    "first tier (`kernel`)",
    "lenders": "memlend with lenders vs memlend local vs the kernel page cache",
}


def _comparison(
    rows: list[dict],
    workloads: list[str],
    disk: str,
    kind: str,
    configs: tuple[str, ...],
    ratios: tuple[tuple[str, str], ...],
) -> list[str]:
    """One of the report's two tables: throughput per config, then speed-up ratios."""
    if not any(_cell(rows, c, w, disk) for c in configs[1:] for w in workloads):
        return []
    out = [f"### {TITLES[kind]}", ""]
    out.append(
        "| workload | unit | "
        + " | ".join(configs)
        + " | "
        + " | ".join(f"{a}/{b}" for a, b in ratios)
        + " |"
    )
    out.append("|---" * (2 + len(configs) + len(ratios)) + "|")
    for w in workloads:
        cells = {c: _cell(rows, c, w, disk) for c in configs}
        vals = [
            "—" if r is None else "error" if r.get("error") else _fmt(r.get("iops"))
            for r in cells.values()
        ]
        rs = [_ratio(cells.get(a), cells.get(b)) for a, b in ratios]
        out.append(f"| {w} | {UNITS.get(w, '4 KiB reads/s')} | " + " | ".join(vals + rs) + " |")
    out.append("")
    return out


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    configs = [c for c in ORDER if any(r["config"] == c for r in rows)]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    disks = list(dict.fromkeys(r["disk"] for r in rows))
    out = ["# memlend bench report", ""]
    out.append(
        f"Command: `{meta.get('command', 'memlend bench')}`, "
        f"{meta.get('started')} to {meta.get('finished')}."
    )
    out.append(
        f"Client memory {meta['client_memory'] // MiB} MiB "
        f"(memlend cache {meta['cache_size'] // MiB} MiB inside it), "
        f"data set {meta['dataset'] // MiB} MiB, {meta['seconds_per_cell']} s per cell, "
        f"backing disk {meta.get('backing_disk')}, lenders reached over {meta.get('network')}."
    )
    out.append(
        f"Pinning: client (workload and mount daemon) {meta['pinning']['client']}, "
        f"lenders {meta['pinning']['lenders']}. Kernel {meta['machine']['kernel']}, "
        f"{meta['machine']['cpus']} CPUs."
    )
    out.append(
        "Disk profiles: "
        + ", ".join(
            f"{d} {v['read_iops'] or '∞'} IOPS / {_mbps(v['read_bps'])} MB/s"
            for d, v in meta["disks"].items()
        )
    )
    out.append("")
    for disk in disks:
        out += [f"## Disk profile: {disk}", ""]
        local = tuple(c for c in ("pagecache", "local", "kernel", "cfuse") if c in configs)
        out += _comparison(
            rows, workloads, disk, "local", local, tuple((c, "pagecache") for c in local[1:])
        )
        remote = [c for c in ("lender", "kernel-lender", "lenders", "memcached") if c in configs]
        shown = [c for c in configs if c in ("pagecache", "local", "kernel", *remote, "ideal")]
        ratios = [(c, "pagecache") for c in remote]
        out += _comparison(rows, workloads, disk, "lenders", tuple(shown), tuple(ratios))
        out.append(
            "| workload | config | IOPS | MB/s | p50 µs | p99 µs | disk I/Os | hit ratios "
            "| steal CPU0/1 | verified |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for w in workloads:
            for c in configs:
                r = _cell(rows, c, w, disk)
                if r is None:
                    continue
                if r.get("error"):
                    out.append(
                        f"| {w} | {c} | error: {r['error'][:120]} | | | | | | | "
                        f"{r.get('verified')} |"
                    )
                    continue
                out.append(
                    f"| {w} | {c} | {_fmt(r['iops'])} | {_fmt(r['mbps'])} | {_fmt(r['p50_us'])} | "
                    f"{_fmt(r['p99_us'])} | {r['disk_ios']} | {_hits(r)} | {_steal(r)} | "
                    f"{r['verified']} |"
                )
        out.append("")
    spikes = [r for r in rows if r.get("spike")]
    if spikes:
        out += ["## Lender memory spike", ""]
        out.append(
            "| config | disk | IOPS | remote hit | lender alive at end "
            "| OOM kills in lender group | spike holds its memory |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in spikes:
            sp = r["spike"]
            out.append(
                f"| {r['config']} | {r['disk']} | {_fmt(r['iops'])} | "
                f"{r['hit_ratio'].get('remote', 0):.2f} | {sp.get('lender_alive_at_end')} | "
                f"{sp.get('oom_kills', '?')} | {sp.get('spike_alive_at_end')} |"
            )
        out.append("")
    for config, workload, target in GOALS:
        out += _goal(rows, config, workload, target)
    out += [f"![IOPS, {d}](testbed-iops-{d}.png)" for d in disks]
    return "\n".join(out) + "\n"


# (config, workload or None for every workload run, at least this many times the page
# cache), on the cloud profile: the goals of the kernel tier (the default mode).
GOALS = (
    ("kernel-lender", "randread-uniform-qd1", 10.0),
    ("kernel-lender", "seqread", 5.0),
    ("kernel-lender", None, 1.0),
    ("kernel", None, 0.9),
)


def _goal(rows: list[dict], config: str, workload: str | None, target: float) -> list[str]:
    """One goal's line: `config` at least `target` x the page cache on `workload`, or
    on every workload the run measured both on (then the worst one decides)."""
    which = workload or "every workload"
    out = [f"## Goal: {config} ≥ {target:g}x the page cache, {which}, cloud profile", ""]
    ws = [workload] if workload else list(dict.fromkeys(r["workload"] for r in rows))
    ratios = []
    for w in ws:
        goal, base = _cell(rows, config, w, "cloud"), _cell(rows, "pagecache", w, "cloud")
        if goal and base and goal.get("iops") and base.get("iops") and not goal.get("error"):
            ratios.append((goal["iops"] / base["iops"], w, goal["iops"], base["iops"]))
    if not ratios:
        out.append(f"Not measured in this run (needs {config} and pagecache on {which}).")
        return [*out, ""]
    ratio, w, got, base_iops = min(ratios)
    met = "met" if ratio >= target else "not met"
    out.append(
        f"Measured{' (worst workload)' if workload is None else ''}: {w}: {config} "
        f"{got:,.0f} vs pagecache {base_iops:,.0f} ({UNITS.get(w, '4 KiB reads/s')}): "
        f"**{ratio:.2f}x — goal {met}**."
    )
    return [*out, ""]


def plots(result: dict, out: Path) -> list[Path]:
    plt = plotting.pyplot()

    rows = result["rows"]
    configs = [c for c in ORDER if any(r["config"] == c for r in rows)]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    files = []
    for disk in dict.fromkeys(r["disk"] for r in rows):
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(workloads)), 4))
        width = 0.8 / max(1, len(configs))
        for i, c in enumerate(configs):
            ys = []
            for w in workloads:
                r = _cell(rows, c, w, disk)
                ys.append(r["iops"] if r and r.get("iops") and not r.get("error") else 0)
            ax.bar([j + i * width for j in range(len(workloads))], ys, width, label=c)
        ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(workloads))])
        ax.set_xticklabels(workloads, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("IOPS (log)")
        m = result["meta"]
        ax.set_title(
            f"disk {disk}: client {m['client_memory'] // MiB} MiB, "
            f"data set {m['dataset'] // MiB} MiB"
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        f = out / f"testbed-iops-{disk}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f)
    return files


def write_report(result: dict, out: Path) -> None:
    (out / "report.md").write_text(markdown(result))
    if plotting.available():
        plots(result, out)
    else:
        print(f"no plots: {plotting.HINT}", file=sys.stderr)


if __name__ == "__main__":
    d = Path(sys.argv[1])
    write_report(json.loads((d / "results.json").read_text()), d)
