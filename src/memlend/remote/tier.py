"""The remote tier as the mount sees it: `RemoteTier`.

    tier = RemoteTier(["memlend://10.0.0.2:7070", "memcached://10.0.0.3:11211"],
                      auth_secret, seal_secret)
    blocks = tier.get_many(keys)      # FUSE worker, on local misses: {key: plaintext}
    n = tier.get_one(key, place)      # one block opened into its place in the reply
    tier.put(key, data)               # local tier evicted a clean block (lock held)
    tier.snapshot()                   # counters for `memlend stats --json`
    tier.close()

Reads (`get_many`, any thread, concurrently). Keys are opaque bytes (the mount uses
epoch | file id | version | block number). Blocks still waiting in the put queue
are answered from it. The rest are grouped by lender (rendezvous hashing,
memlend.remote.placement); every active lender gets one multi-get, all sent before
any reply is awaited, so lenders answer in parallel without helper threads (a
cross-thread wake-up costs 80-110 µs here, more than a round trip). Replies are
awaited with busy-polling up to the deadline (2 ms, or the disk's recent read time
when that is longer: disk_read_took); whatever has not arrived by then is a miss,
and that connection is closed (a late reply must not be read as the answer to a
later request). A key whose lender is not active is a miss: the
block is not anywhere else. Each blob is opened (AES-256-GCM, the key as
associated data); one that fails is counted (`seal_failures`) and is a miss.
`get_many` never raises.

Connections: each lender has a small pool of connected clients; a caller takes one
(connecting if none is idle), uses it alone, and gives it back, so concurrent FUSE
workers never share a socket and no lock is held across network I/O.

Writes (`put`, called with the cache lock held): O(1), never blocks on I/O: the
block is copied into a bounded queue, or dropped and counted when the queue is
full. A background thread takes the queue every few milliseconds, groups it by
lender, seals the blocks and sends them in batches of `batch` per message. Puts to
a lender that is not active are dropped and counted.

Modes. Inclusive (default): a block read back stays on the lender; the tier
remembers (a bounded LRU set) which keys it read back, so when the local tier
evicts such a clean block again, `put` skips it (`remote_put_skipped`): the lender
still holds it (or dropped it, which is only a future miss). Exclusive: a block
read back is deleted from its lender, asynchronously, by the put thread.

Health (memlend.remote.health): a call that fails marks its lender down; a lender
whose round trips average above 2.5 ms, take one above 40 ms, or time out three
times in a row is suspended. A prober thread reconnects to and pings such lenders
every `probe_interval` and reactivates them when they answer fast; a lender just
suspended by timed-out reads is probed after 20 ms, then at doubling intervals
(a stall of a few ms used to cost half a second of disk reads). It also pings
active lenders and reads their STATS (blocks held).

Curve (memlend.stackcurve.RemoteCurve): every key put (queued for a lender) and
asked for is offered to a sampled LRU stack, for "X% of asked blocks served now, Y%
with +1 GiB lent". The sampling test is inlined here; the curve's lock is taken for
sampled keys only.

Invariant 2: no call of this class fails or hangs an application call; every
network wait has a deadline; every exception is caught, counted and turned into a
miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memlend.counters import Counters
from memlend.mrc import MASK, MIX
from memlend.native import lib as native
from memlend.remote import protocol as p
from memlend.remote.client import LenderClient, RemoteError, RemoteTimeout, parse_address
from memlend.remote.health import ACTIVE, DOWN, LenderHealth
from memlend.remote.memcached import MemcachedClient
from memlend.remote.placement import Rendezvous
from memlend.remote.sealing import SEALS_PER_KEY, RunSealer, SealError, client_id_for
from memlend.remote.secret import auth_key
from memlend.stackcurve import RemoteCurve
from memlend.stats import REMOTE_COUNTERS

if TYPE_CHECKING:
    from memlend.stats import MountStats

log = logging.getLogger("memlend.remote")
DROP_LOG_EVERY = 10.0  # seconds: at most one log line about dropped puts per this
ROOM_WAIT = 0.05  # seconds a reader waits at most for room in the put queue

MODES = ("inclusive", "exclusive")
# Upper bounds (seconds) of the lender round-trip histogram: a remote hit takes
# ~80-140 µs on a LAN; the deadline is 2 ms by default and at most 50 ms.
LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3)
# A pooled connection unused this long is closed rather than used: the lender may
# have closed it (--idle-timeout, 300 s by default), and a read must not find out.
POOL_IDLE = 60.0
# A lender suspended by timed-out reads is probed again after this long, then at
# doubling intervals up to probe_interval: a passing stall (a scheduling hiccup on
# either host) must not send every read to the disk for half a second.
REPROBE_FIRST = 0.02
MAX_DEADLINE = 0.05  # disk_read_took(): never wait longer than this for a lender
KEEP_REPLY_BUF = 128 * 1024  # a thread keeps its multi-get reply buffer up to this size


class _MemlendClient(LenderClient):
    """LenderClient plus a split multi-get (send now, collect later)."""

    def start_get(self, keys: Sequence[bytes]) -> list[tuple[int, int]]:
        per = max(1, min(self.max_keys, p.MAX_PAYLOAD // (self.max_value + 5 or 1)))
        sent: list[tuple[int, int]] = []
        try:
            for i in range(0, len(keys), per):
                batch = keys[i : i + per]
                rid = next(self._ids) & 0xFFFFFFFF
                self._send(self._conn.send_get(batch, rid))
                sent.append((rid, len(batch)))
        except OSError as e:
            self.close()
            raise RemoteError(f"lender connection failed: {e}") from e
        except (RemoteError, ValueError) as e:
            self.close()
            raise RemoteError(str(e)) from e
        return sent

    def finish_get(
        self, token: list[tuple[int, int]], deadline: float
    ) -> list[bytes | memoryview | None]:
        """The values of a start_get, in key order (None: not stored). Values may be
        views of this thread's reply buffer, valid until its next finish_get."""
        out: list[bytes | memoryview | None] = []
        try:
            if native is not None and len(token) == 1:
                return self._finish_native(*token[0], deadline)
            for rid, n in token:
                reply = self._expect(p.GetReply, deadline, rid)
                if len(reply.values) != n:
                    raise RemoteError("lender answered a different number of keys")
                out.extend(reply.values)
        except OSError as e:
            self.close()
            raise RemoteError(f"lender connection failed: {e}") from e
        except RemoteError:
            self.close()
            raise
        return out

    def _finish_native(self, rid: int, n: int, deadline: float) -> list:
        """finish_get of one request in C (memlend._native.recv_values): received
        without the GIL into this thread's buffer, values returned as views of it."""
        size = p.HEADER_SIZE + 2 + n * (5 + self.max_value)
        if size > KEEP_REPLY_BUF:
            # A stream's multi-get (up to 1 MiB): its buffer goes with its values. Kept
            # per thread, it held 1 MiB for each of 16 FUSE workers, charged to the VM.
            buf = memoryview(bytearray(size))
        else:
            buf = getattr(_thread_buf, "view", None)
            if buf is None or len(buf) < size:
                buf = _thread_buf.view = memoryview(bytearray(size))
        spin = self._native_spin()
        fd = self._require().fileno()
        status, got, caught, self.late = native.recv_values(fd, rid, n, buf, deadline, spin)
        if self._native_done(status, got, caught, spin):
            return got
        self._recv_events(got)  # anything else: the Python decoder judges, reads on
        reply = self._expect(p.GetReply, deadline, rid, spin=False)
        if len(reply.values) != n:
            raise RemoteError("lender answered a different number of keys")
        return reply.values


