"""heap.py: the daemon's freed C heap goes back to the system (glibc here)."""

from __future__ import annotations

import time

from memlend import heap


def anonymous_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


def test_trim_gives_freed_memory_back() -> None:
    # 64 MiB in 16 KiB objects (the size of a lent block), every other one kept: the
    # freed half is scattered between live objects, as the put path leaves it.
    blocks = [bytes(16384) for _ in range(4096)]
    del blocks[::2]
    before = anonymous_kb()
    assert heap.trim()
    assert before - anonymous_kb() > 16 * 1024  # most of the freed 32 MiB is back


def test_the_trimmer_runs_until_stopped() -> None:
    t = heap.Trimmer(every=0.01).start()
    time.sleep(0.2)
    t.stop()
    n = t.trims
    assert n >= 5 and t.seconds < 0.2
    time.sleep(0.05)
    assert t.trims <= n + 1


def test_limit_arenas() -> None:
    assert heap.limit_arenas(8)  # glibc's own default for 1 CPU: changes nothing here
