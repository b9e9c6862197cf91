"""Prometheus metrics of a mount, made at scrape time from the dict that
`memlend stats --json` prints (one source for both: they cannot disagree)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from memlend.remote.health import ACTIVE, DOWN, SUSPENDED

LENDER_STATES = (ACTIVE, SUSPENDED, DOWN)

# (metric name without _total, stats key, help)
_COUNTERS = (
    ("memlend_disk_reads", "disk_reads", "Reads of the backing store"),
    ("memlend_disk_read_bytes", "disk_read_bytes", "Bytes read from the backing store"),
    ("memlend_evictions", "evictions", "Blocks evicted from memlend's own cache"),
    ("memlend_invalidated_blocks", "invalidated_blocks", "Cached blocks dropped as stale"),
    ("memlend_writes", "writes", "WRITE requests"),
    ("memlend_write_bytes", "write_bytes", "Bytes written"),
    (
        "memlend_passthrough_opens",
        "passthrough_opens",
        "Opens the kernel serves itself from the backing file (FUSE passthrough)",
    ),
    (
        "memlend_written_lent_blocks",
        "written_lent_blocks",
        "Blocks the kernel wrote in passthrough, lent after the file's last writer closed",
    ),
    ("memlend_remote_queue_hits", "remote_queue_hits", "Reads answered from the put queue"),
    ("memlend_remote_puts_skipped", "remote_put_skipped", "Puts skipped: the lender has it"),
    ("memlend_remote_errors", "remote_errors", "Failed lender calls (read as misses)"),
    ("memlend_remote_timeouts", "remote_timeouts", "Lender calls past their deadline"),
    (
        "memlend_remote_client_delays",
        "remote_client_delays",
        "Lender calls whose wait ended over 1 ms past its deadline: this client's thread "
        "was not running (its CPU is saturated)",
    ),
    (
        "memlend_native_read_hits",
        "native_read_hits",
        "Lender hits the C read path served without Python (kernel tier)",
    ),
    ("memlend_remote_seal_failures", "seal_failures", "Blocks from lenders that failed AES-GCM"),
    ("memlend_remote_deletes", "remote_deletes", "Blocks deleted from lenders"),
    ("memlend_remote_dropped_deletes", "remote_dropped_deletes", "Deletes dropped: queue full"),
)


class MountCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        info = InfoMetricFamily("memlend_mount", "The mount's settings")
        info.add_metric(
            [],
            {
                k: str(s[k])
                for k in ("backing", "mountpoint", "local_tier", "policy", "block_size", "hot_path")
            },
        )
        yield info

        hits = CounterMetricFamily("memlend_hits", "Blocks found, per tier", labels=["tier"])
        misses = CounterMetricFamily(
            "memlend_misses", "Blocks not found, per tier", labels=["tier"]
        )
        hits.add_metric(["local"], s["local_hits"])
        misses.add_metric(["local"], s["local_misses"])
        hits.add_metric(["remote"], s["remote_hits"])
        misses.add_metric(["remote"], s["remote_misses"])
        yield hits
        yield misses
        for name, key, text in _COUNTERS:
            if key in s:
                yield CounterMetricFamily(name, text, value=s[key])

        yield GaugeMetricFamily(
            "memlend_cache_capacity_bytes",
            "memlend's own cache: its cap",
            value=s["slots"] * s["block_size"],
        )
        yield GaugeMetricFamily(
            "memlend_cache_used_bytes",
            "memlend's own cache: bytes held",
            value=s["resident_blocks"] * s["block_size"],
        )
        yield GaugeMetricFamily("memlend_inodes", "Inodes the kernel knows", value=s["inodes"])
        yield GaugeMetricFamily(
            "memlend_inode_fds", "Open O_PATH fds of inodes", value=s["inode_fds"]
        )
        yield GaugeMetricFamily(
            "memlend_lent_files_forgotten",
            "Files the kernel forgot whose identity is kept: their lent blocks stay reachable",
            value=s["lent_files_forgotten"],
        )
        if s.get("curve"):
            curve = GaugeMetricFamily(
                "memlend_curve_hit_ratio",
                "Estimated hit ratio of memlend's cache at other sizes (live miss-ratio curve)",
                labels=["cache_bytes"],
            )
            for p in s["curve"]["points"]:
                curve.add_metric([str(p["cache_bytes"])], p["hit_ratio"])
            yield curve
        if s.get("remote_curve"):
            rc = GaugeMetricFamily(
                "memlend_remote_curve_hit_ratio",
                "Estimated share of the blocks asked of the lenders that they would serve "
                "with extra_bytes more lent than they hold for this mount now (sampled LRU)",
                labels=["extra_bytes"],
            )
            for p in s["remote_curve"]["points"]:
                rc.add_metric([str(p["extra_bytes"])], p["hit_ratio"])
            yield rc
        if "lenders" in s:
            yield from _remote(s)


def _remote(s: dict) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "memlend_remote_queued_bytes",
        "Evicted blocks waiting to be sent",
        value=s["remote_queued_bytes"],
    )
    yield GaugeMetricFamily(
        "memlend_remote_queue_capacity_bytes",
        "The put queue's cap",
        value=s["remote_queue_capacity_bytes"],
    )
    yield GaugeMetricFamily(
        "memlend_remote_deadline_seconds",
        "How long a read waits for a lender now",
        value=s["remote_deadline_us"] / 1e6,
    )
    yield GaugeMetricFamily(
        "memlend_remote_min_deadline_seconds",
        "The configured deadline",
        value=s["remote_min_deadline_us"] / 1e6,
    )
    h = s["remote_latency_histogram"]
    buckets = [(repr(le), n) for le, n in zip(h["le"], h["cumulative"], strict=False)]
    buckets.append(("+Inf", h["cumulative"][-1]))
    yield HistogramMetricFamily(
        "memlend_remote_latency_seconds",
        "Round trips to lenders that answered (reads)",
        buckets=buckets,
        sum_value=h["sum_seconds"],
    )

    lab = ["lender"]
    fams = {
        "hits": CounterMetricFamily("memlend_lender_hits", "Blocks a lender returned", labels=lab),
        "misses": CounterMetricFamily(
            "memlend_lender_misses", "Blocks asked, not returned", labels=lab
        ),
        "put_blocks": CounterMetricFamily(
            "memlend_lender_puts", "Blocks sent and stored", labels=lab
        ),
        "dropped_puts": CounterMetricFamily(
            "memlend_lender_dropped_puts",
            "Blocks not lent: lender down, refused, or failed",
            labels=lab,
        ),
        "blocks_held": GaugeMetricFamily(
            "memlend_lender_blocks_held", "Blocks the lender holds for this mount", labels=lab
        ),
        "suspensions": CounterMetricFamily(
            "memlend_lender_suspensions", "Times a lender was suspended as too slow", labels=lab
        ),
    }
    state = GaugeMetricFamily(
        "memlend_lender_state", "1 for the lender's current state", labels=["lender", "state"]
    )
    for ld in s["lenders"]:
        for key, fam in fams.items():
            fam.add_metric([ld["url"]], ld[key])
        for st in LENDER_STATES:
            state.add_metric([ld["url"], st], 1.0 if ld["state"] == st else 0.0)
    yield from fams.values()
    yield state
    dropped = CounterMetricFamily(
        "memlend_remote_dropped_puts",
        "Evicted blocks not lent (queue full or lender failed)",
        value=s["remote_dropped_puts"],
    )
    yield dropped
    yield CounterMetricFamily(
        "memlend_remote_puts", "Blocks lent (stored by a lender)", value=s["remote_put_blocks"]
    )
