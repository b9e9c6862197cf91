"""Trace replay: run block traces through the very policy classes the mount uses.

    memlend sim TRACE [TRACE...] --policy NAME[,NAME...] --size S[,S...]

A trace is a list of block keys. Each access is replayed as the local tier does it
(`key in policy` -> touch, else admit), so a miss ratio measured here is the one the
mount's replacement decisions would give on the same block stream.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memlend import plotting
from memlend.errors import UserError
from memlend.policies import POLICIES, make_policy
from memlend.shards import mean_absolute_error, sample, sampled_miss_ratio, threshold
from memlend.sizes import parse_size

DEFAULT_SIZES = "1%,5%,10%,25%"
SYNTHETIC_PREFIX = "synthetic:"

# ------------------------------------------------------------------ synthetic


def hotscan_trace(seed: int = 42) -> list[int]:
    """A hot set re-read with Zipf-like skew, interleaved with long one-time scans.

    Sized around a nominal cache of 1000 blocks: a hot set of 200 blocks (20%),
    ten rounds of 5000 hot accesses followed by a scan of 3000 never-reused blocks
    (3x the cache) during which every fourth access still goes to the hot set (the
    application keeps running while, say, a backup reads everything once).
    Deterministic for a given seed.
    """
    rng = random.Random(seed)
    hot = 200
    # Zipf(1) weights over the hot blocks, shuffled so popularity is not block order.
    ranks = list(range(hot))
    rng.shuffle(ranks)
    weights = [1.0 / (r + 1) for r in ranks]
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)

    def hot_block() -> int:
        return rng.choices(range(hot), cum_weights=cum)[0]

    trace: list[int] = []
    next_scan = 1_000_000  # scan blocks never collide with hot ones
    for _ in range(10):
        trace.extend(hot_block() for _ in range(5000))
        for i in range(4000):
            if i % 4 == 3:
                trace.append(hot_block())
            else:
                trace.append(next_scan)
                next_scan += 1
    return trace


# The re-read trade-off (docs/policies.md, "Why no policy is the best classic on
# every row"): both start with the same 18,432 distinct blocks (a 256 MiB scan,
# then a 32 MiB file, in 16 KiB blocks); then `scan-reread` reads the file again
# (the newest 2,048 blocks: LRU, ARC and lirs-lazy hit them) and `scan-loop` reads
# the first 2,048 blocks again (the oldest: LIRS's cold start made them LIR). A
# cache holds the same blocks after the same prefix whatever comes next, so at
# 3,400 blocks no policy can hit all 4,096 of the two endings.
REREAD_SCAN, REREAD_FILE = 16384, 2048


def scan_reread_trace() -> list[int]:
    prefix = list(range(REREAD_SCAN + REREAD_FILE))
    return prefix + prefix[REREAD_SCAN:]


def scan_loop_trace() -> list[int]:
    prefix = list(range(REREAD_SCAN + REREAD_FILE))
    return prefix + prefix[:REREAD_FILE]


SYNTHETIC: dict[str, Callable[[], list[int]]] = {
    "hotscan": hotscan_trace,
    "scan-reread": scan_reread_trace,
    "scan-loop": scan_loop_trace,
}

# --------------------------------------------------------------------- traces


def _open_text(path: Path) -> io.TextIOBase:
    """Open `path` as text, gunzipping it if it starts with the gzip magic bytes."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - wrapped and returned
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a trace file") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    binary: io.BufferedIOBase = raw
    if raw.peek(2)[:2] == b"\x1f\x8b":
        binary = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    # Undecodable bytes become U+FFFD so that they fail as "not a block number"
    # with a line number instead of as a UnicodeDecodeError.
    return io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="")


def _read_guarded(path: Path, reader: Callable[[io.TextIOBase], list[int]]) -> list[int]:
    with _open_text(path) as f:
        try:
            return reader(f)
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise UserError(f"{path}: corrupt or truncated gzip data") from None
        except OSError as e:
            raise UserError(f"{path}: {e.strerror or e}") from None


