"""The kernel tier's READ of one lent block, served in C (memlend._native read_next).

A remote hit through the mount spent about 18 of its 46 µs in the Python FUSE loop and
read path around the lender's round trip (docs/benchmarks.md). With this, a FUSE
worker waits for the next request in C; a READ of one block of a file whose blocks
were lent at its current version is asked of the lender, opened and answered there,
and Python only does the bookkeeping afterwards. Everything else, and every READ the
lender cannot answer, is served by the Python code as before, which is told what the
lender said so that it does not ask twice (docs/native.md, "The FUSE read path").

The C side knows a file by a slot: the low SLOT_BITS bits of each file handle of an
open file, whose file id, version and "lent at this version" the daemon writes
through (`sync`) whenever it changes them. Used when the C extension is built, the
local tier is the kernel's, and the one lender is a memlend lender in inclusive mode.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import TYPE_CHECKING

from memlend.fs.readpath import remote_key
from memlend.fuse.wire import Op
from memlend.remote.health import ACTIVE
from memlend.remote.sockio import RemoteError, RemoteTimeout
from memlend.remote.tier import POOL_IDLE

if TYPE_CHECKING:
    import mmap
    from types import ModuleType

    from memlend.fs.passthrough import FileState
    from memlend.remote.client import LenderClient
    from memlend.remote.tier import RemoteTier
    from memlend.stats import MountStats

_READ = int(Op.READ)


def why_not(lib: ModuleType | None, remote: RemoteTier | None, kernel_tier: bool) -> str:
    """Why the C read path cannot serve this mount ("" if it can)."""
    if lib is None:
        return "the C extension is off or not built"
    if not kernel_tier:
        return "memlend's own tier serves reads from its cache"
    if remote is None:
        return "no lender"
    if len(remote.lenders) != 1 or remote.lenders[0].kind != "memlend":
        return "only for one memlend lender (placement and memcached stay in Python)"
    if remote.mode != "inclusive":
        return "only in inclusive mode"
    return ""


class FastReads:
    """The daemon's half of the C read path: file slots and what C must know."""

    def __init__(
        self, lib: ModuleType, remote: RemoteTier, shift: int, epoch: bytes, stats: MountStats
    ) -> None:
        self.lib = lib
        self.stats = stats
        self.remote = remote
        self.epoch = epoch
        self.lender = remote.lenders[0]
        self.block_size = 1 << shift
        self.slot_mask = (1 << lib.SLOT_BITS) - 1
        self._free: list[int] = []
        self._next_slot = 1  # 0: no slot
        self._lock = threading.Lock()
        lib.read_setup(shift, epoch)
        sealer = remote.sealer
        sealer.on_rekey = lambda: lib.read_keys(*sealer.keys())
        sealer.on_rekey()
        self.lender.health.on_change = self._lender_changed
        self._lender_changed()

    def _lender_changed(self) -> None:
        h = self.lender.health
        self.lib.read_lender(h.generation if h.state == ACTIVE else -1)

    # ---- file slots ---------------------------------------------------------

    def attach(self, state: FileState) -> int:
        """A handle of `state` opens: its slot (0 if none is free), counted."""
        with self._lock:
            if not state.slot:
                if self._free:
                    state.slot = self._free.pop()
                elif self._next_slot <= self.slot_mask:
                    state.slot = self._next_slot
                    self._next_slot += 1
                else:
                    return 0
            state.slot_handles += 1
        self.sync(state)
        return state.slot

    def detach(self, state: FileState) -> None:
        """A handle of `state` closed: its slot goes with the last one."""
        with self._lock:
            state.slot_handles -= 1
            if state.slot_handles or not state.slot:
                return
            slot, state.slot = state.slot, 0
            self.lib.read_slot(slot, 0, 0, False)
            self._free.append(slot)

    def sync(self, state: FileState) -> None:
        """Tell C what `state` is now (after a change of its id, version or lending)."""
        if state.slot:
            lent = state.lent_version == state.version
            self.lib.read_slot(state.slot, state.file_id, state.version, lent)

    def worker(self) -> FastWorker:
        return FastWorker(self)


