"""FOPEN_NOFLUSH for writers on file systems without a flush operation (ext4, xfs,
btrfs, tmpfs): their close(2) costs no FLUSH round trip, while a writer on any other
file system (NFS, CIFS, FUSE: close reports deferred write errors there) keeps it."""

from __future__ import annotations

import os
from pathlib import Path

from memlend.fs import passthrough as pt
from memlend.fs.cache import BlockCache
from memlend.fuse import wire
from memlend.fuse.api import Context
from memlend.fuse.mount import fs_type
from memlend.stats import MountStats

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:32 / /mnt/nfs rw,relatime shared:9 master:3 - nfs4 srv:/export rw,vers=4.2
36 22 0:33 / /dev/shm rw - tmpfs tmpfs rw
"""


def test_fs_type_reads_the_mount_table(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert fs_type(os.makedev(254, 0), str(info)) == "ext4"
    assert fs_type(os.makedev(0, 32), str(info)) == "nfs4"  # optional fields skipped
    assert fs_type(os.makedev(0, 33), str(info)) == "tmpfs"
    assert fs_type(os.makedev(9, 9), str(info)) is None
    assert "nfs4" not in pt.NO_FLUSH_FS and "fuse" not in pt.NO_FLUSH_FS


def open_flags(fs: pt.Passthrough, name: bytes, flags: int) -> int:
    node, _ = fs.lookup(Context(0, 0, 0), wire.ROOT_ID, name)
    fh, open_flags = fs.open(Context(0, 0, 0), node, flags)
    fs.release(node, fh)
    return open_flags


def test_writers_skip_flush_only_where_close_reports_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fs = pt.Passthrough(str(tmp_path), BlockCache(1 << 20, 4096, "lru", MountStats()), MountStats())
    local = fs_type(os.stat(tmp_path).st_dev) in pt.NO_FLUSH_FS
    assert bool(open_flags(fs, b"f", os.O_RDWR) & wire.FOPEN_NOFLUSH) == local
    assert open_flags(fs, b"f", os.O_RDONLY) & wire.FOPEN_NOFLUSH  # readers never flush
    fs._noflush_dev = None  # as on NFS
    assert not open_flags(fs, b"f", os.O_WRONLY) & wire.FOPEN_NOFLUSH
    assert open_flags(fs, b"f", os.O_RDONLY) & wire.FOPEN_NOFLUSH
