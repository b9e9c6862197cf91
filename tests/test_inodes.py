"""Inode identities by file handle (fs/inodes.py) and the passthrough's inode table,
without a mount: a bounded descriptor cache, pins that eviction respects, deleted
inodes, the fallback without file handles, and memory per known inode."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from memlend.fs import inodes
from memlend.fs.cache import BlockCache
from memlend.fs.inodes import Inode, PathFds
from memlend.fs.passthrough import Passthrough
from memlend.fuse import wire
from memlend.fuse.api import Context, SetattrRequest
from memlend.stats import MountStats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs root")

CTX = Context(0, 0, 0)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_files(d: Path, n: int) -> list[Path]:
    paths = [d / f"f{i}" for i in range(n)]
    for i, p in enumerate(paths):
        p.write_bytes(b"%d" % i)
    return paths


def identify(fds: PathFds, path: Path) -> Inode:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    st = os.fstat(fd)
    return fds.identify((st.st_dev, st.st_ino), fd)


@pytest.fixture
def root_fd(tmp_path: Path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_descriptors_stay_within_capacity_and_reopen_by_handle(
    tmp_path: Path, root_fd: int
) -> None:
    paths = make_files(tmp_path, 200)
    before = open_fds()
    fds = PathFds(root_fd, 8)
    assert fds.enabled
    known = [identify(fds, p) for p in paths]
    # 8 cached, plus the mount descriptor PathFds keeps
    assert open_fds() - before <= 8 + 1
    for p, inode in zip(paths, known, strict=True):
        assert inode.handle is not None
        assert os.fstat(inode.fd).st_ino == p.stat().st_ino  # reopened by handle
    assert fds.reopened >= 190
    assert open_fds() - before <= 8 + 1 + inodes.PINS_PER_THREAD


def test_every_kind_of_inode_has_a_handle(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner").write_bytes(b"in")
    (tmp_path / "file").write_bytes(b"x")
    os.symlink("no/such/target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "null", 0o600 | 0o020000, os.makedev(1, 3))
    fds = PathFds(root_fd, 1)
    known = {n: identify(fds, tmp_path / n) for n in ("dir", "file", "link", "fifo", "null")}
    for name, inode in known.items():
        assert inode.handle is not None, name
        fd = inode.fd
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == inode.key, name
    assert os.readlink(b"", dir_fd=known["link"].fd) == b"no/such/target"
    fd = os.open("inner", os.O_RDONLY, dir_fd=known["dir"].fd)  # a usable directory
    assert os.read(fd, 10) == b"in"
    os.close(fd)


def test_a_pinned_descriptor_survives_eviction_by_other_threads(
    tmp_path: Path, root_fd: int
) -> None:
    paths = make_files(tmp_path, 100)
    fds = PathFds(root_fd, 4)
    known = [identify(fds, p) for p in paths]
    mine = known[0]
    fd = mine.fd  # pinned by this thread
    ino = paths[0].stat().st_ino

    def churn() -> None:
        for _ in range(3):
            for inode in known[1:]:
                os.fstat(inode.fd)

    t = threading.Thread(target=churn)
    t.start()
    t.join()
    assert mine.path_fd == fd
    assert os.fstat(fd).st_ino == ino, "the descriptor was closed (and reused) under us"
    # Once this thread has pinned PINS_PER_THREAD others, it may go.
    for inode in known[1 : 1 + inodes.PINS_PER_THREAD]:
        os.fstat(inode.fd)
    for inode in known[50:]:
        os.fstat(inode.fd)
    assert mine.path_fd == -1


def test_forget_closes_at_once_even_if_pinned(tmp_path: Path, root_fd: int) -> None:
    # A deleted file's blocks must not stay allocated because a worker pinned it once.
    paths = make_files(tmp_path, 10)
    fds = PathFds(root_fd, 100)
    known = [identify(fds, p) for p in paths]
    fd = known[0].fd  # pinned in this thread's ring
    known[0].nlookup = 0
    fds.drop([known[0]])
    assert known[0].path_fd == -1
    with pytest.raises(OSError) as e:  # nothing was opened since: the number is free
        os.fstat(fd)
    assert e.value.errno == errno.EBADF
    for inode in known[1 : 2 + inodes.PINS_PER_THREAD]:  # its pin leaves the ring
        os.fstat(inode.fd)
    assert known[0].pins == 0 and fds.open_count() == 9


def test_a_deleted_inode_is_stale_unless_a_file_of_it_is_open(tmp_path: Path, root_fd: int) -> None:
    paths = make_files(tmp_path, 20)
    offered: list[Inode] = []

    def stale(inode: Inode) -> int:
        offered.append(inode)
        raise OSError(errno.ENOENT, "deleted")

    fds = PathFds(root_fd, 2, stale)
    known = [identify(fds, p) for p in paths]
    kept = os.open(paths[0], os.O_RDONLY)
    os.unlink(paths[0])
    os.unlink(paths[1])
    for inode in known[2:]:  # evict both
        os.fstat(inode.fd)
    assert known[0].path_fd == known[1].path_fd == -1
    assert os.fstat(known[0].fd).st_nlink == 0  # the handle works while a file is open
    with pytest.raises(FileNotFoundError):
        os.fstat(known[1].fd)
    assert offered == [known[1]]
    os.close(kept)


def test_without_file_handles_descriptors_are_held_with_one_warning(
    tmp_path: Path, root_fd: int, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    def refuse(fd: int) -> tuple[bytes, int]:
        raise OSError(errno.EOPNOTSUPP, "no handles here")

    monkeypatch.setattr(inodes, "name_to_handle", refuse)
    paths = make_files(tmp_path, 20)
    with caplog.at_level(logging.WARNING, logger="memlend.fs"):
        fds = PathFds(root_fd, 2)
        known = [identify(fds, p) for p in paths]
    assert not fds.enabled
    assert len([r for r in caplog.records if "file handles" in r.message]) == 1
    for p, inode in zip(paths, known, strict=True):
        assert inode.handle is None and inode.path_fd >= 0
        assert os.fstat(inode.fd).st_ino == p.stat().st_ino
    for inode in known:
        fds.drop([inode])


# ---- the passthrough's inode table -------------------------------------------------


def passthrough(backing: Path, path_fds: int = 16) -> Passthrough:
    cache = BlockCache(1 << 20, 4096, "lru", MountStats())
    return Passthrough(str(backing), cache, MountStats(), path_fds=path_fds)


def test_passthrough_holds_bounded_descriptors_and_little_memory(tmp_path: Path) -> None:
    n = 20_000
    backing = tmp_path / "b"
    backing.mkdir()
    for i in range(n):
        os.close(os.open(backing / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    fs = passthrough(backing)
    before = open_fds()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    nodes = [fs.lookup(CTX, wire.ROOT_ID, b"f%d" % i)[0] for i in range(n)]
    per_inode = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    assert open_fds() - before <= 16
    # Inode + handle + key + file state + table entries: a few hundred bytes.
    print(f"{per_inode:.0f} bytes per known inode")
    assert per_inode < 1024, f"{per_inode:.0f} bytes per known inode"
    for node in nodes[::997]:
        assert fs.getattr(node, None).st_size == 0
    t0 = time.monotonic()
    for node in nodes:
        fs.forget(node, 1)
    forget_s = time.monotonic() - t0
    assert len(fs._inodes) == 1 and not fs._by_key.keys() - {fs._root.key}
    assert not fs._files and not fs._by_file_id, "file states outlived their inodes"
    print(f"forget: {forget_s / n * 1e6:.1f} us per inode")
    assert forget_s < 5, f"forgetting {n} inodes took {forget_s:.1f} s"
    assert open_fds() - before <= inodes.PINS_PER_THREAD


def test_file_states_go_when_their_last_cached_block_goes(tmp_path: Path) -> None:
    backing = tmp_path / "b"
    backing.mkdir()
    for i in range(3):
        (backing / f"f{i}").write_bytes(b"x" * 5000)
    fs = passthrough(backing)
    nodes = []
    for i in range(3):
        node = fs.lookup(CTX, wire.ROOT_ID, b"f%d" % i)[0]
        fh, _ = fs.open(CTX, node, os.O_RDONLY)
        assert bytes(b"".join(fs.read(node, fh, 0, 8192))) == b"x" * 5000
        fs.release(node, fh)
        nodes.append(node)
    fid = [fs._files[fs._inodes[n].key].file_id for n in nodes]
    assert all(fs.cache.resident(f) == 2 for f in fid)
    fs.forget(nodes[0], 1)  # blocks cached: its state stays, so do its blocks
    assert fid[0] in fs._by_file_id
    with fs.cache.lock:
        fs.cache.drop_range(fid[0], 0, 1)  # its last blocks go: so does the state
    fs.forget(nodes[1], 1)
    assert fid[0] not in fs._by_file_id
    assert fid[1] in fs._by_file_id and fid[2] in fs._by_file_id
    fs.forget(nodes[2], 1)
    assert len(fs._files) == 2


def test_an_unlinked_open_file_works_when_its_handle_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext4 still decodes the handle of an unlinked inode while it is open; other file
    # systems may answer ESTALE: then the open file's descriptor is the way in.
    backing = tmp_path / "b"
    backing.mkdir()
    make_files(backing, 10)
    fs = passthrough(backing, path_fds=2)
    node = fs.lookup(CTX, wire.ROOT_ID, b"f0")[0]
    fh, _ = fs.open(CTX, node, os.O_RDWR)
    fs.unlink(CTX, wire.ROOT_ID, b"f0")
    gone = fs.lookup(CTX, wire.ROOT_ID, b"f1")[0]
    fs.unlink(CTX, wire.ROOT_ID, b"f1")

    def estale(mount_fd: int, handle: bytes, flags: int = 0) -> int:
        raise OSError(errno.ESTALE, "stale")

    monkeypatch.setattr(inodes, "open_by_handle", estale)
    for i in range(2, 10):  # evict
        fs.getattr(fs.lookup(CTX, wire.ROOT_ID, b"f%d" % i)[0], None)
    inode = fs._inodes[node]
    assert inode.path_fd == -1 or inode.pins
    st = fs.getattr(node, None)  # no fh: through the open file
    assert st.st_nlink == 0
    fs.setattr(CTX, node, SetattrRequest(None, 0o600, None, None, None, None, None, False, False))
    assert fs.getattr(node, None).st_mode & 0o777 == 0o600
    assert fs.write(node, fh, 0, memoryview(b"still here")) == 10
    assert b"".join(fs.read(node, fh, 0, 100)).startswith(b"still here")
    with pytest.raises(FileNotFoundError):
        fs.getattr(gone, None)
    fs.release(node, fh)


def test_over_max_inodes_the_kernel_is_asked_to_forget_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memlend.fs import passthrough as pt

    monkeypatch.setattr(pt, "_PRUNE_EVERY", 8)
    backing = tmp_path / "b"
    backing.mkdir()
    make_files(backing, 1000)
    fs = pt.Passthrough(
        str(backing), BlockCache(1 << 20, 4096, "lru", MountStats()), MountStats(), max_inodes=100
    )
    asked: list[list[int]] = []
    fs.on_too_many = asked.append
    busy: set[int] = set()  # inodes the kernel keeps (in use): it ignores the request
    for i in range(1000):
        node = fs.lookup(CTX, wire.ROOT_ID, b"f%d" % i)[0]
        if i < 5:
            busy.add(node)
        while asked:  # the kernel answers with FORGETs
            for n in asked.pop():
                assert n != wire.ROOT_ID
                if n not in busy:
                    fs.forget(n, 1)
        assert len(fs._inodes) <= 100 + 2 * 8, i
    assert busy <= fs._inodes.keys()
    assert len(fs._files) <= 100 + 2 * 8  # their file states went with them
    # A forgotten name is looked up again as a new inode, and works.
    node = fs.lookup(CTX, wire.ROOT_ID, b"f500")[0]
    assert fs.getattr(node, None).st_size == 3


def test_no_pruning_below_max_inodes(tmp_path: Path) -> None:
    backing = tmp_path / "b"
    backing.mkdir()
    make_files(backing, 2000)
    fs = passthrough(backing)
    asked: list[list[int]] = []
    fs.on_too_many = asked.append
    for i in range(2000):
        fs.lookup(CTX, wire.ROOT_ID, b"f%d" % i)
    assert asked == [] and len(fs._inodes) == 2001