class FastWorker:
    """One FUSE worker's use of read_next: its own lender connection and buffers.

    A worker takes a connection once it has served a READ (idle workers hold none:
    they would count against the lender's connection limit) and lets it go after
    POOL_IDLE without use, as the tier's pool does (the lender closes idle ones)."""

    def __init__(self, fast: FastReads) -> None:
        self.fast = fast
        self.asked = False  # the request in the buffer is a READ the lender said no to
        self._conn: LenderClient | None = None
        self._gen = -1
        self._wanted = False  # a READ came to this worker: take a connection
        self._stale_at = 0.0
        self._scratch = bytearray(2 * fast.block_size + 4096)

    def _connection(self) -> tuple[int, int, float]:
        """(socket, request id, spin) of this worker's connection; socket -1 if none."""
        ld = self.fast.lender
        c = self._conn
        if c is not None and (c.closed or self._gen != ld.health.generation):
            c.close()
            c = self._conn = None
        if c is None:
            if not self._wanted or ld.health.state != ACTIVE:
                return -1, 0, 0.0
            self._wanted = False
            try:
                c, self._gen = ld.acquire(self.fast.remote.deadline)
            except Exception:  # the prober finds out; Python serves meanwhile
                return -1, 0, 0.0
            self._conn = c  # type: ignore[assignment]
            self._stale_at = time.monotonic() + POOL_IDLE
        return c.call_outside()  # type: ignore[union-attr]

    def next(self, fd: int, buf: mmap.mmap) -> int:
        """Wait for the next request: 0 once it was served here (a lent block), -1 when
        unmounted, else its size: it is in `buf` for the Python loop, and `asked` says
        whether it is a READ the lender had no valid copy for."""
        fast = self.fast
        lib = fast.lib
        conn, rid, spin = self._connection()
        n, outcome, seconds, caught, late, status, file_id, version, block = lib.read_next(
            fd, buf, self._scratch, conn, self._gen, rid, spin, fast.remote.deadline,
            self._stale_at,
        )  # fmt: skip
        self.asked = outcome != lib.READ_PYTHON
        if not self.asked:
            if n > 0 and buf[4] == _READ and not buf[5]:  # a READ C could not take
                if self._conn is None:
                    self._wanted = True
                elif time.monotonic() > self._stale_at:
                    self._conn.close()  # idle too long: the lender may have closed it
            return n
        remote, c = fast.remote, self._conn
        assert c is not None
        error = None
        if outcome == lib.READ_FAULT:
            c.close()
            error = _fault(lib, status, c.address)
        else:
            c.answered_outside(caught, spin)
            self._stale_at = time.monotonic() + POOL_IDLE
        if late:
            remote.counters.add("remote_client_delays")
        if outcome == lib.READ_HIT:  # a page-cache miss, as the Python path counts it
            fast.stats.add("local_misses")
            remote.counters.add("native_read_hits")
        key = remote_key(fast.epoch, file_id, version, block)
        remote.fast_got(fast.lender, key, outcome == lib.READ_HIT, outcome == lib.READ_BAD_SEAL,
                        seconds, error)  # fmt: skip
        return n


def _fault(lib: ModuleType, status: int, address: tuple[str, int]) -> RemoteError:
    """The error a failed C call stands for (status: an errno or -TIMED_OUT, ...)."""
    where = f"lender {address[0]}:{address[1]}"
    if status == -lib.TIMED_OUT:
        return RemoteTimeout(f"{where} timed out")
    if status == -lib.CLOSED:
        return RemoteError(f"{where} closed the connection")
    if status == -lib.NOT_FAST:
        return RemoteError(f"{where} sent a reply that is not the answer to this request")
    return RemoteError(f"lender connection failed: {errno.errorcode.get(status, status)}")
