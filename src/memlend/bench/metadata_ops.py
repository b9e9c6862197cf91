"""Per-operation cost of small-file work, on several directories in one run.

    python -m memlend.bench.metadata_ops DIR [DIR ...] [--files 1500] [--size 32K]

For each DIR (a plain directory, a memlend mount, another FUSE file system...), in
turn and twice: create+write+close of --files files, stat of each, open+read+close of
each, `ls -l` of the directory (its time per file), and unlink of each;
prints µs per operation and the ratio to the first DIR. The
small-file side of Postmark, one operation kind at a time (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from memlend.errors import UserError
from memlend.sizes import parse_size

OPS = ("create+write+close", "stat", "open+read+close", "ls -l", "unlink")


def _time_ops(d: str, n: int, data: bytes, sync: bool = True) -> dict[str, float]:
    names = [os.path.join(d, f"memlend-ops-{i}") for i in range(n)]
    out: dict[str, float] = {}

    def create() -> None:
        for p in names:
            with open(p, "wb") as f:
                f.write(data)

    def stat() -> None:
        for p in names:
            os.stat(p)

    def read() -> None:
        for p in names:
            with open(p, "rb") as f:
                f.read()

    def listing() -> None:  # the real program: names, attributes, and its xattr queries
        subprocess.run(["ls", "-l", d], stdout=subprocess.DEVNULL, check=True)

    def unlink() -> None:
        for p in names:
            os.unlink(p)

    for op, fn in zip(OPS, (create, stat, read, listing, unlink), strict=True):
        # The disk quiet first: the previous directory's write-back (48 MB of creates)
        # otherwise lands in whichever directory comes next.
        if sync:
            os.sync()
        t = time.perf_counter()
        fn()
        out[op] = (time.perf_counter() - t) / n * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--files", type=int, default=1500)
    ap.add_argument("--size", default="32K", help="bytes written to each file (default 32K)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per directory, best kept")
    ap.add_argument("--no-sync", dest="sync", action="store_false",
                    help="do not sync(2) before each phase (then the files are still in "
                    "delayed allocation when they are unlinked, and one directory's "
                    "write-back lands in the next one's figures)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        size = parse_size(args.size)
        for d in args.dirs:
            if not os.path.isdir(d):
                raise UserError(f"{d}: not a directory")
    except (UserError, ValueError) as e:
        print(f"metadata_ops: {e}")
        return 2
    data = os.urandom(size)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for d in args.dirs:  # interleaved: a load change hits every directory alike
            got = _time_ops(d, args.files, data, args.sync)
            mine = best.setdefault(d, got)
            for op in OPS:
                mine[op] = min(mine[op], got[op])
    base = best[args.dirs[0]]
    print(f"{'directory':40} " + " ".join(f"{op:>24}" for op in OPS))
    for d in args.dirs:
        cells = [f"{best[d][op]:8.0f} µs ({best[d][op] / base[op]:5.1f}x)" for op in OPS]
        print(f"{d[-40:]:40} " + " ".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
