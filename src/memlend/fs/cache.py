"""The local tier: block data in an Arena, replacement decided by a Policy.

Keys are ints, (file_id << FILE_SHIFT) | block_no: cheaper to hash and store
than tuples, which matters at a million blocks. One lock guards the index, the
policy and the arena's free list; data is copied in and out under it, so a
slot is never overwritten while a reader copies from it.

The slot count is derived from the memory budget *including* the per-block
bookkeeping (index entry, policy entries and their ghosts), so cache_size is a
real bound on what the cache holds, not just on its data. A slice of the budget
(mrc.curve_budget) goes to the live miss-ratio curve, which sees every lookup.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Callable

from memlend.arena import Arena
from memlend.mrc import MULTIPLIERS, LiveCurve, curve_budget, curve_policy, curve_rate
from memlend.policies import make_policy, slots_within
from memlend.stats import MountStats

FILE_SHIFT = 40  # block numbers below 2**40: files up to 4 PiB at 4 KiB blocks
BLOCK_MASK = (1 << FILE_SHIFT) - 1
# Index entry and slot length per block, on top of the policy's own bookkeeping.
INDEX_BYTES = 128


def slots_for(cache_size: int, block_size: int, policy: str) -> int:
    """How many blocks fit in `cache_size` bytes, bookkeeping and curve included."""
    return slots_within(cache_size - curve_budget(cache_size), block_size + INDEX_BYTES, policy)


class BlockCache:
    def __init__(self, cache_size: int, block_size: int, policy: str, stats: MountStats) -> None:
        nslots = slots_for(cache_size, block_size, policy)
        if nslots < 1:
            raise ValueError(f"cache size {cache_size} holds no block of {block_size} bytes")
        self.block_size = block_size
        self.cache_size = cache_size
        self.arena = Arena(nslots, block_size, populate=True)
        self.policy = make_policy(policy, nslots)
        self.stats = stats
        cpol = curve_policy(policy)
        rate = curve_rate(nslots, curve_budget(cache_size), cpol, MULTIPLIERS)
        self.curve = LiveCurve(nslots, rate, MULTIPLIERS, cpol)
        if os.environ.get("MEMLEND_CURVE", "1") == "0":
            # The measurement switch of memlend.bench.curve_fuse_cost: nothing is
            # sampled (its memory stays set aside, so the slots are the same).
            self.curve.cut = 0
        self.lock = threading.Lock()
        # key -> slot << 1 | sampled: whether the curve samples a block is decided once,
        # when it enters (curve.in_sample: ~130 ns of big-int arithmetic and a call), so
        # a hit pays one bit test for it; misses, before a disk or lender read, ask.
        self._index: dict[int, int] = {}
        self._length = array("I", bytes(4 * nslots))  # valid bytes in each slot
        self._per_file: dict[int, int] = {}  # file_id -> resident blocks
        # Called (key, data) with the lock held for each clean block evicted: the
        # remote tier's hook. It must copy `data` (the slot is reused at once).
        self.on_evict: Callable[[int, memoryview], None] | None = None
        # Called (file_id) with the lock held when a file's last resident block goes.
        self.on_file_gone: Callable[[int], None] | None = None
        stats.slots = nslots
        stats.active_policy = self._active_policy()

    def _active_policy(self) -> str:
        # auto (policies/auto.py) names the candidate it follows in `current`.
        return getattr(self.policy, "current", self.policy.name)

    @property
    def slots(self) -> int:
        return self.arena.slots

    def resident(self, file_id: int) -> int:
        return self._per_file.get(file_id, 0)

    # All methods below expect self.lock to be held by the caller.

    def has(self, key: int) -> bool:
        return key in self._index

    def copy_one(self, key: int, lo: int, hi: int, out: memoryview) -> int:
        """The one-block hit path: copy bytes lo..hi of block `key` (as far as valid)
        into out[lo:hi]; return the block's valid length, or -1 on a miss."""
        entry = self._index.get(key)
        if entry is None:
            self.stats.add("local_misses")
            if self.curve.in_sample(key):
                self.curve.record(key, False)
            return -1
        self.policy.touch(key)
        if entry & 1:
            self.curve.record(key, True)
        slot = entry >> 1
        n = self._length[slot]
        src = slot * self.block_size
        if hi > n:
            hi = n
        if hi > lo:
            out[lo:hi] = self.arena.view[src + lo : src + hi]
        self.stats.add("local_hits")
        return n

    def copy_out(
        self, base: int, first: int, last: int, out: memoryview, lo: int, hi: int
    ) -> list[int]:
        """Copy what is cached of blocks first..last of file `base` into out, block i
        at out[i*bs:], only the bytes within out[lo:hi] (what the request wants);
        return each block's valid length, or -1 for a miss."""
        bs = self.block_size
        index, policy, arena, length = self._index, self.policy, self.arena.view, self._length
        in_sample, record = self.curve.in_sample, self.curve.record
        lens = []
        hits = 0
        pos = 0
        for b in range(first, last + 1):
            key = base | b
            entry = index.get(key)
            if entry is None:
                if in_sample(key):
                    record(key, False)
                lens.append(-1)
            else:
                policy.touch(key)
                if entry & 1:
                    record(key, True)
                slot = entry >> 1
                n = length[slot]
                a, z = max(pos, lo), min(pos + n, hi)
                if z > a:
                    src = slot * bs - pos
                    out[a:z] = arena[src + a : src + z]
                lens.append(n)
                hits += 1
            pos += bs
        self.stats.add("local_hits", hits)
        self.stats.add("local_misses", len(lens) - hits)
        return lens

    def streamed(self, base: int, first: int, last: int) -> None:
        """Blocks first..last of file `base` were served from a read-ahead window:
        lookups that missed, for the curve (the window read them from disk). The lock
        is taken only when one of them is sampled (one block in 128 or fewer)."""
        sampled = [k for k in range(base | first, (base | last) + 1) if self.curve.in_sample(k)]
        if sampled:
            with self.lock:
                for k in sampled:
                    self.curve.record(k, False)

    def curve_snapshot(self) -> dict[str, object]:
        return self.curve.snapshot(self.cache_size)

    def insert(self, key: int, data: memoryview) -> None:
        """Store `data` (at most one block) under `key`, evicting as the policy says."""
        entry = self._index.get(key)
        if entry is None:
            for victim in self.policy.admit(key):
                if self.on_evict is not None:
                    vslot = self._index[victim] >> 1
                    start = vslot * self.block_size
                    self.on_evict(victim, self.arena.view[start : start + self._length[vslot]])
                self._forget(victim)
                self.stats.add("evictions")
            slot = self.arena.alloc()
            if slot is None:  # only if the policy evicted nothing although full
                raise RuntimeError("cache policy over capacity")
            self._index[key] = slot << 1 | self.curve.in_sample(key)
            fid = key >> FILE_SHIFT
            self._per_file[fid] = self._per_file.get(fid, 0) + 1
        else:
            slot = entry >> 1
        n = len(data)
        start = slot * self.block_size
        self.arena.view[start : start + n] = data
        self._length[slot] = n
        self.stats.resident_blocks = len(self._index)
        self.stats.active_policy = self._active_policy()

    def _forget(self, key: int) -> None:
        self.arena.free(self._index.pop(key) >> 1)
        fid = key >> FILE_SHIFT
        left = self._per_file[fid] - 1
        if left:
            self._per_file[fid] = left
        else:
            del self._per_file[fid]
            if self.on_file_gone is not None:
                self.on_file_gone(fid)

    def drop_range(self, file_id: int, first: int, last: int) -> int:
        """Drop the cached blocks first..last (inclusive) of `file_id`; return how many."""
        base = file_id << FILE_SHIFT
        if not self._per_file.get(file_id):
            return 0
        dropped = 0
        index = self._index
        for b in range(first, last + 1):
            key = base | b
            if key in index:
                self.policy.discard(key)
                self._forget(key)
                dropped += 1
                if not self._per_file.get(file_id):
                    break
        self.stats.add("invalidated_blocks", dropped)
        self.stats.resident_blocks = len(index)
        return dropped

    def close(self) -> None:
        self.arena.close()


class NoCache:
    """The local tier when the kernel page cache is memlend's first tier
    (--local-tier kernel): memlend keeps no block of its own. It has BlockCache's
    interface (the passthrough's invalidation code is shared), and holds nothing."""

    slots = 0

    def __init__(self, block_size: int, stats: MountStats) -> None:
        self.block_size = block_size
        self.lock = threading.Lock()  # orders file-version changes, as BlockCache's does
        self.on_evict: Callable[[int, memoryview], None] | None = None
        self.on_file_gone: Callable[[int], None] | None = None  # never called: no blocks
        stats.slots = 0

    def resident(self, file_id: int) -> int:
        return 0

    def curve_snapshot(self) -> None:
        return None  # the page cache's hits never reach memlend: no curve to draw

    def drop_range(self, file_id: int, first: int, last: int) -> int:
        return 0

    def close(self) -> None:
        pass
