"""Fuzz the native decoders against the Python ones: the same bytes must give the same
result or the same ProtocolError message.

    python -m memlend.bench.fuzz_native [--n 1000000] [--engine random|hypothesis]

The inputs: random bytes, and valid GET / GET_REPLY / PUT payloads and chunks of
GET frames with bytes overwritten and tails cut off (where the interesting bugs are).
tests/test_native.py runs the property on hypothesis's inputs for a few hundred;
`--engine hypothesis` does the same here (about 450 inputs/s on this machine), and
the default engine draws the same shapes with `random` (seeded, --seed), about 100
times faster, for a million inputs in a minute (docs/native.md). Needs the built
extension (and hypothesis for its engine).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

from memlend import native
from memlend.remote import protocol as p


def _outcome(fn: Any, data: bytes | memoryview) -> tuple[str, object]:
    try:
        return ("ok", fn(data))
    except p.ProtocolError as e:
        return ("error", str(e))


def put_outcome(fn: Any, data: bytes | memoryview) -> tuple[str, object]:
    """A PUT decoder's outcome, its values required to be views of `data` and given
    as bytes (to compare)."""
    kind, items = _outcome(fn, data)
    if kind == "error":
        return kind, items
    assert all(type(k) is bytes and type(v) is memoryview for k, v in items), items
    return kind, [(k, bytes(v)) for k, v in items]


def check(data: bytes) -> None:
    """AssertionError unless every native decoder agrees with its Python definition."""
    lib = native.lib
    assert lib is not None, native.description
    view = memoryview(data)
    assert _outcome(lib.decode_keys, data) == _outcome(p.py_decode_keys, view), data
    assert _outcome(lib.decode_values, data) == _outcome(p.py_decode_values, view), data
    assert lib.parse_gets(data) == p.py_parse_gets(data), data
    assert put_outcome(lib.decode_put, view) == put_outcome(p.py_decode_put, view), data


def inputs():  # -> SearchStrategy[bytes]; hypothesis is imported only when fuzzing
    from hypothesis import strategies as st

    keys = st.lists(st.binary(min_size=1, max_size=p.MAX_KEY_LEN), max_size=6)
    values = st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=6)
    items = st.lists(st.tuples(st.binary(min_size=1, max_size=p.MAX_KEY_LEN),
                               st.binary(max_size=300)), max_size=6)  # fmt: skip
    client = p.ClientConnection(b"k" * 32, b"fuzz")

    def get_chunk(keysets: list[list[bytes]]) -> bytes:
        return b"".join(client.send_get(ks, i) for i, ks in enumerate(keysets))

    def reply_payload(vs: list[bytes | None]) -> bytes:
        parts = p.get_reply_parts(0, [None if v is None else (v,) for v in vs])
        return b"".join(parts)[p.HEADER_SIZE :]

    valid = st.one_of(
        keys.map(lambda ks: b"".join(p._encode_keys(ks))),
        values.map(reply_payload),
        items.map(lambda its: client.send_put(its)[p.HEADER_SIZE :]),
        st.lists(keys, min_size=1, max_size=3).map(get_chunk),
    )
    edits = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4)

    def mutate(args: tuple[bytes, list[tuple[int, int]], int]) -> bytes:
        data, ed, cut = args
        b = bytearray(data)
        for pos, val in ed:
            if b:
                b[pos % len(b)] = val
        return bytes(b[: len(b) - cut % (len(b) + 1)]) if cut else bytes(b)

    return st.one_of(
        st.binary(max_size=300), st.tuples(valid, edits, st.integers(0, 50)).map(mutate)
    )


def random_inputs(rng: random.Random):  # -> Iterator[bytes]: inputs()'s shapes, faster
    client = p.ClientConnection(b"k" * 32, b"fuzz")

    def keys() -> list[bytes]:
        return [rng.randbytes(rng.randint(1, p.MAX_KEY_LEN)) for _ in range(rng.randint(0, 6))]

    def value() -> bytes | None:
        return None if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 300))

    while True:
        shape = rng.randrange(5)
        if shape == 0:
            yield rng.randbytes(rng.randint(0, 300))
            continue
        if shape == 1:
            data = b"".join(p._encode_keys(keys()))
        elif shape == 2:
            vs = [value() for _ in range(rng.randint(0, 6))]
            parts = p.get_reply_parts(0, [None if v is None else (v,) for v in vs])
            data = b"".join(parts)[p.HEADER_SIZE :]
        elif shape == 3:
            its = [(k, rng.randbytes(rng.randint(0, 300))) for k in keys()]
            data = client.send_put(its)[p.HEADER_SIZE :]
        else:
            n = rng.randint(1, 3)
            data = b"".join(client.send_get(keys(), i) for i in range(n))
        b = bytearray(data)
        for _ in range(rng.randint(0, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.5:
            del b[len(b) - rng.randint(0, len(b)) :]
        yield bytes(b)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="inputs to try")
    ap.add_argument("--engine", choices=("random", "hypothesis"), default="random")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if native.lib is None:
        print(f"memlend: nothing to fuzz: {native.description}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    if args.engine == "random":
        gen = random_inputs(random.Random(args.seed))
        for _ in range(args.n):
            check(next(gen))
        took = time.monotonic() - t0
        print(
            f"{args.n} inputs (random, seed {args.seed}): native and Python agreed ({took:.0f} s)"
        )
        return 0
    try:
        from hypothesis import HealthCheck, given, settings
    except ImportError:
        print("memlend: fuzz_native needs hypothesis (pip install memlend[test])", file=sys.stderr)
        return 2
    seen = [0]

    @settings(
        max_examples=args.n,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs())
    def run(data: bytes) -> None:
        seen[0] += 1
        check(data)

    run()
    took = time.monotonic() - t0
    print(f"{seen[0]} inputs (hypothesis): native and Python agreed ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
