"""FUSE passthrough in the kernel tier (issue 9, Postmark): small files opened for
writing, and from then on every open of them, are read and written by the kernel on
the backing file itself. The daemon sees no WRITE (its `writes` counter stays), the
data is right through the mount and in the backing store, and the kernel's rule (all
handles of an inode in one mode) never turns an open into EIO. With a lender, a file
written so is lent when its last writer closes (fs/written.py) and read back from the
lender once the backing store's page cache dropped it, also after the kernel forgot it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Mount
from memlend.bench.fuse_tools import drop_cache
from test_mount_remote import all_active, delta, remote_opts, settle, stats, wait_for

pytestmark = [
    pytest.mark.tiers("kernel"),
    pytest.mark.skipif(os.geteuid() != 0, reason="passthrough needs root (its ioctl)"),
]
KiB = 1 << 10


def writes(m: Mount) -> int:
    return m.stats().get("writes", 0)


def write(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        for i in range(0, len(data), 4 * KiB):  # Postmark's 4 KiB writes
            os.write(fd, data[i : i + 4 * KiB])
    finally:
        os.close(fd)


def put_uncached(path: Path, data: bytes) -> None:
    """Write a backing file and drop its pages: the mount then reads it through its
    own page cache tier (a file whose pages the backing store caches is passed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


@pytest.fixture
def pt_mount(mount_factory: Callable[..., Mount]) -> Mount:
    m = mount_factory("--block-size", "4K")
    if not m.stats().get("passthrough"):
        pytest.skip("this kernel does not grant FUSE passthrough (Linux 6.9+)")
    return m


def test_small_written_files_are_the_kernels(pt_mount: Mount) -> None:
    m = pt_mount
    data = os.urandom(34 * KiB)
    before = writes(m)
    write(m.mnt / "f", data)
    write(m.mnt / "f", b"tail" * 1000, os.O_WRONLY | os.O_APPEND)  # Postmark's append
    assert writes(m) == before  # not one WRITE reached the daemon
    want = data + b"tail" * 1000
    assert read(m.mnt / "f") == want == (m.backing / "f").read_bytes()
    assert os.stat(m.mnt / "f").st_size == len(want)
    # A file written so is read through the kernel too (its pages are the backing
    # file's), and sees a change made outside the mount at its next open.
    (m.backing / "f").write_bytes(b"outside")
    assert read(m.mnt / "f") == b"outside"


def test_open_handles_keep_one_mode_per_inode(pt_mount: Mount) -> None:
    m = pt_mount
    put_uncached(m.backing / "g", b"a" * 8 * KiB)
    # A reader through the page cache first: a writer opened meanwhile must not be
    # put in passthrough (the kernel would fail its open with EIO): the daemon writes.
    r = os.open(m.mnt / "g", os.O_RDONLY)
    try:
        assert os.pread(r, 4 * KiB, 0) == b"a" * 4 * KiB
        before = writes(m)
        w = os.open(m.mnt / "g", os.O_WRONLY)
        try:
            os.pwrite(w, b"b" * 4 * KiB, 0)
        finally:
            os.close(w)
        assert writes(m) == before + 1
        assert os.pread(r, 4 * KiB, 0) == b"b" * 4 * KiB
    finally:
        os.close(r)
    # Now a writer in passthrough first: a reader opened meanwhile joins it.
    before = writes(m)
    w = os.open(m.mnt / "g", os.O_WRONLY)
    try:
        os.pwrite(w, b"c" * 4 * KiB, 0)
        r = os.open(m.mnt / "g", os.O_RDONLY)
        try:
            assert os.pread(r, 8 * KiB, 0) == b"c" * 4 * KiB + b"a" * 4 * KiB
            os.pwrite(w, b"d" * 4 * KiB, 4 * KiB)
            assert os.pread(r, 4 * KiB, 4 * KiB) == b"d" * 4 * KiB
        finally:
            os.close(r)
    finally:
        os.close(w)
    assert writes(m) == before


def test_files_the_backing_store_caches_are_passed(pt_mount: Mount) -> None:
    m = pt_mount
    (m.backing / "cached").write_bytes(b"c" * 8 * KiB)  # its pages stay cached
    put_uncached(m.backing / "cold", b"d" * 8 * KiB)
    before = m.stats()["passthrough_opens"]
    assert read(m.mnt / "cached") == b"c" * 8 * KiB
    assert m.stats()["passthrough_opens"] == before + 1
    assert read(m.mnt / "cold") == b"d" * 8 * KiB  # through the page cache tier
    assert m.stats()["passthrough_opens"] == before + 1


def test_big_and_set_id_files_stay_with_the_daemon(pt_mount: Mount) -> None:
    m = pt_mount
    before = writes(m)
    write(m.mnt / "big", os.urandom(2 << 20))  # empty at open: small, passthrough
    assert writes(m) == before
    write(m.mnt / "big", b"x" * 4 * KiB, os.O_WRONLY)  # 2 MiB at open, written before
    assert writes(m) == before  # once written so, always the kernel's
    (m.backing / "large").write_bytes(b"y" * (2 << 20))
    write(m.mnt / "large", b"z" * 4 * KiB, os.O_WRONLY)
    assert writes(m) == before + 1  # big and never written so: the daemon's
    (m.backing / "setid").write_bytes(b"s" * 4 * KiB)
    os.chmod(m.backing / "setid", 0o4777)
    write(m.mnt / "setid", b"t" * 4 * KiB, os.O_WRONLY)
    assert writes(m) == before + 2  # the daemon clears set-ID bits (kill-priv)
    assert read(m.mnt / "setid") == b"t" * 4 * KiB


def test_no_passthrough_option(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--no-passthrough")
    assert not m.stats().get("passthrough")
    before = writes(m)
    write(m.mnt / "f", b"w" * 8 * KiB)
    assert writes(m) == before + 2
    assert read(m.mnt / "f") == b"w" * 8 * KiB


def test_lent_blocks_of_a_file_written_in_passthrough_are_never_served(
    mount_factory, lender_factory, secret_file: Path, seal_key_file: Path
) -> None:
    lender = lender_factory()
    m = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=secret_file))
    old = os.urandom(256 * KiB)
    put_uncached(m.backing / "f", old)
    assert read(m.mnt / "f") == old  # read from disk: every block lent
    new = os.urandom(256 * KiB)
    write(m.mnt / "f", new, os.O_WRONLY)  # in passthrough: the daemon never sees it
    fd = os.open(m.mnt / "f", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert read(m.mnt / "f") == new


@pytest.fixture
def lent_mount(mount_factory, lender_factory, secret_file: Path, seal_key_file: Path) -> Mount:
    """A kernel-tier mount in passthrough with one active lender."""
    lender = lender_factory()
    m = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=secret_file))
    if not m.stats().get("passthrough"):
        pytest.skip("this kernel does not grant FUSE passthrough (Linux 6.9+)")
    all_active(m)
    return m