def read_lines_trace(path: str | Path) -> list[int]:
    """One block number per line; blank lines and lines starting with `*` skipped."""
    path = Path(path)

    def parse(f: io.TextIOBase) -> list[int]:
        out: list[int] = []
        append = out.append
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text[0] == "*":
                continue
            try:
                block = int(text)
            except ValueError:
                shown = text if len(text) <= 40 else text[:40] + "..."
                raise UserError(
                    f"{path}, line {lineno}: expected a block number, got {shown!r}"
                ) from None
            if block < 0:
                raise UserError(f"{path}, line {lineno}: negative block number {block}")
            append(block)
        return out

    return _read_guarded(path, parse)


def read_csv_trace(path: str | Path, block_size: int = 4096) -> list[int]:
    """CSV with a header naming `offset` and `size` columns (bytes); each row is
    turned into the blocks of `block_size` bytes that it covers."""
    path = Path(path)

    def parse(f: io.TextIOBase) -> list[int]:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty CSV file (expected a header with offset,size)")
        names = [h.strip().lower() for h in header]
        if "offset" not in names or "size" not in names:
            raise UserError(
                f"{path}: CSV header needs 'offset' and 'size' columns "
                f"(found: {', '.join(h.strip() for h in header) or 'none'})"
            )
        i_off, i_size = names.index("offset"), names.index("size")
        need = max(i_off, i_size) + 1
        out: list[int] = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) < need:
                raise UserError(f"{where}: expected at least {need} columns, got {len(row)}")
            try:
                offset = int(row[i_off])
                size = int(row[i_size])
            except ValueError:
                raise UserError(
                    f"{where}: offset and size must be whole numbers of bytes, "
                    f"got {row[i_off].strip()!r} and {row[i_size].strip()!r}"
                ) from None
            if offset < 0 or size < 0:
                raise UserError(f"{where}: negative offset or size")
            if size:
                out.extend(range(offset // block_size, (offset + size - 1) // block_size + 1))
        return out

    return _read_guarded(path, parse)


def load_trace(spec: str, fmt: str = "lines", block_size: int = 4096) -> list[int]:
    """The block keys of trace `spec`: a file, or `synthetic:NAME`."""
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX) :]
        try:
            return SYNTHETIC[name]()
        except KeyError:
            known = ", ".join(SYNTHETIC_PREFIX + n for n in SYNTHETIC)
            raise UserError(f"unknown synthetic trace {spec!r} (known: {known})") from None
    if fmt == "csv":
        trace = read_csv_trace(spec, block_size)
    elif fmt == "lines":
        trace = read_lines_trace(spec)
    else:
        raise UserError(f"unknown trace format {fmt!r} (expected lines or csv)")
    if not trace:
        raise UserError(f"{spec}: the trace has no accesses")
    return trace


# ---------------------------------------------------------------- size/policy


def _size_error(text: str, why: str) -> UserError:
    return UserError(f"invalid cache size {text!r} ({why})")