# Each FUSE worker's buffer for multi-get replies (_finish_native): at most one
# request's reply, ~1 MiB for a 1 MiB read of 16 KiB blocks, made on first use.
_thread_buf = threading.local()

Client = _MemlendClient | MemcachedClient


class _Lender:
    """One configured lender: address, health, connection pool, counters."""

    def __init__(self, url: str, tier: RemoteTier) -> None:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("memlend", "memcached"):
            raise ValueError(f"lender URL must be memlend:// or memcached://HOST:PORT, not {url}")
        self.url = url
        self.kind = scheme
        self.address = parse_address(rest.rstrip("/"))
        self.tier = tier
        self.health = LenderHealth(suspend_avg=tier.suspend_avg, suspend_single=tier.suspend_single)
        self._pool: list[tuple[Client, int, float]] = []  # client, generation, last use
        # The put thread's and the prober's own connections, with the health
        # generation they were opened in (a stale one is replaced, not used).
        self._own: dict[str, tuple[Client, int]] = {}
        self.lender_blocks: int | None = None
        self.lender_share: int | None = None  # blocks it would hold for us (memlend lenders)
        self.warned_size = False

    # Per-lender counters live in the tier's registry, labelled with the URL.
    def _counter(self, name: str) -> int:
        return int(self.tier.counters.get((name, self.url)))

    hits = property(lambda self: self._counter("lender_hits"))
    misses = property(lambda self: self._counter("lender_misses"))
    put_blocks = property(lambda self: self._counter("lender_put_blocks"))
    dropped_puts = property(lambda self: self._counter("lender_dropped_puts"))

    def connect(self, timeout: float) -> Client:
        t = self.tier
        if self.kind == "memcached":
            return MemcachedClient(
                self.address, t.client_id, timeout=timeout, busy_poll_us=t.busy_poll_us
            )
        assert t.auth_key is not None
        return _MemlendClient(
            self.address, t.auth_key, t.client_id, timeout=timeout, busy_poll_us=t.busy_poll_us
        )

    # The pool is a plain list: pop() and append() are atomic, so the hot path takes no
    # lock; a connection of an older health generation is closed instead of used.

    def acquire(self, timeout: float) -> tuple[Client, int]:
        """An idle connection of the current health generation, or a new one."""
        gen = self.health.generation
        pool = self._pool
        while pool:
            try:
                c, g, used = pool.pop()
            except IndexError:  # another worker took the last one
                break
            if g == gen and not c.closed and used > time.monotonic() - POOL_IDLE:
                return c, gen
            c.close()
        return self.connect(timeout), gen

    def release(self, c: Client, gen: int) -> None:
        pool = self._pool
        if gen == self.health.generation and not c.closed and len(pool) < self.tier.pool_size:
            pool.append((c, gen, time.monotonic()))
        else:
            c.close()

    def idle(self) -> int:
        return len(self._pool)

    def close_pool(self) -> None:
        pool, self._pool = self._pool, []
        while pool:
            try:
                c = pool.pop()[0]
            except IndexError:
                break
            c.close()

    def own(self, role: str, timeout: float) -> Client:
        """The connection of one background thread (`role`), reopened when stale.

        Only that thread calls this for its role."""
        gen = self.health.generation
        cur = self._own.get(role)
        if cur is not None:
            if not cur[0].closed and cur[1] == gen:
                cur[0].timeout = timeout
                return cur[0]
            cur[0].close()
            del self._own[role]
        c = self.connect(timeout)
        self._own[role] = (c, gen)
        return c

    def drop_own(self, role: str) -> None:
        cur = self._own.pop(role, None)
        if cur is not None:
            cur[0].close()

    def close(self) -> None:
        self.close_pool()
        for role in list(self._own):
            self.drop_own(role)