def test_files_written_in_passthrough_are_lent_and_read_back_from_the_lender(
    lent_mount: Mount,
) -> None:
    m = lent_mount
    bs = m.stats()["block_size"]
    f, data = m.mnt / "f", os.urandom(5 * bs + 100)

    def lent_after(change: Callable[[], None], blocks: int) -> None:
        want = stats(m)["written_lent_blocks"] + blocks
        change()
        wait_for(lambda: stats(m)["written_lent_blocks"] >= want, 10, "the lend")
        settle(m)

    def dropped_then_read(want: bytes) -> dict:
        """Drop the backing store's copy (memory pressure), read through the mount."""
        drop_cache(m.backing / "f")
        s0 = stats(m)
        assert read(f) == want
        return delta(s0, stats(m))

    lent_after(lambda: write(f, data), 6)  # in passthrough: the daemon never sees them...
    assert writes(m) == 0
    p = dropped_then_read(data)  # ...yet the lenders serve them once the disk would
    assert p["remote_hits"] >= 6 and p["disk_read_bytes"] == 0, p
    # An append is a new version: lent whole (its pages are in the backing store's
    # page cache again), and the old version's blocks never served.
    (m.backing / "f").read_bytes()
    more = os.urandom(3000)
    lent_after(lambda: write(f, more, os.O_WRONLY | os.O_APPEND), 6)
    data += more
    p = dropped_then_read(data)
    assert p["remote_hits"] >= 6 and p["disk_read_bytes"] == 0, p
    # Appended once its pages are gone: nothing to lend without a disk read (none is
    # made for it), so the next read is the disk's, right.
    before = stats(m)["written_lent_blocks"]
    drop_cache(m.backing / "f")
    more = os.urandom(5000)
    write(f, more, os.O_WRONLY | os.O_APPEND)
    data += more
    time.sleep(0.5)
    assert stats(m)["written_lent_blocks"] == before
    assert dropped_then_read(data)["remote_hits"] == 0
    # Changed outside the mount (same size): read from the backing file, not the lender.
    changed = os.urandom(len(data))
    (m.backing / "f").write_bytes(changed)
    assert dropped_then_read(changed)["remote_hits"] == 0
    assert stats(m)["seal_failures"] == 0


# It drops the kernel's caches: not beside the testbed's runs (see test_mount_dirents).
@pytest.mark.xdist_group("testbed")
def test_lent_files_are_found_again_after_the_kernel_forgets_them(lent_mount: Mount) -> None:
    m = lent_mount
    bs = m.stats()["block_size"]
    files = {f"f{i}": os.urandom(2 * bs + i) for i in range(20)}
    before = stats(m)["inodes"]
    for name, data in files.items():
        write(m.mnt / name, data)
    wait_for(lambda: stats(m)["written_lent_blocks"] >= 59, 10, "the lends")
    settle(m)
    # The kernel forgets the files (their dentries and inodes dropped), the backing
    # store's page cache drops their pages.
    deadline = time.monotonic() + 20
    while stats(m)["inodes"] > before and time.monotonic() < deadline:
        Path("/proc/sys/vm/drop_caches").write_text("2")
        time.sleep(0.3)
    assert stats(m)["inodes"] <= before, "the kernel did not forget the files"
    assert stats(m)["lent_files_forgotten"] == len(files)
    for name in files:
        drop_cache(m.backing / name)
    # f0 is replaced outside the mount by a file of the same size (ext4 may give it
    # the same inode number): the lent f0 must not be served for it.
    ino = (m.backing / "f0").stat().st_ino
    (m.backing / "f0").unlink()
    files["f0"] = os.urandom(len(files["f0"]))
    (m.backing / "f0").write_bytes(files["f0"])
    drop_cache(m.backing / "f0")
    s0 = stats(m)
    for name, data in files.items():
        assert read(m.mnt / name) == data, name
    p = delta(s0, stats(m))
    assert p["remote_hits"] == 57 and p["disk_reads"] >= 1, (p, ino)