def parse_cache_size(text: str, unique_blocks: int, block_size: int = 4096) -> int:
    """Cache size in blocks from `500` (blocks), `10%` (of the trace's unique
    blocks, at least 1) or a byte size with a unit such as `64M`."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise _size_error(text, "expected a percentage such as 10%") from None
        if not math.isfinite(pct) or pct <= 0:
            raise _size_error(text, "a percentage must be greater than 0")
        return max(1, round(unique_blocks * pct / 100))
    if t.lstrip("+-").isdigit():
        n = int(t)
        if n < 1:
            raise _size_error(text, "must be at least 1 block")
        return n
    if t.replace(".", "", 1).isdigit():
        raise _size_error(text, "a number of blocks must be a whole number")
    try:
        nbytes = parse_size(t)
    except UserError:
        raise _size_error(
            text,
            "expected blocks like 500, a percentage of the trace's unique blocks like "
            "10%, or bytes with a K, M, G or T suffix like 64M",
        ) from None
    if nbytes < block_size:
        raise _size_error(text, f"smaller than one {block_size}-byte block")
    return nbytes // block_size


def parse_policies(text: str | None) -> list[str]:
    """Policy names from `arc,lru`; None or `all` means every registered policy,
    LRU first since it is the baseline the others are compared with."""
    if text is None or text.strip().lower() == "all":
        return sorted(POLICIES, key=lambda n: n != "lru")
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("no policy given (expected e.g. --policy lru,arc)")
    for n in names:
        if n not in POLICIES:
            raise UserError(f"unknown policy {n!r} (known: {', '.join(sorted(POLICIES))})")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------- replaying


@dataclass
class SimResult:
    policy: str
    size_blocks: int
    accesses: int
    misses: int
    seconds: float  # wall time of the replay loop alone

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.accesses if self.accesses else 0.0

    @property
    def ns_per_access(self) -> float:
        return self.seconds * 1e9 / self.accesses if self.accesses else 0.0


def simulate(trace: Sequence[Hashable], policy: str, size_blocks: int) -> SimResult:
    """Replay `trace` through a fresh `policy` of `size_blocks` blocks."""
    p = make_policy(policy, size_blocks)
    touch, admit = p.touch, p.admit
    misses = 0
    t0 = time.perf_counter()
    for key in trace:
        if key in p:
            touch(key)
        else:
            admit(key)
            misses += 1
    elapsed = time.perf_counter() - t0
    return SimResult(policy, size_blocks, len(trace), misses, elapsed)


def miss_ratios(
    trace: Sequence[Hashable], policies: Sequence[str], sizes_blocks: Sequence[int]
) -> list[SimResult]:
    """Every policy at every size over `trace` (sizes outer, policies inner)."""
    return [simulate(trace, p, s) for s in sizes_blocks for p in policies]


# ------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `memlend sim`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    synth = ", ".join(SYNTHETIC_PREFIX + n for n in SYNTHETIC)
    parser.epilog = (
        "examples:\n"
        "  memlend sim trace.gz\n"
        "  memlend sim a.trace b.trace --policy lru,s3fifo --size 500,5%\n"
        "  memlend sim io.csv --format csv --block-size 64K --size 256M --json\n"
        "  memlend sim synthetic:hotscan --plot curves.png\n"
        "  memlend sim trace.gz --policy lru --size 1%,5%,10%,25% --sample 0.01\n"
    )
    parser.add_argument(
        "traces",
        nargs="+",
        metavar="TRACE",
        help=f"trace file (gzip accepted), or a synthetic trace: {synth}",
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="NAME[,NAME...]",
        help=f"policies to compare (default: all: {', '.join(parse_policies(None))})",
    )
    parser.add_argument(
        "--size",
        default=DEFAULT_SIZES,
        metavar="S[,S...]",
        help="cache sizes: blocks (500), percent of the trace's unique blocks (10%%), "
        f"or bytes with a unit (64M, divided by --block-size) "
        f"(default: {DEFAULT_SIZES.replace('%', '%%')})",
    )
    parser.add_argument(
        "--format",
        choices=("lines", "csv"),
        default="lines",
        help="lines: one block number per line, '*' lines skipped; csv: a header with "
        "offset and size columns in bytes (default: lines)",
    )
    parser.add_argument(
        "--block-size",
        default="4K",
        metavar="SIZE",
        help="block size for csv traces and byte cache sizes (default: 4K)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of results instead of a table"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="also draw miss-ratio curves")
    parser.add_argument(
        "--sample",
        type=float,
        default=None,
        metavar="RATE",
        help="also estimate every miss ratio from a spatially hashed sample of the "
        "trace (SHARDS_adj: a block is sampled when hash(block) mod P < RATE x P; cache "
        "sizes scaled by RATE; misses counted over the references expected at RATE) and "
        "report its mean absolute error against the exact curve, e.g. --sample 0.01",
    )


@dataclass
class TraceRun:
    trace: str
    accesses: int
    unique_blocks: int
    sizes: list[tuple[str, int]]  # (as given, blocks)
    results: list[SimResult]
    sampled: list[float] | None = None  # SHARDS estimate of each result's miss ratio
    sample_rate: float | None = None

    def mae(self, policy: str | None = None) -> float:
        """Mean absolute error of the sampled curve (one policy's, or all)."""
        assert self.sampled is not None
        pairs = [
            (r.miss_ratio, e)
            for r, e in zip(self.results, self.sampled, strict=True)
            if policy is None or r.policy == policy
        ]
        return mean_absolute_error([a for a, _ in pairs], [b for _, b in pairs])


def run(args: argparse.Namespace) -> int:
    """Execute `memlend sim`; returns the exit status."""
    policies = parse_policies(args.policy)
    block_size = parse_size(args.block_size)
    size_specs = [s.strip() for s in str(args.size).split(",") if s.strip()]
    if not size_specs:
        raise UserError("no cache size given (expected e.g. --size 1%,500)")
    for spec in size_specs:  # syntax errors before any slow trace loading
        parse_cache_size(spec, 1, block_size)
    if args.sample is not None:
        threshold(args.sample)  # a bad rate fails before any slow work
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise UserError(f"--plot {args.plot!r}: expected a .png file name")
    if args.plot and not plotting.available():
        raise UserError(f"--plot: {plotting.HINT}")  # before any slow work

    runs: list[TraceRun] = []
    for spec in args.traces:
        trace = load_trace(spec, args.format, block_size)
        unique = len(set(trace))
        sizes = [(s, parse_cache_size(s, unique, block_size)) for s in size_specs]
        results = miss_ratios(trace, policies, [b for _, b in sizes])
        run = TraceRun(spec, len(trace), unique, sizes, results)
        if args.sample is not None:
            sampled = sample(trace, args.sample)
            run.sample_rate = args.sample
            run.sampled = [
                sampled_miss_ratio(sampled, r.policy, r.size_blocks, args.sample, len(trace))
                for r in results
            ]
        runs.append(run)

    if args.json:
        json.dump(to_json(runs), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_tables(runs, policies)
    if args.plot:
        plot(runs, policies, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def to_json(runs: list[TraceRun]) -> list[dict]:
    out = []
    for r in runs:
        per_size = len(r.results) // len(r.sizes)
        for i, res in enumerate(r.results):
            out.append(
                {
                    "trace": r.trace,
                    "policy": res.policy,
                    "size": r.sizes[i // per_size][0],
                    "size_blocks": res.size_blocks,
                    "accesses": res.accesses,
                    "unique_blocks": r.unique_blocks,
                    "misses": res.misses,
                    "miss_ratio": res.miss_ratio,
                }
            )
            if r.sampled is not None:
                out[-1]["sample_rate"] = r.sample_rate
                out[-1]["sampled_miss_ratio"] = r.sampled[i]
    return out


def print_tables(runs: list[TraceRun], policies: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # Wide enough that no policy name wraps (a pipe gets 80 columns otherwise).
    cell = 14 if any(r.sampled is not None for r in runs) else 6
    needed = 24 + sum(max(len(p), cell) + 3 for p in policies)
    if console.width < needed:
        console = Console(width=needed)
    for r in runs:
        table = Table(
            title=f"{r.trace}: {r.accesses:,} accesses, {r.unique_blocks:,} unique blocks",
            caption="miss ratio; best per row in bold",
        )
        table.add_column("size", justify="right")
        table.add_column("blocks", justify="right")
        for p in policies:
            table.add_column(p, justify="right", no_wrap=True)
        n = len(policies)
        for i, (spec, blocks) in enumerate(r.sizes):
            row = r.results[i * n : (i + 1) * n]
            best = min(x.misses for x in row)
            cells = [
                f"[bold]{x.miss_ratio:.4f}[/bold]" if x.misses == best else f"{x.miss_ratio:.4f}"
                for x in row
            ]
            if r.sampled is not None:
                est = r.sampled[i * n : (i + 1) * n]
                cells = [f"{c} ~{e:.4f}" for c, e in zip(cells, est, strict=True)]
            table.add_row(spec, f"{blocks:,}", *cells)
        if r.sampled is not None:
            table.add_row("MAE", "", *(f"{r.mae(p):.4f}" for p in policies))
            table.caption = (
                f"miss ratio ~ SHARDS estimate at rate {r.sample_rate:g}; best per row in "
                f"bold; MAE of the sampled curve, all policies: {r.mae():.4f}"
            )
        console.print(table)


def plot(runs: list[TraceRun], policies: list[str], path: str) -> None:
    """Miss ratio against cache size, one panel per trace."""
    plt = plotting.pyplot()
    from matplotlib.ticker import NullFormatter

    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, runs, strict=False):
        for p in policies:
            pts = sorted((x.size_blocks, x.miss_ratio) for x in r.results if x.policy == p)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=p)
        ax.set_title(f"{Path(r.trace).name} ({r.unique_blocks:,} unique)", fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded labels on narrow ranges
        ax.set_xlabel("cache size (blocks)")
        ax.set_ylabel("miss ratio")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
