"""Cost of the remote tier's curve hooks (memlend.stackcurve.RemoteCurve; docs/policies.md).

`taskset -c 1 python -m memlend.bench.remote_curve_cost` times, fastest of 7 runs:
the hook RemoteTier.put and get_one run on a key that is not sampled (the inlined
test against the tier's curve, less an empty loop), the get_many hook on a batch of
32 unsampled keys, and RemoteCurve.put and got on sampled keys once the curve is at
its key budget (keys: the mount's 32-byte remote keys, hashes already cached as in
the tier, where the put queue and the lookups hash them first).
"""

from __future__ import annotations

import random
import struct

from memlend.bench.curve_cost import best_ns
from memlend.mrc import MASK, MIX
from memlend.stackcurve import RemoteCurve

KEY = struct.Struct(">8sQQQ")  # fs.readpath's remote key
N = 200_000


class _Tier:  # the attribute path the tier's hooks read
    def __init__(self, curve: RemoteCurve) -> None:
        self.curve = curve


def main() -> None:
    curve = RemoteCurve()
    tier = _Tier(curve)
    keys = [KEY.pack(b"epoch123", 7, 1, b) for b in range(4 * N)]
    for k in keys:
        hash(k)  # cached in the bytes object, as the tier's dict lookups leave it
    cold = [k for k in keys if hash(k) * MIX & MASK >= curve.cut][:N]
    hot = [k for k in keys if hash(k) * MIX & MASK < curve.cut]
    rnd = random.Random(1)
    for k in keys:  # fill the curve to its key budget
        if hash(k) * MIX & MASK < curve.cut:
            curve.put(k)
    hot = [k for k in hot if hash(k) * MIX & MASK < curve.cut]  # still sampled after the fill

    def empty() -> None:
        for _k in cold:
            pass

    def hook() -> None:
        for k in cold:
            if hash(k) * MIX & MASK < tier.curve.cut:
                tier.curve.put(k)

    batches = [cold[i : i + 32] for i in range(0, len(cold), 32)]

    def many() -> None:
        for ks in batches:
            cut = tier.curve.cut
            sampled = [k for k in ks if hash(k) * MIX & MASK < cut]
            if sampled:
                tier.curve.got(sampled, ())

    def empty_batches() -> None:
        for _ks in batches:
            pass

    base = best_ns(empty, len(cold))
    print(f"unsampled put/get_one hook: {best_ns(hook, len(cold)) - base:.0f} ns per call")
    per_batch = best_ns(many, len(batches)) - best_ns(empty_batches, len(batches))
    print(f"unsampled get_many hook, 32 keys: {per_batch:.0f} ns per call")
    ops = [rnd.choice(hot) for _ in range(20_000)]

    def sampled_put() -> None:
        for k in ops:
            curve.put(k)

    def sampled_get() -> None:
        for k in ops:
            curve.got([k], (k,))

    print(f"sampled put: {best_ns(sampled_put, len(ops)) / 1e3:.2f} µs per call")
    print(f"sampled get: {best_ns(sampled_get, len(ops)) / 1e3:.2f} µs per call")
    print(f"curve: rate {curve.rate:.2e}, {curve.tracked()} keys tracked of {curve.max_keys}")


if __name__ == "__main__":
    main()
