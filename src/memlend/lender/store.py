"""The lender's block store: sealed blobs in an Arena, per-client namespaces.

Memory model (the hard cap, invariant 3). Every stored blob takes exactly one
arena slot; the few bytes a sealed block has beyond the slot size (the 29-byte
seal overhead, at most TAIL_MAX) live in the index next to the slot number. The
index and the policy cost Python objects per entry, so the number of slots is
chosen so that slots * (slot_size + bookkeeping) <= memory: the bookkeeping is
inside the cap, not on top of it.

Replacement. One global policy (memlend.policies) ranks all entries as
(namespace, key); when every slot is taken, admit() picks the victim. Fairness:
a client holding more than its share -- the smaller of --client-quota and an
equal split of the slots among the namespaces holding data -- replaces its own
oldest entries instead, so no client can take all the memory from the others.
Each namespace's index is a dict in insertion order, which doubles as that FIFO.

Giving memory back. `set_allowed()` lowers the number of slots that may be
used; entries beyond it are dropped, oldest first from the largest namespaces
(fast and fair matters more than victim quality when the host needs its memory),
and their pages are returned to the kernel with MADV_DONTNEED, as are free slots
that were touched before.

Advice (memlend.stackcurve). With `advice_bytes`, taken off the memory before the
slots are counted, each client namespace (as many as fit those bytes) gets a
sampled LRU stack of its puts and hits: how many of its hits the last GiB of its
share is buying. The hits are learnt in touched() (both GET paths, the native
one included, report their hits there), so the sampling test runs once per hit key
in Python and never in the C lookup.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from memlend.arena import Arena
from memlend.mrc import MASK, MAX_RATE, MIX
from memlend.policies import bookkeeping_bytes, extra_bytes, make_policy, slots_within
from memlend.stackcurve import ADVICE_KEYS, GiB, StackCurve, client_advice, curve_bytes

TAIL_MAX = 64
# Namespace entry per block: key bytes, (slot, length, tail) tuple, dict entry, tail
# bytes; the policy's own share comes from policies.bookkeeping_bytes.
# tests/test_lender_process.py checks the resulting RSS bound.
ENTRY_BYTES = 512
# Per-slot bookkeeping with the Store's default policy (tests size stores with it).
META_PER_SLOT = ENTRY_BYTES + bookkeeping_bytes("s3fifo")


def memory_for(slots: int, slot_size: int, policy: str = "s3fifo") -> int:
    """The --memory that gives exactly `slots` slots of `slot_size` with `policy`."""
    return slots * (slot_size + ENTRY_BYTES + bookkeeping_bytes(policy)) + extra_bytes(
        policy, slots
    )


@dataclass
class Namespace:
    client_id: bytes
    index: int
    quota_slots: int | None = None  # from the lender's clients file; None: the default
    # key -> (slot, length, tail); insertion order = FIFO for quota evictions
    entries: dict[bytes, tuple[int, int, bytes]] = field(default_factory=dict)
    curve: StackCurve | None = None  # its puts and hits, for advice (if budgeted)


class Store:
    def __init__(
        self,
        memory: int,
        slot_size: int = 64 << 10,
        policy: str = "s3fifo",
        client_quota: int | None = None,
        max_namespaces: int = 256,
        advice_bytes: int = 0,
        advice_gib: int = GiB,
        advice_rate: float = MAX_RATE,
    ) -> None:
        """`advice_bytes`: of `memory`, for the per-client curves (stackcurve.advice_budget);
        `advice_gib`: the "last GiB" they report on (smaller in tests)."""
        self.slot_size = slot_size
        self.slots = slots_within(memory - advice_bytes, slot_size + ENTRY_BYTES, policy)
        if self.slots < 1:
            raise ValueError(f"{memory} bytes of memory cannot hold one {slot_size}-byte slot")
        self.memory = memory
        self.max_value = slot_size + TAIL_MAX
        self.arena = Arena(self.slots, slot_size)
        self.policy = make_policy(policy, self.slots)
        self.quota_slots = self.slots if client_quota is None else max(1, client_quota // slot_size)
        self.max_namespaces = max_namespaces
        self.allowed = self.slots  # lowered by the memory watcher
        self.used = 0
        self._ns: dict[bytes, Namespace] = {}
        self._by_index: dict[int, Namespace] = {}
        self._next_index = 0
        self._dirty_free: set[int] = set()  # free slots whose pages may be resident
        self.hits = self.misses = self.puts = self.refused = self.evictions = 0
        self.given_back = 0  # bytes returned to the kernel under memory pressure
        self.advice_curves = advice_bytes // curve_bytes(ADVICE_KEYS)  # clients that get one
        self.advice_gib = advice_gib
        self.advice_rate = advice_rate

    # ---- namespaces -----------------------------------------------------------

    def namespace(self, client_id: bytes, quota: int | None = None) -> Namespace | None:
        """The namespace of `client_id`, created if needed; None if the table is full.
        `quota`: this client's own limit in bytes (the clients file), if any."""
        ns = self._ns.get(client_id)
        if ns is not None:
            ns.quota_slots = None if quota is None else max(1, quota // self.slot_size)
            if ns.quota_slots is not None and len(ns.entries) > ns.quota_slots:
                # A quota lowered (clients file read again): its oldest blocks go now.
                self.invalidate(ns, list(ns.entries)[: len(ns.entries) - ns.quota_slots])
            return ns
        if len(self._ns) >= self.max_namespaces:
            for cid in [c for c, n in self._ns.items() if not n.entries]:
                self._remove(self._ns[cid])
            if len(self._ns) >= self.max_namespaces:
                return None
        ns = Namespace(client_id, self._next_index)
        if quota is not None:
            ns.quota_slots = max(1, quota // self.slot_size)
        self._next_index += 1
        self._ns[client_id] = ns
        self._by_index[ns.index] = ns
        return ns

    def drop_client(self, client_id: bytes) -> int:
        """A client no longer allowed (clients file reloaded): its blocks and its
        namespace go; returns the blocks freed."""
        ns = self._ns.get(client_id)
        if ns is None:
            return 0
        freed = self.invalidate_all(ns)
        self._remove(ns)
        return freed

    def _remove(self, ns: Namespace) -> None:
        """An empty namespace leaves the table; its advice curve's budget is free again."""
        del self._ns[ns.client_id]
        del self._by_index[ns.index]
        if ns.curve is not None:
            self.advice_curves += 1

    def client_share(self, ns: Namespace) -> int:
        """Blocks `ns` may hold before its own are evicted: its share, within what the
        host allows now (the size at which a client's remote curve is read)."""
        return min(self._share(ns), self.allowed)

    def _share(self, ns: Namespace) -> int:
        holders = sum(1 for n in self._ns.values() if n.entries or n is ns)
        share = min(self.quota_slots, max(1, self.slots // max(1, holders)))
        return share if ns.quota_slots is None else min(share, ns.quota_slots)

    # ---- data path ------------------------------------------------------------

    def get(self, ns: Namespace, key: bytes) -> bytes | memoryview | None:
        parts = self.get_parts(ns, key)
        if parts is None:
            return None
        body, tail = parts
        return bytes(body) + tail if tail else body

    def get_parts(
        self, ns: Namespace, key: bytes, touch: bool = True
    ) -> tuple[memoryview, bytes] | None:
        """The stored value as (slot bytes, tail), uncopied: the server sends both with
        one sendmsg. The view is only valid until the next put or drop. touch=False
        leaves the policy update to a later touched() (after the reply is sent)."""
        e = ns.entries.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        if touch:
            self.policy.touch((ns.index, key))
        slot, length, tail = e
        start = slot * self.slot_size
        return self.arena.view[start : start + min(length, self.slot_size)], tail

    def served(self, ns: Namespace, hits: list[bytes], misses: int) -> None:
        """Count a batch answered outside get_parts (the native path) and let the
        policy learn of its hits."""
        self.hits += len(hits)
        self.misses += misses
        if hits:
            self.touched(ns, hits)

    def touched(self, ns: Namespace, keys: Iterable[bytes]) -> None:
        """The policy update of get_parts(touch=False) for these (found) keys, and the
        advice curve's (sampled) hits."""
        touch, idx, entries, curve = self.policy.touch, ns.index, ns.entries, ns.curve
        if curve is None:
            for k in keys:
                if k in entries:
                    touch((idx, k))
            return
        cut = curve.cut
        for k in keys:
            if k in entries:
                touch((idx, k))
                if hash(k) * MIX & MASK < cut:
                    curve.get(k, True)

    def put(self, ns: Namespace, key: bytes, value: bytes | memoryview) -> bool:
        """Store `value` under `key`; False if it was not stored (too big, no memory)."""
        n = len(value)
        if n > self.max_value:
            self.refused += 1
            return False
        self.puts += 1
        curve = ns.curve
        if curve is None and self.advice_curves > 0:  # on its first put: not for stats-only ids
            self.advice_curves -= 1
            curve = ns.curve = StackCurve(ADVICE_KEYS, self.advice_rate)
        if curve is not None and hash(key) * MIX & MASK < curve.cut:
            curve.put(key)
        old = ns.entries.get(key)
        if old is not None:
            slot: int | None = old[0]
            self.policy.touch((ns.index, key))
        else:
            share = self._share(ns)
            if share < self.slots and len(ns.entries) >= share:
                # At its share: the client replaces its own oldest entry.
                slot = self._drop(ns, next(iter(ns.entries)), release=False)
                self.evictions += 1
            elif self.used < self.allowed:
                slot = self.arena.alloc()
                assert slot is not None  # used < allowed <= slots
                self._dirty_free.discard(slot)
                self.used += 1
            elif self.allowed < self.slots:
                if not ns.entries:
                    self.refused += 1  # the host wants its memory back: take no more
                    return False
                # Short of memory: a new block may still replace this client's oldest,
                # which costs nothing more, so the contents do not freeze meanwhile.
                slot = self._drop(ns, next(iter(ns.entries)), release=False)
                self.evictions += 1
            else:
                slot = None  # full: the policy's victim hands over its slot
            ns.entries[key] = (-1, 0, b"")
            for victim in self.policy.admit((ns.index, key)):
                s = self._evict(victim, keep_slot=slot is None)
                if slot is None:
                    slot = s
            if slot is None:  # pragma: no cover - a full policy always evicts
                del ns.entries[key]
                self.policy.discard((ns.index, key))
                self.refused += 1
                return False
        body = min(n, self.slot_size)
        self.arena.slot(slot)[:body] = value[:body]
        ns.entries[key] = (slot, n, bytes(value[body:]))
        return True

    def _evict(self, victim: Hashable, keep_slot: bool = False) -> int | None:
        idx, key = victim  # type: ignore[misc]
        ns = self._by_index[idx]
        self.evictions += 1
        return self._drop(ns, key, release=False, keep_slot=keep_slot, in_policy=False)

    def _drop(
        self,
        ns: Namespace,
        key: bytes,
        *,
        release: bool,
        keep_slot: bool = True,
        in_policy: bool = True,
    ) -> int | None:
        """Remove one entry. keep_slot: hand its slot to the caller (still counted used)."""
        slot = ns.entries.pop(key)[0]
        if in_policy:
            self.policy.discard((ns.index, key))
        if keep_slot and not release:
            return slot
        self.used -= 1
        if release:
            self.arena.release(slot)
            self.given_back += self.slot_size
        else:
            self.arena.free(slot)
            self._dirty_free.add(slot)
        return None

    def invalidate(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        removed = 0
        curve = ns.curve
        for k in keys:
            if k in ns.entries:
                self._drop(ns, k, release=True)
                removed += 1
                if curve is not None and hash(k) * MIX & MASK < curve.cut:
                    curve.discard(k)
        return removed

    def invalidate_prefix(self, ns: Namespace, prefix: bytes) -> int:
        # A scan of the namespace: prefix invalidation (a whole file) is rare.
        return self.invalidate(ns, [k for k in ns.entries if k.startswith(prefix)])

    def invalidate_all(self, ns: Namespace) -> int:
        return self.invalidate(ns, list(ns.entries))

    # ---- memory pressure --------------------------------------------------------

    def set_allowed(self, slots: int) -> int:
        """Use at most `slots` slots from now on; return the bytes given back now."""
        slots = max(0, min(self.slots, slots))
        before = self.given_back
        self.allowed = slots
        while self.used > slots:
            ns = max(self._ns.values(), key=lambda n: len(n.entries))
            self._drop(ns, next(iter(ns.entries)), release=True)
            self.evictions += 1
        self.release_free()
        return self.given_back - before

    def release_free(self) -> None:
        """Return the pages of free-but-touched slots to the kernel."""
        popped = []
        while self._dirty_free:
            s = self.arena.alloc()
            if s is None:  # pragma: no cover - dirty slots are free slots
                break
            popped.append(s)
            self._dirty_free.discard(s)
        for s in popped:
            self.arena.release(s)
        self.given_back += len(popped) * self.slot_size

    # ---- reporting ----------------------------------------------------------------

    @property
    def blocks(self) -> int:
        return self.used

    def stats(self) -> dict:
        return {
            "memory_cap": self.memory,
            "slot_size": self.slot_size,
            "slots": self.slots,
            "allowed_bytes": self.allowed * self.slot_size,
            "bytes_used": self.used * self.slot_size,
            "blocks": self.used,
            "namespaces": sum(1 for n in list(self._ns.values()) if n.entries),
            "hits": self.hits,
            "misses": self.misses,
            "puts": self.puts,
            "refused": self.refused,
            "evictions": self.evictions,
            "given_back_bytes": self.given_back,
        }

    def blocks_per_client(self) -> dict[str, int]:
        """Blocks held per client namespace, by the first 8 bytes of its id in hex (the
        id is a hash of the mount's seal key: it names a mount, reveals nothing)."""
        return {n.client_id[:8].hex(): len(n.entries) for n in list(self._ns.values())}

    def advice_per_client(self) -> dict[str, dict]:
        """Per client (named as in blocks_per_client) that has a curve: what the last
        GiB of its share buys (stackcurve.client_advice)."""
        return {
            n.client_id[:8].hex(): client_advice(
                n.curve, self.client_share(n), len(n.entries), self.slot_size, self.advice_gib
            )
            for n in list(self._ns.values())
            if n.curve is not None
        }

    def close(self) -> None:
        self.arena.close()
