"""The counter registry loses no count under concurrent writers, and MountStats
exposes its totals."""

from __future__ import annotations

import sys
import threading

from memlend.counters import Counters
from memlend.stats import COUNTERS, MountStats

THREADS, ADDS = 16, 10_000


def _hammer(add) -> None:
    # A tiny switch interval makes the GIL change hands between the read and the write
    # of a non-atomic `+=`, which is how counts were lost before.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    start = threading.Barrier(THREADS)

    def work() -> None:
        start.wait()
        for _ in range(ADDS):
            add()

    try:
        ts = [threading.Thread(target=work) for _ in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)


def test_no_count_lost_with_16_threads() -> None:
    c = Counters()
    seen: list[float] = []
    stop = threading.Event()

    def reader() -> None:  # snapshots while writers add: never fail, never go back
        while not stop.is_set():
            seen.append(c.snapshot().get("n", 0))

    r = threading.Thread(target=reader)
    r.start()
    _hammer(lambda: (c.add("n"), c.add(("bytes", "x"), 3)))
    stop.set()
    r.join()
    assert c.get("n") == THREADS * ADDS
    assert c.snapshot() == {"n": THREADS * ADDS, ("bytes", "x"): 3 * THREADS * ADDS}
    assert seen == sorted(seen)


def test_counts_of_finished_threads_stay() -> None:
    c = Counters()
    t = threading.Thread(target=lambda: c.add("x", 5))
    t.start()
    t.join()
    c.add("x")
    assert c.get("x") == 6


def test_mount_stats_counters_in_as_dict() -> None:
    st = MountStats(block_size=4096)
    _hammer(lambda: st.add("local_hits"))
    st.add("disk_read_bytes", 4096)
    d = st.as_dict()
    assert d["local_hits"] == st.local_hits == THREADS * ADDS
    assert d["disk_read_bytes"] == 4096
    assert all(d[name] == 0 for name in COUNTERS if name not in ("local_hits", "disk_read_bytes"))
    assert "counters" not in d and d["block_size"] == 4096
