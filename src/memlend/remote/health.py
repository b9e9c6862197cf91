"""The health of one lender, as the remote tier sees it: active, suspended or down.

* **active**: asked for blocks and sent blocks.
* **suspended**: it answers, but too slowly to beat the disk: the moving average of
  the prober's ping round trips is above `suspend_avg` (2.5 ms), one round trip took
  more than `suspend_single` (40 ms), or `timeouts_to_suspend` reads in a row ran
  past their deadline. The thresholds are the reference system's (Puma, SYSTOR 2015),
  which also judged its average on a latency probe rather than on reads.
* **down**: a call failed: connection refused or reset, a protocol error, the
  handshake refused (wrong secret).

Only an active lender is used; a background prober (memlend.remote.tier) reconnects
to the others, pings them and calls `reactivate()` when they answer fast again.
Every change away from active bumps `generation`, so connections opened before it
are closed when their users give them back instead of going back to the pool.

All methods are thread-safe and do no I/O; the lock is held for a few operations,
and `ok()`, called on every remote hit, takes it only when something changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ACTIVE = "active"
SUSPENDED = "suspended"
DOWN = "down"


class LenderHealth:
    def __init__(
        self,
        *,
        suspend_avg: float = 0.0025,
        suspend_single: float = 0.040,
        timeouts_to_suspend: int = 3,
        min_samples: int = 5,
        alpha: float = 0.2,
    ) -> None:
        self.suspend_avg = suspend_avg
        self.suspend_single = suspend_single
        self.timeouts_to_suspend = timeouts_to_suspend
        self.min_samples = min_samples
        self.alpha = alpha
        self.state = DOWN  # until the first probe connects
        self.generation = 0
        self.avg = 0.0  # seconds, moving average of read round trips while active
        self.samples = 0
        self.probe_avg = 0.0  # seconds, moving average of the prober's pings
        self.probes = 0
        self.errors = 0
        self.timeouts = 0
        self.suspensions = 0
        self.last_error = ""
        self.since = time.monotonic()
        self._timeouts_in_row = 0
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None  # told when the state changes

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def _leave(self, state: str, why: str) -> None:
        if self.state == ACTIVE:
            self.generation += 1
            if state == SUSPENDED:
                self.suspensions += 1
        self.state = state
        if self.on_change is not None:
            self.on_change()
        self.last_error = why
        self.since = time.monotonic()

    def ok(self, latency: float) -> None:
        """A call (a read) answered in `latency` seconds.

        Recorded in `avg` for display. Reads are not what the average threshold is
        judged on: their time includes this process's own waits (GIL, scheduling of
        many FUSE workers), which would suspend a healthy lender under load; the
        prober's pings are (`probed`). A single call above `suspend_single` still
        suspends (only possible with a deadline that long)."""
        # Every remote hit comes here: no lock unless there is something to change.
        # avg and samples are for display, where a lost update does no harm; the
        # timeouts in a row are not (timeout() counts them under the lock).
        if self._timeouts_in_row:
            with self._lock:
                self._timeouts_in_row = 0
        if self.state != ACTIVE:
            return
        self.samples += 1
        self.avg = latency if self.samples == 1 else self.avg + self.alpha * (latency - self.avg)
        if latency > self.suspend_single:
            with self._lock:
                if self.state == ACTIVE:
                    self._leave(SUSPENDED, f"one round trip took {latency * 1e3:.1f} ms")

    def probed(self, latencies: list[float]) -> None:
        """The prober's ping round trips to an active lender: the latency probe."""
        if not latencies:
            return
        with self._lock:
            if self.state != ACTIVE:
                return
            mean = sum(latencies) / len(latencies)
            self.probes += 1
            a = self.alpha
            self.probe_avg = (
                mean if self.probes == 1 else self.probe_avg + a * (mean - self.probe_avg)
            )
            if max(latencies) > self.suspend_single:
                self._leave(SUSPENDED, f"a probe took {max(latencies) * 1e3:.1f} ms")
            elif self.probe_avg > self.suspend_avg:
                self._leave(SUSPENDED, f"average probe round trip {self.probe_avg * 1e3:.2f} ms")

    def timeout(self, elapsed: float) -> None:
        """A call ran past its deadline (`elapsed` seconds, at least the deadline)."""
        with self._lock:
            self.timeouts += 1
            self._timeouts_in_row += 1
            if self.state == ACTIVE and self._timeouts_in_row >= self.timeouts_to_suspend:
                self._leave(SUSPENDED, f"{self._timeouts_in_row} calls in a row timed out")

    def fail(self, why: str) -> None:
        """A call failed: the lender is down until the prober reconnects."""
        with self._lock:
            self.errors += 1
            self._timeouts_in_row = 0
            self._leave(DOWN, why)

    def probe_failed(self, why: str, *, slow: bool = False) -> None:
        """The prober could not reach it (down) or found it still too slow (suspended)."""
        with self._lock:
            if not slow:
                self.errors += 1
            self._leave(SUSPENDED if slow else DOWN, why)

    def reactivate(self, avg: float) -> None:
        """The prober found it answering fast: use it again."""
        with self._lock:
            if self.state != ACTIVE:
                self.state = ACTIVE
                self.since = time.monotonic()
                if self.on_change is not None:
                    self.on_change()
            self.avg, self.samples, self._timeouts_in_row = avg, 1, 0
            self.probe_avg, self.probes = avg, 1

    def fast_enough(self, latencies: list[float]) -> bool:
        """Do these probe round trips justify (re)activating the lender?"""
        return (
            bool(latencies)
            and max(latencies) <= self.suspend_single
            and sum(latencies) / len(latencies) <= self.suspend_avg
        )
