"""Which lender holds a block: rendezvous (highest random weight) hashing.

Each lender has a 64-bit seed derived from its name (its URL); a key's score on a
lender is a 64-bit mix of the key's hash and the seed, and the key lives on the
lender with the highest score. Adding a lender moves to it exactly the keys it
now wins, and removing one moves only its keys (every other key keeps its
winner), so a lender joining or leaving costs the others nothing. Placement is
deterministic: it does not depend on the process (no PYTHONHASHSEED).

Cost: one BLAKE2b of the key (about 0.4 µs) plus a few integer operations per
lender; with a single lender nothing is computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

_M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Rendezvous:
    """Rendezvous hashing of opaque byte keys over named nodes (index = position)."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("rendezvous hashing needs at least one node")
        if len(set(names)) != len(names):
            raise ValueError("node names must be distinct")
        self.names = list(names)
        self._seeds = [_hash64(b"memlend node v1\0" + n.encode()) for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def owner(self, key: bytes) -> int:
        """Index of the node that holds `key`."""
        seeds = self._seeds
        if len(seeds) == 1:
            return 0
        h = _hash64(key)
        best, best_score = 0, -1
        for i, seed in enumerate(seeds):
            score = _mix(h ^ seed)
            if score > best_score:
                best, best_score = i, score
        return best

    def group(self, keys: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Keys grouped by owner index, each group in the order given."""
        if len(self._seeds) == 1:
            ks = list(keys)
            return {0: ks} if ks else {}
        out: dict[int, list[bytes]] = {}
        for k in keys:
            out.setdefault(self.owner(k), []).append(k)
        return out
