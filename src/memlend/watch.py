"""`memlend stats --watch`: the counters redrawn every interval, with rates (rich Live)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from memlend.metrics.lender_collector import COUNTER_KEYS as LENDER_COUNTERS
from memlend.report import human_bytes
from memlend.stats import COUNTERS, REMOTE_COUNTERS

# Monotonic counters, the ones a rate makes sense for (the rest are settings or gauges).
RATE_KEYS = frozenset(COUNTERS) | frozenset(REMOTE_COUNTERS) | LENDER_COUNTERS


HIDDEN = frozenset({"pid", "started"})  # numbers, but not counters worth a row


def _value(key: str, v: float) -> str:
    return human_bytes(v) if key.endswith(("bytes", "_size")) else str(v)


def watch_table(title: str, now: dict, before: dict | None, seconds: float) -> Table:
    """Every number in `now`, with its rate per second since `before` for counters."""
    t = Table(title=title)
    t.add_column("counter", style="bold")
    t.add_column("value", justify="right")
    t.add_column("per second", justify="right")
    for k, v in now.items():
        if k in HIDDEN or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        rate = ""
        if before is not None and k in RATE_KEYS and seconds > 0:
            r = (v - before.get(k, 0)) / seconds
            rate = f"{human_bytes(r)}/s" if k.endswith("bytes") else f"{r:.1f}"
        t.add_row(k.replace("_", " "), _value(k, v), rate)
    for ld in now.get("lenders", []):
        t.add_row(f"lender {ld['url']}", f"{ld['state']}, {ld['blocks_held']} blocks", "")
    return t


def watch(
    title: str,
    read: Callable[[], dict],
    interval: float = 1.0,
    count: int | None = None,
    console: Console | None = None,
) -> int:
    """Redraw until Ctrl-C (a normal way out: exit 0), or after `count` redraws."""
    before, t0 = None, time.monotonic()
    shown = 0
    # Installed explicitly: started as a background job of a script, this process
    # inherits SIGINT ignored, and Ctrl-C (or kill -INT) would never end the watch.
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    try:
        with Live(console=console or Console(), auto_refresh=False) as live:
            while True:
                now, t1 = read(), time.monotonic()
                live.update(watch_table(title, now, before, t1 - t0), refresh=True)
                before, t0 = now, t1
                shown += 1
                if count is not None and shown >= count:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return 0
