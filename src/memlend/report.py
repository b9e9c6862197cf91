"""Human-readable tables of a mount's counters (rich)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table


def _policy(stats: dict) -> str:
    active = stats.get("active_policy")
    if active and active != stats["policy"]:
        return f"{stats['policy']} (now {active})"
    return str(stats["policy"])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def stats_table(stats: dict, console: Console | None = None) -> None:
    """Print a mount's counters as a two-column table."""
    console = console or Console()
    hits, misses = stats["local_hits"], stats["local_misses"]
    ratio = hits / (hits + misses) if hits + misses else 0.0
    t = Table(title=f"memlend {stats['mountpoint']} (pid {stats['pid']})", show_header=False)
    t.add_column("counter", style="bold")
    t.add_column("value", justify="right")
    if stats.get("local_tier") == "kernel":
        # Page-cache hits never reach the daemon: only the misses can be counted.
        wb = ", writeback cache" if stats.get("writeback_cache") else ""
        wb += ", written files in passthrough" if stats.get("passthrough") else ""
        local = [
            ("local tier", f"kernel page cache{wb}"),
            ("block size", human_bytes(stats["block_size"])),
            ("page-cache misses (blocks)", f"{misses}"),
        ]
    else:
        local = [
            ("local tier", "memlend"),
            ("policy", _policy(stats)),
            ("cache size", human_bytes(stats["cache_size"])),
            ("block size", human_bytes(stats["block_size"])),
            ("resident blocks", f"{stats['resident_blocks']} of {stats['slots']}"),
            ("local hits", f"{hits}"),
            ("local misses", f"{misses}"),
            ("hit ratio", f"{ratio:.1%}"),
        ]
    rows = [
        ("backing", stats["backing"]),
        *local,
        ("disk reads", f"{stats['disk_reads']}"),
        ("bytes read from disk", human_bytes(stats["disk_read_bytes"])),
        *(
            []
            if stats.get("local_tier") == "kernel"
            else [
                ("evictions", f"{stats['evictions']}"),
                ("blocks invalidated", f"{stats['invalidated_blocks']}"),
            ]
        ),
        ("writes", f"{stats['writes']} ({human_bytes(stats['write_bytes'])})"),
        *(
            [("opens in passthrough", f"{stats.get('passthrough_opens', 0)}")]
            if stats.get("passthrough")
            else []
        ),
        *(
            [("written blocks lent at close", f"{stats.get('written_lent_blocks', 0)}")]
            if stats.get("passthrough") and "lenders" in stats
            else []
        ),
        ("remote hits / misses", f"{stats['remote_hits']} / {stats['remote_misses']}"),
        ("O_DIRECT backing reads", "yes" if stats["direct_io"] else "no"),
        ("shared mmap allowed", "yes" if stats["mmap_allowed"] else "no"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    if "lenders" in stats:
        lat = stats.get("remote_latency_us", {})
        t.add_row("remote hot path", str(stats.get("hot_path", "?")))
        if stats.get("read_path"):
            t.add_row("lent-block reads", str(stats["read_path"]))
        t.add_row("remote latency p50 / p99", f"{lat.get('p50', 0)} / {lat.get('p99', 0)} us")
        t.add_row("blocks lent / dropped", f"{stats.get('remote_put_blocks', 0)} / "
                  f"{stats.get('remote_dropped_puts', 0)}")  # fmt: skip
        t.add_row("remote errors / seal failures", f"{stats.get('remote_errors', 0)} / "
                  f"{stats.get('seal_failures', 0)}")  # fmt: skip
        for ld in stats["lenders"]:
            t.add_row(f"lender {ld['url']}", f"{ld['state']}, {ld['blocks_held']} blocks")
    console.print(t)
    console.print(curve_line(stats), highlight=False)
    if stats.get("remote_curve"):
        console.print(remote_curve_line(stats["remote_curve"]), highlight=False)


def curve_line(stats: dict) -> str:
    """Sizing advice from the live miss-ratio curve (memlend.mrc), as one sentence."""
    curve = stats.get("curve")
    if curve is None:
        return "no miss-ratio curve: the kernel page cache's hits never reach memlend"
    if not curve["sampled"]:
        return "miss-ratio curve: no read sampled yet"
    at = {p["multiplier"]: p for p in curve["points"]}
    bigger = [
        f"{p['hit_ratio']:.0%} with {m:g}x"
        + (" the cache" if i == 0 else "")
        + f" ({human_bytes(p['cache_bytes'])})"
        for i, (m, p) in enumerate((m, p) for m, p in at.items() if m > 1)
    ]
    line = f"local hit ratio {curve['hit_ratio_now']:.0%} now; " + ", ".join(bigger)
    if 0.5 in at:
        line += f"; {at[0.5]['hit_ratio']:.0%} with half ({human_bytes(at[0.5]['cache_bytes'])})"
    if 1 in at:
        line += f"; {at[1]['hit_ratio']:.0%} simulated at this size"
    return line + f" ({curve['policy']}, {curve['sampled']} sampled lookups)"


def remote_curve_line(curve: dict) -> str:
    """Sizing advice from the remote tier's curve (memlend.stackcurve.RemoteCurve)."""
    if not curve["sampled"]:
        return "remote tier curve: no block asked of the lenders sampled yet"
    now, *more = curve["points"]
    line = f"remote tier: {now['hit_ratio']:.0%} of asked blocks served now" + "".join(
        f", {p['hit_ratio']:.0%} with +{human_bytes(p['extra_bytes'])} lent" for p in more
    )
    return line + (
        f" (LRU estimate at the {now['blocks']} blocks lenders would hold now; they served "
        f"{curve['hit_ratio_actual']:.0%}; {curve['sampled']} sampled gets)"
    )


def lender_advice_lines(stats: dict) -> list[str]:
    """One line per client of a lender: what the last GiB of its share buys."""
    return [
        f"client {cid}: {a['last_gib_hits']} of its {a['hits']} recent hits "
        f"({a['last_gib_share']:.0%}) came from the last {human_bytes(a['gib_bytes'])} "
        f"of its share ({a['share_blocks']} blocks; it holds {a['held_blocks']})"
        for cid, a in sorted(stats.get("client_advice", {}).items())
    ]


def dict_table(title: str, stats: dict, console: Console | None = None) -> None:
    """Any flat dict of counters as a two-column table (nested values as JSON)."""
    console = console or Console()
    t = Table(title=title, show_header=False)
    t.add_column("counter", style="bold")
    t.add_column("value", justify="right")
    for k, v in stats.items():
        t.add_row(k.replace("_", " "), json.dumps(v) if isinstance(v, dict | list) else str(v))
    console.print(t)
