"""Many files through a real mount whose daemon has a low descriptor limit: inodes are
known by file handle, so the daemon neither runs out of descriptors (EMFILE) nor
grows beyond its memory budget, however many files the kernel knows (DESIGN.md
invariant 7). Also deleted-but-open files, and hard links and renames of inodes whose
descriptor was evicted."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import MEMLEND, Mount, _wait_gone, force_unmount, memlend
from memlend.fs.passthrough import MAX_INODES

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs root"),
    pytest.mark.timeout(300),
]

MiB = 1 << 20


@pytest.fixture
def limited_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """limited_mount(nofile, *options) -> Mount: a daemon started under
    `prlimit --nofile=N:N`; always unmounted at teardown."""
    made: list[Mount] = []

    def make(nofile: int, *options: str) -> Mount:
        b, m = tmp_path / f"backing{len(made)}", tmp_path / f"mnt{len(made)}"
        b.mkdir()
        m.mkdir()
        log = tmp_path / f"mount{len(made)}.log"
        cmd = ["prlimit", f"--nofile={nofile}:{nofile}", *MEMLEND, "mount", str(b), str(m)]
        proc = subprocess.run([*cmd, *options, "--log-file", str(log)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        pid = json.loads(memlend("stats", str(m), "--json").stdout)["pid"]
        made.append(Mount(b, m, pid))
        return made[-1]

    try:
        yield make
    finally:
        for mt in made:
            try:
                subprocess.run([*MEMLEND, "umount", str(mt.mnt)], capture_output=True,
                               check=False, timeout=30)  # fmt: skip
            except subprocess.TimeoutExpired:
                pass
            force_unmount(mt.mnt)
            if not _wait_gone(mt.pid):
                os.kill(mt.pid, 9)


def daemon_fds(m: Mount) -> int:
    return len(os.listdir(f"/proc/{m.pid}/fd"))


def peak_rss(m: Mount) -> int:
    with open(f"/proc/{m.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_thirty_thousand_files_under_a_descriptor_limit_of_1024(
    limited_mount: Callable[..., Mount],
) -> None:
    # Each known inode held a descriptor: this failed with EMFILE after ~1,000 files.
    m = limited_mount(1024, "--cache-size", "64M", "--block-size", "4K")
    n, ndirs, through_mount = 30_000, 6, 3_000
    dirs = [f"d{i}" for i in range(ndirs)]
    for d in dirs:
        (m.mnt / d).mkdir()

    def name(i: int) -> str:
        return f"{dirs[i % ndirs]}/f{i}"

    # Most files are made in the backing directory (fast); the mount meets them all
    # below. Some are created through the mount, so its create path counts too.
    for i in range(through_mount, n):
        with open(m.backing / name(i), "wb") as f:
            f.write(b"%d\n" % i)
    for i in range(through_mount):
        fd = os.open(m.mnt / name(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"%d\n" % i)
        os.close(fd)
    fds = [daemon_fds(m)]

    seen = 0
    for d in dirs:  # `ls -l`: every name looked up, every inode known to the kernel
        with os.scandir(m.mnt / d) as it:
            for e in it:
                assert e.stat(follow_symlinks=False).st_size == len(e.name)  # "f12" -> b"12\n"
                seen += 1
    assert seen == n
    fds.append(daemon_fds(m))
    # Past MAX_INODES the daemon asks the kernel to forget the oldest (it answers with
    # FORGETs, a little later): the inode table stays bounded, not one entry per file.
    deadline = time.monotonic() + 5
    while m.stats()["inodes"] > MAX_INODES + 1024 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.stats()["inodes"] <= MAX_INODES + 1024

    passed = m.stats().get("passthrough_opens", 0)
    for i in range(n):
        with open(m.mnt / name(i), "rb", buffering=0) as f:
            assert f.read() == b"%d\n" % i, name(i)
    fds.append(daemon_fds(m))
    stats = m.stats()
    # Every file read from disk by the daemon, or (written through the mount in the
    # kernel tier, while the daemon still knows it) opened in passthrough.
    assert stats["disk_reads"] + stats.get("passthrough_opens", 0) - passed >= n

    for i in range(n):
        os.unlink(m.mnt / name(i))
    for d in dirs:
        assert os.listdir(m.mnt / d) == []
        assert os.listdir(m.backing / d) == []
        (m.mnt / d).rmdir()
    fds.append(daemon_fds(m))

    # 256 cached descriptors (a quarter of the limit), pins, open files, the rest.
    assert max(fds) < 400, f"daemon descriptors after each phase: {fds}"
    assert m.stats()["inode_reopens"] > 0  # evicted descriptors were reopened by handle
    hwm = peak_rss(m)
    assert hwm <= 64 * MiB + 64 * MiB, f"daemon peak RSS {hwm / MiB:.0f} MiB"


def test_unlinked_open_file_and_evicted_links_and_renames(
    limited_mount: Callable[..., Mount],
) -> None:
    # A limit of 256 leaves 64 cached descriptors: looking up 400 other files evicts.
    m = limited_mount(256, "--cache-size", "8M", "--block-size", "4K")
    mnt = m.mnt
    (mnt / "a").mkdir()
    (mnt / "b").mkdir()
    (mnt / "a" / "file").write_bytes(b"original")
    (mnt / "a" / "sub").mkdir()
    (mnt / "a" / "sub" / "inner").write_bytes(b"inner")
    os.symlink("file", mnt / "a" / "link")
    os.mkfifo(mnt / "a" / "fifo")
    keep = os.open(mnt / "a" / "open", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(keep, b"before")
    os.unlink(mnt / "a" / "open")

    others = mnt / "others"
    others.mkdir()
    for i in range(400):
        (others / f"o{i}").write_bytes(b"o")

    def evict() -> None:
        for e in os.scandir(others):
            e.stat(follow_symlinks=False)

    evict()
    # The unlinked file: read, written and stat'ed through its descriptor only.
    assert not (mnt / "a" / "open").exists()
    assert os.pread(keep, 100, 0) == b"before"
    assert os.pwrite(keep, b"AFTER!", 0) == 6
    os.fchmod(keep, 0o600)
    evict()
    assert os.pread(keep, 100, 0) == b"AFTER!"
    st = os.fstat(keep)
    assert st.st_nlink == 0 and st.st_size == 6 and st.st_mode & 0o777 == 0o600
    os.close(keep)

    # Hard link and renames of inodes (file, directory, symlink, fifo) that were evicted.
    os.link(mnt / "a" / "file", mnt / "b" / "hard")
    evict()
    os.rename(mnt / "a" / "file", mnt / "b" / "moved")
    os.rename(mnt / "a" / "sub", mnt / "b" / "sub")
    os.rename(mnt / "a" / "link", mnt / "b" / "link")
    os.rename(mnt / "a" / "fifo", mnt / "b" / "fifo")
    evict()
    assert (mnt / "b" / "hard").read_bytes() == b"original"
    assert (mnt / "b" / "moved").stat().st_nlink == 2
    assert (mnt / "b" / "moved").stat().st_ino == (mnt / "b" / "hard").stat().st_ino
    with open(mnt / "b" / "hard", "r+b") as f:
        f.write(b"CHANGED!")
    evict()
    assert (mnt / "b" / "moved").read_bytes() == b"CHANGED!"
    assert (mnt / "b" / "sub" / "inner").read_bytes() == b"inner"
    (mnt / "b" / "sub" / "new").write_bytes(b"new")
    assert os.readlink(mnt / "b" / "link") == "file"
    assert (mnt / "b" / "fifo").is_fifo()
    assert sorted(os.listdir(mnt / "a")) == []
    assert (m.backing / "b" / "sub" / "new").read_bytes() == b"new"
    # Removed names are gone, through the mount and in the backing directory.
    os.unlink(mnt / "b" / "hard")
    evict()
    assert (mnt / "b" / "moved").stat().st_nlink == 1
    os.unlink(mnt / "b" / "moved")
    for gone in ("hard", "moved"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "b" / gone)
        assert not (m.backing / "b" / gone).exists()
    # ... and their space is free: the daemon holds no descriptor of a deleted file
    # (the kernel's FORGET may come a little after the unlink).
    deadline = time.monotonic() + 5
    while deleted_held(m) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deleted_held(m) == []
    assert daemon_fds(m) < 200


def deleted_held(m: Mount) -> list[str]:
    held = []
    for fd in os.listdir(f"/proc/{m.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{m.pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith(" (deleted)") and target.startswith(str(m.backing)):
            held.append(target)
    return held
