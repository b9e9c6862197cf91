"""`memlend stats` on a real mount, and no second copy of the data in the page cache."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Mount, memlend
from memlend.bench.fuse_tools import drop_cache

KEYS = {
    "pid", "cache_size", "block_size", "policy", "local_hits", "local_misses",
    "disk_read_bytes", "disk_reads", "evictions", "resident_blocks", "remote_hits",
    "remote_misses",
}  # fmt: skip


def read_all(path: Path, chunk: int = 1 << 20) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            n += len(block)
    return n


@pytest.mark.tiers("memlend")
def test_stats_keys_and_counters(mount_factory) -> None:
    m = mount_factory("--cache-size", "8M", "--block-size", "4K", "--policy", "lru")
    s0 = json.loads(memlend("stats", str(m.mnt), "--json").stdout)
    assert s0.keys() >= KEYS
    assert s0["pid"] == m.pid
    assert (s0["cache_size"], s0["block_size"], s0["policy"]) == (8 << 20, 4096, "lru")
    assert s0["resident_blocks"] == 0

    size = 1 << 20  # 256 blocks: fits in the cache
    (m.backing / "f").write_bytes(random.Random(1).randbytes(size))

    assert read_all(m.mnt / "f") == size
    s1 = m.stats()
    assert s1["local_misses"] - s0["local_misses"] == 256
    assert s1["disk_read_bytes"] - s0["disk_read_bytes"] == size
    assert s1["disk_reads"] > s0["disk_reads"]
    assert s1["resident_blocks"] == 256
    assert s1["evictions"] == 0

    assert read_all(m.mnt / "f") == size  # second pass: all hits, no disk
    s2 = m.stats()
    assert s2["local_hits"] - s1["local_hits"] >= 256  # more if a request splits a block
    # The read at end of file (how every reader finds it) is no miss, and no disk read.
    assert s2["local_misses"] == s1["local_misses"]
    assert (s2["disk_reads"], s2["disk_read_bytes"]) == (s1["disk_reads"], s1["disk_read_bytes"])
    assert s2["resident_blocks"] == 256
    assert s2["remote_hits"] == s2["remote_misses"] == 0  # no remote tier configured

    # A file bigger than the cache: evictions, and residency stays within the cache.
    (m.backing / "big").write_bytes(bytes(16 << 20))
    read_all(m.mnt / "big")
    s3 = m.stats()
    assert s3["evictions"] > 0
    assert 0 < s3["resident_blocks"] <= s3["slots"] < (8 << 20) // 4096

    human = memlend("stats", str(m.mnt)).stdout
    assert "local hits" in human
    assert str(s3["local_hits"]) in human  # the live value, not a stale one


@pytest.mark.tiers("kernel")
def test_stats_of_the_kernel_tier(mount_factory) -> None:
    """The kernel tier counts what reaches memlend: the page cache's misses, in blocks."""
    m = mount_factory("--block-size", "4K")
    s0 = m.stats()
    assert (s0["local_tier"], s0["slots"], s0["resident_blocks"]) == ("kernel", 0, 0)
    size = 1 << 20
    (m.backing / "f").write_bytes(random.Random(1).randbytes(size))
    assert read_all(m.mnt / "f") == size
    s1 = m.stats()
    assert s1["local_misses"] - s0["local_misses"] == 256
    assert s1["disk_read_bytes"] - s0["disk_read_bytes"] == size
    assert read_all(m.mnt / "f") == size  # from the page cache: memlend sees nothing
    s2 = m.stats()
    assert s2["local_misses"] == s1["local_misses"]
    assert s2["disk_read_bytes"] == s1["disk_read_bytes"]
    human = memlend("stats", str(m.mnt)).stdout
    assert "kernel page cache" in human and "page-cache misses" in human
    assert str(s2["local_misses"]) in human


def resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def test_no_double_caching(mount: Mount, local_tier: str) -> None:
    if shutil.which("fincore") is None:
        pytest.fail("fincore (util-linux) is not installed")
    size = 32 << 20
    b, f = mount.backing / "big", mount.mnt / "big"
    chunk = random.Random(2).randbytes(1 << 20)
    with open(b, "wb") as w:
        for _ in range(size >> 20):
            w.write(chunk)
    drop_cache(b)
    assert resident_bytes(b) < 1 << 20, "could not evict the file to start with"

    assert read_all(f) == size
    assert read_all(f) == size
    assert resident_bytes(b) < 256 << 10, "BACKING's pages are in the page cache too"
    if local_tier == "memlend":
        assert mount.stats()["disk_read_bytes"] >= size
        assert resident_bytes(f) == 0, "the mount's pages are in the page cache"
    else:  # the page cache is the one local copy: the second read came from it
        assert size <= mount.stats()["disk_read_bytes"] < size + (1 << 20)
        assert resident_bytes(f) > size // 2, "the mount's pages are not in the page cache"

    # Control: a plain read of BACKING does fill the page cache (fincore can see it).
    read_all(b)
    assert resident_bytes(b) > size // 2
    drop_cache(b)
