"""The testbed's matrix (disk profiles, configurations) and `memlend bench`'s options,
apart from the testbed itself: building the CLI's parser (every `memlend` command)
imports this, not the testbed."""

from __future__ import annotations

import argparse

from memlend.bench import workloads as wl

DISKS: dict[str, tuple[int | None, int | None]] = {  # read IOPS, read bytes/s
    "hdd": (200, 150_000_000),
    "cloud": (1000, 100_000_000),
    "none": (None, None),
}
# local/lender/lenders/memcached: memlend's own cache as the first tier; kernel and
# kernel-lender: the kernel page cache as the first tier (--local-tier kernel);
# kernel-wb: that with the kernel's writeback cache (--writeback-cache). cfuse, only on
# request (--config cfuse --cfuse BINARY): not memlend but a C FUSE passthrough, such as
# libfuse's passthrough_ll, mounted the same way: what any FUSE file system costs here.
CONFIGS = (
    "pagecache", "local", "kernel", "kernel-wb", "lender", "kernel-lender", "lenders",
    "memcached", "ideal",
)  # fmt: skip
EXTRA_CONFIGS = ("cfuse",)
REMOTE_CONFIGS = ("lender", "kernel-lender", "lenders", "memcached")
QUICK_CONFIGS = ("pagecache", "local", "lender", "kernel-lender", "ideal")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="reduced matrix, small sizes (~2 min)")
    p.add_argument("--out", default="bench-out", help="directory for results (default bench-out)")
    p.add_argument(
        "--disk",
        action="append",
        metavar="PROFILE",
        help=f"disk profile: {', '.join(DISKS)} (repeatable; default cloud)",
    )
    p.add_argument(
        "--client-memory", metavar="SIZE", help="client VM memory (default 512M; 192M quick)"
    )
    p.add_argument("--dataset", metavar="SIZE", help="data set size (default 4x client memory)")
    p.add_argument(
        "--workload", nargs="+", action="extend", metavar="NAME", help=", ".join(wl.WORKLOADS)
    )
    p.add_argument(
        "--config",
        nargs="+",
        action="extend",
        metavar="NAME",
        help=", ".join(CONFIGS) + "; on request also cfuse (needs --cfuse)",
    )
    p.add_argument(
        "--cfuse",
        metavar="BINARY",
        help="a C FUSE passthrough in libfuse's passthrough_ll style (run as BINARY -f -o "
        "source=BACKING,xattr,default_permissions MNT) for the reference config cfuse",
    )
    p.add_argument("--seconds", type=float, help="run time per cell (default 20; 6 quick)")
    p.add_argument(
        "--no-netns",
        action="store_true",
        help="client and lenders on loopback instead of network namespaces linked by veth",
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="copy the mount's and the lenders' logs to OUT/logs before removing the testbed",
    )