class RemoteTier:
    def __init__(
        self,
        urls: list[str],
        auth_secret: bytes | None,
        seal_secret: bytes,
        *,
        deadline: float = 0.002,
        queue_blocks: int = 4096,
        batch: int = 32,
        mode: str = "inclusive",
        stats: MountStats | None = None,
        queue_bytes: int | None = None,
        remember_blocks: int = 65536,
        probe_interval: float = 0.5,
        connect_timeout: float = 0.5,
        put_timeout: float = 1.0,
        linger: float = 0.002,
        suspend_avg: float = 0.0025,
        suspend_single: float = 0.040,
        busy_poll_us: int = 200,
        pool_size: int = 32,
        latency_window: int = 4096,
        client_name: str | None = None,
        epoch: bytes | None = None,
        seals_per_key: int = SEALS_PER_KEY,
    ) -> None:
        """`client_name`: this client's name in the lenders' clients files (its own key
        is `auth_secret`); None: the shared-secret mode, namespace from the seal secret.
        `epoch`: this mount run's, which the sealing keys are derived from."""
        if not urls:
            raise ValueError("the remote tier needs at least one lender URL")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if deadline <= 0 or queue_blocks < 1 or batch < 1:
            raise ValueError("deadline, queue_blocks and batch must be positive")
        self.min_deadline = self.deadline = deadline
        self._disk_ema = 0.0  # seconds: the backing store's recent one-block read time
        self.queue_blocks = queue_blocks
        self.queue_bytes = queue_bytes if queue_bytes is not None else 1 << 62
        self.batch = batch
        self.mode = mode
        self.remember_blocks = remember_blocks
        self.probe_interval = probe_interval
        self.connect_timeout = connect_timeout
        self.put_timeout = put_timeout
        self.linger = linger
        self.suspend_avg = suspend_avg
        self.suspend_single = suspend_single
        self.busy_poll_us = busy_poll_us
        self.pool_size = pool_size
        # A fresh sealing key per run (and per SEALS_PER_KEY seals): blocks lent by an
        # earlier run fail to open, which is a miss.
        self._sealer = RunSealer(seal_secret, epoch or os.urandom(8), seals_per_key)
        self.client_id = client_name.encode() if client_name else client_id_for(seal_secret)
        self.auth_key = auth_key(auth_secret) if auth_secret is not None else None
        self.lenders = [_Lender(u, self) for u in urls]
        if self.auth_key is None and any(ld.kind == "memlend" for ld in self.lenders):
            raise ValueError("memlend:// lenders need the auth secret")
        self._placement = Rendezvous([ld.url for ld in self.lenders])

        # Counters: the mount's registry (memlend.counters: per-thread, no lock), so
        # `memlend stats` and the metrics endpoint see one set of numbers.
        self.counters = stats.counters if stats is not None else Counters()
        self.counter_names = REMOTE_COUNTERS
        self._latencies: deque[float] = deque(maxlen=latency_window)

        # Put queue: plaintext blocks by key; the put thread swaps the dict out.
        self._qlock = threading.Lock()
        self._room = threading.Condition(self._qlock)  # notified when a batch is sent
        self._pending: dict[bytes, bytes] = {}
        self._inflight: dict[bytes, bytes] = {}
        self._pending_bytes = 0
        self._inflight_bytes = 0
        self._deletes: deque[bytes] = deque()
        # The most the queue has held (blocks, bytes), and puts refused because it was
        # full (remote_dropped_puts also counts those a down lender cost): the proof,
        # in `memlend stats --json`, that the queue reached its bound.
        self._queue_peak = [0, 0]
        self._queue_full_drops = 0
        self._known: OrderedDict[bytes, None] = OrderedDict()  # inclusive: on a lender
        self._wake = threading.Event()
        self._busy = False
        self._stop = threading.Event()
        self._reprobe = threading.Event()  # a lender just left active: probe it soon
        self._drops_logged = (0, time.monotonic())  # dropped puts at the last log line
        self.curve = RemoteCurve(exclusive=mode == "exclusive")

        self._probe_all(first=True)
        self._threads = [
            threading.Thread(target=self._put_loop, name="memlend-remote-put", daemon=True),
            threading.Thread(target=self._probe_loop, name="memlend-remote-probe", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ---- counters ---------------------------------------------------------------------

    def _count(self, **kw: int) -> None:
        add = self.counters.add
        for k, v in kw.items():
            add(k, v)

    def _observe(self, seconds: float) -> None:
        """One lender round trip, for the latency percentiles and the histogram."""
        self._latencies.append(seconds)
        add = self.counters.add
        add(("remote_latency_bucket", bisect_left(LATENCY_BUCKETS, seconds)))
        add("remote_latency_sum", seconds)

    # ---- reads ------------------------------------------------------------------------

    def disk_read_took(self, seconds: float) -> None:
        """The backing store took this long for a read the lenders could have served.

        A lender is worth waiting for as long as the disk would take: the deadline is
        the larger of the configured one and the disk's recent (moving average) read
        time, up to MAX_DEADLINE. Under load a throttled disk takes milliseconds (16
        readers on a 1000-IOPS disk: 16 ms) and the client's own CPU queue delays
        replies past a fixed 2 ms: the lender was suspended and every read went to
        that disk (docs/benchmarks.md, randread-uniform-qd16)."""
        ema = self._disk_ema
        ema = seconds if not ema else ema + 0.1 * (seconds - ema)
        self._disk_ema = ema
        self.deadline = min(MAX_DEADLINE, max(self.min_deadline, ema))

    def get_one(self, key: bytes, out: memoryview) -> int:
        """One block's plaintext, opened straight into `out` (its place in the reply):
        its length, or -1 if no lender has it (out's bytes are then undefined).
        get_many for the commonest call (a small read that misses one block), without
        its lists and dicts. Never raises."""
        if self._pending or self._inflight:
            n = self.queued(key, out)
            if n is not None:
                return n
        lenders = self.lenders
        ld = lenders[0] if len(lenders) == 1 else lenders[self._placement.owner(key)]
        n = -1
        bad = errors = 0
        answered = False  # the lender said whether it holds the block
        if ld.health.state == ACTIVE and 0 < len(key) <= p.MAX_KEY_LEN:
            c = None
            t0 = time.monotonic()
            try:
                c, gen = ld.acquire(self.deadline)
                # The lender gets the whole deadline from the moment the request
                # leaves, even if this thread lost time before that. The blob may be
                # a view of c's reply buffer: opened before c goes back to the pool.
                blob = c.get_one(key, t0 + self.deadline, self.deadline, True)
                answered = True
            except Exception as e:  # invariant 2: a miss, never a failed read
                if c is not None:
                    c.close()
                try:
                    self._fault(ld, e, time.monotonic() - t0)
                except Exception:
                    errors = 1
            if c is not None and c.late:  # this thread was descheduled in the wait
                self.counters.add("remote_client_delays")
            if answered:
                elapsed = time.monotonic() - t0
                ld.health.ok(elapsed)
                self._observe(elapsed)
                if blob is not None:
                    try:
                        n = self._sealer.open_into(key, blob, out)
                    except SealError:
                        bad = 1
                ld.release(c, gen)  # back in the pool: another worker may take it now
        self._counted_one(ld, key, n >= 0, answered, bad, errors)
        return n

    def _counted_one(
        self, ld: _Lender, key: bytes, hit: bool, answered: bool, bad: int, errors: int
    ) -> None:
        """The bookkeeping of a one-block get: counters, what the lender is known to
        hold, the miss-ratio curve's sample."""
        add = self.counters.add
        if hit:
            add("remote_hits")
            add(("lender_hits", ld.url))
        else:
            add("remote_misses")
            add(("lender_misses", ld.url))
        if bad:
            add("seal_failures")
        if errors:
            add("remote_errors")
        if self.mode == "exclusive":
            if hit:
                self._delete_later([key])
        elif hit:
            if self.remember_blocks:  # remember_fetched(key), inline
                with self._qlock:
                    known = self._known
                    known[key] = None
                    known.move_to_end(key)
                    if len(known) > self.remember_blocks:
                        known.popitem(last=False)
        elif answered and self._known:
            with self._qlock:  # it answered without a valid copy: see _get_many
                self._known.pop(key, None)
        if hash(key) * MIX & MASK < self.curve.cut:
            self.curve.got([key], (key,) if hit else ())

    def fast_got(
        self, ld: _Lender, key: bytes, hit: bool, bad_seal: bool, seconds: float,
        error: RemoteError | None = None,
    ) -> None:  # fmt: skip
        """The bookkeeping of a one-block get the C read path asked (fs/fast_read.py),
        as get_one's, after the kernel has its answer: a hit, a miss, a blob that did
        not open, or a failed call (`error`; the connection is closed)."""
        if error is not None:
            errors = 0
            try:
                self._fault(ld, error, seconds)
            except Exception:
                errors = 1
            self._counted_one(ld, key, False, False, 0, errors)
            return
        ld.health.ok(seconds)
        self._observe(seconds)
        self._counted_one(ld, key, hit, True, int(bad_seal), 0)

    def queued(self, key: bytes, out: memoryview) -> int | None:
        """A block still in the put queue (evicted a moment ago, not sent yet), opened
        into `out` by get_many: its length (-1 if it was not found after all); None if
        the queue does not hold it. get_one's first look, and all a read whose lender
        already said no (the C read path) has left."""
        if self._pending.get(key) is None and self._inflight.get(key) is None:
            return None
        return self.get_many_into({key: out}).get(key, -1)

    @property
    def sealer(self) -> RunSealer:
        """This run's sealing (the C read path opens blobs with its keys)."""
        return self._sealer

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """Plaintext of the blocks found and verified; the rest are misses."""
        return self._get_many_counted(keys, None, 0.0)

    def get_many_into(self, into: dict[bytes, memoryview], budget: float = 0.0) -> dict[bytes, int]:
        """get_many of into's keys, each block opened straight into its place: the
        length of each found; the places of the others hold undefined bytes. `budget`:
        seconds the lenders may take if that is longer than the deadline (a stream's
        request: what the disk would take for those blocks), at most MAX_DEADLINE."""
        return self._get_many_counted(list(into), into, budget)

    def _get_many_counted(
        self, keys: list[bytes], into: dict[bytes, memoryview] | None, budget: float
    ) -> dict:
        found: dict = {}
        if not keys:
            return found
        # (lender, hits, misses) of this call, counted at the end.
        tally: list[tuple[_Lender, int, int]] = []
        errors = 0
        try:
            self._get_many(keys, found, tally, into, budget)
        except Exception:  # invariant 2: never fail an application call
            errors = 1
        hits, misses = len(found), len(keys) - len(found)
        add = self.counters.add
        add("remote_hits", hits)
        add("remote_misses", misses)
        if errors:
            add("remote_errors", errors)
        for ld, h, m in tally:
            add(("lender_hits", ld.url), h)
            add(("lender_misses", ld.url), m)
        cut = self.curve.cut
        sampled = [k for k in keys if hash(k) * MIX & MASK < cut]
        if sampled:
            self.curve.got(sampled, found)
        return found

    def _get_many(
        self,
        keys: list[bytes],
        found: dict,
        tally: list[tuple[_Lender, int, int]],
        into: dict[bytes, memoryview] | None,
        budget: float = 0.0,
    ) -> None:
        """Fills found[key] with each block's plaintext, or with its length once opened
        into into[key] if `into` is given."""
        t0 = time.monotonic()
        # A 1 MiB multi-get takes longer than one block: a deadline set by one block's
        # disk read timed such replies out on a busy client (137 time-outs in a 20 s
        # testbed seqread, each suspending-prone and sending 1 MiB to the disk).
        deadline = t0 + max(self.deadline, min(budget, MAX_DEADLINE))
        # Blocks still in the put queue (evicted a moment ago) are answered from it.
        pending, inflight = self._pending, self._inflight
        if pending or inflight:
            rest = []
            for k in keys:
                v = pending.get(k)
                if v is None:
                    v = inflight.get(k)
                if v is None:
                    rest.append(k)
                elif into is None:
                    found[k] = v
                elif len(v) <= len(into[k]):
                    into[k][: len(v)] = v
                    found[k] = len(v)
            if found:
                self._count(remote_queue_hits=len(found))
                if self.mode == "exclusive":  # it goes back to the local tier instead
                    self.forget(list(found))
            keys = rest
            if not keys:
                return
        for k in keys:
            if not 0 < len(k) <= p.MAX_KEY_LEN:
                keys = [k for k in keys if 0 < len(k) <= p.MAX_KEY_LEN]  # others: misses
                break
        lenders = self.lenders
        if len(lenders) == 1:
            groups = [(lenders[0], keys)] if keys else []
        else:
            groups = [(lenders[i], ks) for i, ks in self._placement.group(keys).items()]
        calls: list[tuple[_Lender, Client, int, list[bytes], Any]] = []
        for ld, ks in groups:
            if ld.health.state != ACTIVE:
                tally.append((ld, 0, len(ks)))
                continue
            c = None
            try:
                c, gen = ld.acquire(max(deadline - time.monotonic(), 1e-4))
                c.timeout = max(deadline - time.monotonic(), 1e-4)
                calls.append((ld, c, gen, ks, c.start_get(ks)))
            except Exception as e:
                if c is not None:
                    c.close()
                tally.append((ld, 0, len(ks)))
                self._fault(ld, e, time.monotonic() - t0)
        if not calls:
            return
        bad = 0
        fetched: list[bytes] = []
        missed: list[bytes] = []
        unseal, unseal_into = self._sealer.open, self._sealer.open_into
        for ld, c, gen, ks, token in calls:
            try:
                values = c.finish_get(token, deadline)
            except Exception as e:
                c.close()
                tally.append((ld, 0, len(ks)))
                self._fault(ld, e, time.monotonic() - t0)
                continue
            elapsed = time.monotonic() - t0
            ld.health.ok(elapsed)
            ld.release(c, gen)
            self._observe(elapsed)
            n = 0
            for k, blob in zip(ks, values, strict=True):
                if blob is not None:
                    try:
                        if into is None:
                            found[k] = unseal(k, blob)
                        else:
                            found[k] = unseal_into(k, blob, into[k])
                        fetched.append(k)
                        n += 1
                        continue
                    except SealError:
                        bad += 1
                missed.append(k)
            tally.append((ld, n, len(ks) - n))
        if bad:
            self._count(seal_failures=bad)
        if self.mode == "exclusive":
            self._delete_later(fetched)
        else:
            self.remember_fetched(*fetched)
            if missed and self._known:
                # A lender that answered without a valid copy does not hold the block
                # (it dropped it, e.g. when its host wanted the memory back): forget
                # that it did, or every later eviction of it is skipped for good.
                with self._qlock:
                    for k in missed:
                        self._known.pop(k, None)

    def _fault(self, ld: _Lender, e: BaseException, elapsed: float) -> None:
        if isinstance(e, RemoteTimeout):
            self._count(remote_timeouts=1)
            ld.health.timeout(elapsed)
            if not ld.health.active:
                self._reprobe.set()
        else:
            self._count(remote_errors=1)
            was_active = ld.health.active
            ld.health.fail(f"{type(e).__name__}: {e}")
            if was_active:
                self._lost(ld)

    def _lost(self, ld: _Lender) -> None:
        """A lender went down: its pooled connections and what we knew it held go."""
        ld.close_pool()
        with self._qlock:
            self._known.clear()

    def clear_namespace(self) -> None:
        """Drop everything this client holds on its memlend lenders (a restarted mount's
        old blocks are unreachable under its new keys; this gives their memory back).
        memcached has no such call: there the old blocks age out."""
        for ld in self.lenders:
            if ld.kind != "memlend" or ld.health.state != ACTIVE:
                continue
            try:
                c = ld.connect(self.connect_timeout)
                try:
                    c.invalidate_all()
                finally:
                    c.close()
            except Exception as e:  # a fault only costs memory on the lender
                self._fault(ld, e, 0.0)

    # ---- inclusive mode: keys known to be on a lender -----------------------------------

    def remember_fetched(self, *keys: bytes) -> None:
        """These keys were read back from a lender that keeps them (inclusive mode):
        a later `put` of one of them is skipped. get_many calls this for its hits;
        the set is an LRU of at most `remember_blocks` keys."""
        if self.mode != "inclusive" or not self.remember_blocks or not keys:
            return
        with self._qlock:
            known = self._known
            for key in keys:
                known[key] = None
                known.move_to_end(key)
            while len(known) > self.remember_blocks:
                known.popitem(last=False)

    def forget(self, keys: Sequence[bytes]) -> None:
        """Forget these keys (pending puts, known-on-lender); remote copies are left
        to their versioned keys (they become unreachable) or the lender's eviction."""
        with self._qlock:
            for k in keys:
                self._known.pop(k, None)
                v = self._pending.pop(k, None)
                if v is not None:
                    self._pending_bytes -= len(v)

    # ---- writes -----------------------------------------------------------------------

    def put(self, key: bytes, data: bytes | bytearray | memoryview) -> None:
        """Queue a clean block for a lender; O(1) under a short lock, never does I/O.

        `data` is copied unless it is `bytes` (an arena slot is reused at once)."""
        with self._qlock:
            if key in self._known:
                self.counters.add("remote_put_skipped")
                return
            pending = self._pending
            blocks = len(pending) + len(self._inflight)
            nbytes = self._pending_bytes + self._inflight_bytes
            full = blocks >= self.queue_blocks or nbytes + len(data) > self.queue_bytes
            if full or self._stop.is_set() or not 0 < len(key) <= p.MAX_KEY_LEN:
                self.counters.add("remote_dropped_puts")
                self._queue_full_drops += full
                return
            if key in pending:
                self._pending_bytes -= len(pending[key])
            pending[key] = data if type(data) is bytes else bytes(data)
            self._pending_bytes += len(data)
            first = len(pending) == 1
            peak = self._queue_peak
            peak[0] = max(peak[0], len(pending) + len(self._inflight))
            peak[1] = max(peak[1], self._pending_bytes + self._inflight_bytes)
        if first:
            self._wake.set()
        if hash(key) * MIX & MASK < self.curve.cut:
            self.curve.put(key)

    def wait_for_room(self, blocks: int, nbytes: int, timeout: float = ROOM_WAIT) -> None:
        """Wait (at most `timeout`) until the put queue can take `blocks` more blocks of
        `nbytes` in all, while every lender is active. Called by readers, outside any
        lock, before they evict or lend what they read: a put thread that a busy CPU
        left behind then catches up instead of the blocks being dropped (a first
        `cat` on a 100 MB/s disk lent 70% of its blocks on a loaded machine without
        this). A lender that is down or suspended costs no wait: its puts are dropped
        at once by the put thread."""
        if not all(ld.health.active for ld in self.lenders):
            return
        room = self._room
        with room:
            room.wait_for(
                lambda: (
                    self._stop.is_set()
                    or (
                        len(self._pending) + len(self._inflight) + blocks <= self.queue_blocks
                        and self._pending_bytes + self._inflight_bytes + nbytes <= self.queue_bytes
                    )
                ),
                timeout,
            )

    def _delete_later(self, keys: list[bytes]) -> None:
        if not keys:
            return
        with self._qlock:
            room = self.queue_blocks - len(self._deletes)
            if room < len(keys):
                self.counters.add("remote_dropped_deletes", len(keys) - max(room, 0))
                keys = keys[: max(room, 0)]
            self._deletes.extend(keys)
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued put and delete has been sent (for tests and close)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._qlock:
                idle = not (self._pending or self._inflight or self._deletes or self._busy)
            if idle:
                return True
            self._wake.set()
            time.sleep(0.001)
        return False

    def _put_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            if self._stop.is_set():
                return
            self._wake.clear()
            # Let a few more evictions join the batch (the thread wakes on the first).
            if self.linger:
                self._stop.wait(self.linger)
            with self._qlock:
                batch, self._pending = self._pending, {}
                self._inflight = batch
                self._inflight_bytes, self._pending_bytes = self._pending_bytes, 0
                deletes = list(self._deletes)
                self._deletes.clear()
                self._busy = True
            try:
                if batch:
                    self._send_puts(batch)
                if deletes:
                    self._send_deletes(deletes)
            except Exception:  # keep the thread alive whatever happens
                self._count(remote_errors=1)
            finally:
                with self._qlock:
                    self._inflight = {}
                    self._inflight_bytes = 0
                    self._busy = False
                    self._room.notify_all()
            self._log_drops()

    def _log_drops(self, every: float = DROP_LOG_EVERY) -> None:
        """Say in the log, at most once per `every` seconds, that puts were dropped: a
        block not lent is a future disk read, and the count alone is easy to miss."""
        logged, when = self._drops_logged
        dropped, now = int(self.counters.get("remote_dropped_puts")), time.monotonic()
        if dropped > logged and now - when >= every:
            self._drops_logged = (dropped, now)
            states = ", ".join(f"{ld.url} {ld.health.state}" for ld in self.lenders)
            log.warning(
                "%d blocks not lent in the last %.0f s (put queue full or lender not active: "
                "%s); they will be read from the disk again",
                dropped - logged, now - when, states,
            )  # fmt: skip

    def _put_client(self, ld: _Lender) -> Client:
        return ld.own("put", self.put_timeout)

    def _send_puts(self, batch: dict[bytes, bytes]) -> None:
        groups = self._placement.group(batch)
        for idx, ks in groups.items():
            ld = self.lenders[idx]
            if not ld.health.active:
                self._put_counts(ld, 0, len(ks))
                continue
            for i in range(0, len(ks), self.batch):
                chunk = ks[i : i + self.batch]
                items = [(k, self._sealer.seal(k, batch[k])) for k in chunk]
                t = time.monotonic()
                try:
                    c = self._put_client(ld)
                    self._check_fits(ld, c, items)
                    stored = c.put_many(items)
                except Exception as e:
                    lost = len(ks) - i
                    self._put_counts(ld, 0, lost)
                    self._fault(ld, e, time.monotonic() - t)
                    break
                self._put_counts(ld, stored, len(chunk) - stored)  # the rest: refused

    def _put_counts(self, ld: _Lender, sent: int, dropped: int) -> None:
        add = self.counters.add
        add("remote_put_blocks", sent)
        add(("lender_put_blocks", ld.url), sent)
        add("remote_dropped_puts", dropped)
        add(("lender_dropped_puts", ld.url), dropped)

    @staticmethod
    def _check_fits(ld: _Lender, c: Client, items: list[tuple[bytes, bytes]]) -> None:
        """Say once, loudly, when a lender's slots are too small for our blocks: it
        would otherwise be 'active' and silently store nothing."""
        biggest = max(len(v) for _, v in items)
        if biggest > c.max_value and not ld.warned_size:
            ld.warned_size = True
            log.warning(
                "lender %s stores at most %d bytes per block but this mount's sealed "
                "blocks take %d: start it with --block-size equal to the mount's",
                ld.url, c.max_value, biggest,
            )  # fmt: skip

    def _send_deletes(self, keys: list[bytes]) -> None:
        for idx, ks in self._placement.group(keys).items():
            ld = self.lenders[idx]
            if not ld.health.active:
                continue
            t = time.monotonic()
            try:
                self._put_client(ld).invalidate(ks)
            except Exception as e:
                self._fault(ld, e, time.monotonic() - t)
                continue
            self._count(remote_deletes=len(ks))

    # ---- health -----------------------------------------------------------------------

    def _probe_loop(self) -> None:
        delay = self.probe_interval
        first = REPROBE_FIRST  # grows while suspensions keep coming back (flapping)
        last_kick = 0.0
        while not self._stop.is_set():
            self._reprobe.wait(delay)
            if self._stop.is_set():
                return
            kicked = self._reprobe.is_set()
            self._reprobe.clear()
            if kicked:
                now = time.monotonic()
                flapping = now - last_kick < 1.0
                first = min(self.probe_interval, first * 2) if flapping else REPROBE_FIRST
                last_kick = now
                self._stop.wait(first)  # let the stall pass before judging
            try:
                self._probe_all()
            except Exception:
                self._count(remote_errors=1)
            if all(ld.health.active for ld in self.lenders):
                delay = self.probe_interval
            else:
                delay = min(self.probe_interval, first * 2 if kicked else delay * 2)

    def _probe_all(self, first: bool = False) -> None:
        for ld in self.lenders:
            if self._stop.is_set():
                return
            if ld.health.active and not first:
                self._probe_active(ld)
            else:
                self._probe_inactive(ld)

    def _pings(self, ld: _Lender, n: int) -> list[float]:
        c = ld.own("probe", self.connect_timeout)
        lat = []
        for _ in range(n):
            t = time.monotonic()
            c.ping(b"memlend probe")
            lat.append(time.monotonic() - t)
        self._read_lender_stats(ld, c)
        return lat

    def _probe_inactive(self, ld: _Lender) -> None:
        try:
            lat = sorted(self._pings(ld, 5))[:-1]  # drop the slowest (first-use warm-up)
        except Exception as e:
            ld.drop_own("probe")
            ld.health.probe_failed(f"{type(e).__name__}: {e}")
            return
        if not ld.health.fast_enough(lat):
            ld.health.probe_failed(
                f"probe round trips {lat[len(lat) // 2] * 1e3:.2f} ms (median)", slow=True
            )
            return
        # Warm the pool so the first read does not pay for a handshake.
        with contextlib.suppress(Exception):
            if ld.idle() == 0:
                ld.release(ld.connect(self.connect_timeout), ld.health.generation)
        ld.health.reactivate(sum(lat) / len(lat))

    def _probe_active(self, ld: _Lender) -> None:
        try:
            lat = self._pings(ld, 3)
        except RemoteTimeout as e:  # no answer within connect_timeout: far too slow
            ld.drop_own("probe")
            self._count(remote_timeouts=1)
            ld.health.probe_failed(f"probe timed out: {e}", slow=True)
            ld.close_pool()
            return
        except Exception as e:
            ld.drop_own("probe")
            self._fault(ld, e, 0.0)
            return
        ld.health.probed(lat)

    def _read_lender_stats(self, ld: _Lender, c: Client) -> None:
        s = c.stats()
        # A memlend lender counts this client's blocks apart; memcached only its total.
        n = s.get("client_blocks", s.get("blocks")) if ld.kind == "memlend" else s.get("curr_items")
        ld.lender_blocks = n if isinstance(n, int) else None
        share = s.get("client_share_blocks")
        ld.lender_share = share if isinstance(share, int) else None

    # ---- exposition, shutdown -------------------------------------------------------

    def lent_capacity(self) -> int:
        """Blocks the lenders would hold for this mount now: the remote curve's "now".
        A memlend lender reports this client's share (within what its host allows); what
        it holds is less while it has room, and a curve read there would call misses
        what the lender, not yet full, serves. Else (memcached, older lenders): what
        they hold, from their stats (memcached: its total, all clients) or our acks."""
        return sum(
            ld.lender_share
            if ld.lender_share is not None
            else ld.lender_blocks
            if ld.lender_blocks is not None
            else ld.put_blocks
            for ld in self.lenders
            if ld.health.active
        )

    def curve_snapshot(self, block_size: int) -> dict[str, object]:
        """`remote_curve` of `memlend stats --json` (stackcurve.RemoteCurve.snapshot)."""
        return self.curve.snapshot(self.lent_capacity(), block_size)

    def snapshot(self) -> dict:
        totals = self.counters.snapshot()
        out: dict[str, Any] = {k: int(totals.get(k, 0)) for k in self.counter_names}
        lat = sorted(self._latencies)

        def pct(q: float) -> int:
            return int(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else 0

        with self._qlock:
            out["remote_queued_blocks"] = len(self._pending) + len(self._inflight)
            out["remote_queued_bytes"] = self._pending_bytes + self._inflight_bytes
            out["remote_known_blocks"] = len(self._known)
            out["remote_queue_peak_blocks"], out["remote_queue_peak_bytes"] = self._queue_peak
            out["remote_queue_full_drops"] = self._queue_full_drops
        out["remote_queue_capacity_bytes"] = min(self.queue_bytes, 1 << 62)
        out["remote_queue_capacity_blocks"] = self.queue_blocks
        out["remote_latency_us"] = {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}
        # Cumulative, as Prometheus wants: counts of round trips <= each bound (then all).
        per = [
            int(totals.get(("remote_latency_bucket", i), 0))
            for i in range(len(LATENCY_BUCKETS) + 1)
        ]
        cum = [sum(per[: i + 1]) for i in range(len(per))]
        out["remote_latency_histogram"] = {
            "le": list(LATENCY_BUCKETS),
            "cumulative": cum,
            "sum_seconds": float(totals.get("remote_latency_sum", 0.0)),
        }
        out["remote_mode"] = self.mode
        out["remote_deadline_us"] = int(self.deadline * 1e6)
        out["remote_min_deadline_us"] = int(self.min_deadline * 1e6)
        out["lenders"] = [
            {
                "url": ld.url,
                "state": ld.health.state,
                "blocks_held": ld.lender_blocks if ld.lender_blocks is not None else ld.put_blocks,
                "blocks_held_from": "lender stats" if ld.lender_blocks is not None else "acks",
                "errors": ld.health.errors,
                "timeouts": ld.health.timeouts,
                "suspensions": ld.health.suspensions,
                "avg_latency_us": int(ld.health.avg * 1e6),
                "hits": ld.hits,
                "misses": ld.misses,
                "put_blocks": ld.put_blocks,
                "dropped_puts": ld.dropped_puts,
                "last_error": ld.health.last_error,
            }
            for ld in self.lenders
        ]
        return out

    def close(self) -> None:
        """Stop the threads and close every connection; queued puts are dropped."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._reprobe.set()
        with self._room:
            self._room.notify_all()  # no reader waits for a put thread that is gone
        for t in self._threads:
            t.join(5)
        for ld in self.lenders:
            ld.close()

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ACTIVE", "DOWN", "MODES", "RemoteTier"]
