"""Prometheus metrics of a lender, made at scrape time from LenderServer.stats() (what
`memlend stats --lender --json` returns) and the store's blocks per client. The
lender's event loop is the only writer; these reads are of ints and of atomic copies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_GAUGES = (
    ("memlend_lend_memory_cap_bytes", "memory_cap", "Memory lent at most (--memory)"),
    ("memlend_lend_allowed_bytes", "allowed_bytes", "Memory it may use now (host pressure)"),
    ("memlend_lend_used_bytes", "bytes_used", "Memory holding blocks"),
    ("memlend_lend_blocks", "blocks", "Blocks held, all clients"),
    ("memlend_lend_clients", "clients", "Authenticated connections"),
    ("memlend_lend_connections", "connections", "Open connections"),
    ("memlend_lend_reserve_bytes", "reserve", "Host memory kept available (--reserve)"),
    ("memlend_lend_host_available_bytes", "host_available", "Host memory available, last seen"),
)
_COUNTERS = (
    ("memlend_lend_hits", "hits", "Blocks asked for and returned"),
    ("memlend_lend_misses", "misses", "Blocks asked for and not held"),
    ("memlend_lend_puts", "puts", "Blocks stored"),
    ("memlend_lend_refused", "refused", "Blocks refused (no room or memory pressure)"),
    ("memlend_lend_evictions", "evictions", "Blocks evicted to make room"),
    ("memlend_lend_given_back_bytes", "given_back_bytes", "Memory given back to the host"),
    ("memlend_lend_auth_failures", "auth_failures", "Failed authentications"),
    ("memlend_lend_protocol_errors", "protocol_errors", "Malformed requests"),
    ("memlend_lend_get_keys", "get_keys", "Keys asked for by GETs"),
    ("memlend_lend_cpu_seconds", "cpu_seconds", "CPU time of the lender (idle polling included)"),
)


# The lender's monotonic counters by their stats key (`memlend stats --watch` rates them).
COUNTER_KEYS = frozenset(key for _, key, _ in _COUNTERS)


class LenderCollector(Collector):
    def __init__(self, stats: Callable[[], dict], per_client: Callable[[], dict[str, int]]):
        self._stats = stats
        self._per_client = per_client

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, key, text in _GAUGES:
            if s.get(key) is not None:
                yield GaugeMetricFamily(name, text, value=s[key])
        for name, key, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=s[key])
        per = GaugeMetricFamily(
            "memlend_lend_client_blocks",
            "Blocks held per client (a mount's namespace)",
            labels=["client"],
        )
        for client, n in sorted(self._per_client().items()):
            per.add_metric([client], n)
        yield per
        advice = s.get("client_advice") or {}
        last = GaugeMetricFamily(
            "memlend_lend_client_last_gib_hits",
            "Per client: its recent hits (estimated, decayed) that the last GiB of its "
            "share bought, from a sampled LRU stack",
            labels=["client"],
        )
        share = GaugeMetricFamily(
            "memlend_lend_client_last_gib_share",
            "Per client: the fraction of its recent hits that the last GiB of its share bought",
            labels=["client"],
        )
        for client, a in sorted(advice.items()):
            last.add_metric([client], a["last_gib_hits"])
            share.add_metric([client], a["last_gib_share"])
        yield last
        yield share
