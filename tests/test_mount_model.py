"""Model-based test of a real mount: every operation runs on the mount and on a plain
directory (not mounted), and both must agree after every step: same result, or the
same errno; same tree (types, modes, sizes, link counts, contents, symlink targets).

Some steps change the BACKING directory directly (outside the mount) and then read the
file through the mount after a fresh open: close-to-open consistency says the mount
sees the change at that open, even when its cache held the old blocks.

One mount (1 MiB cache, 4 KiB blocks: eviction and block boundaries are exercised)
serves every example; the two trees are emptied between examples.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import Mount

pytestmark = pytest.mark.timeout(240)

MAX_FILE = 64 * 1024
BS = 4096

NAMES = ["a", "b", "d", "d/a", "d/b", "e", "e/a", "d/e", "d/e/a"]
paths = st.sampled_from(NAMES)
# Offsets favour block boundaries (and their neighbours), then anything up to 64 KiB.
boundary = st.builds(
    lambda k, d: max(0, k * BS + d), st.integers(0, 15), st.sampled_from([-1, 0, 1])
)
offsets = st.one_of(boundary, st.integers(0, MAX_FILE - 1))
lengths = st.one_of(st.sampled_from([0, 1, BS - 1, BS, BS + 1, 3 * BS]), st.integers(0, 12000))
modes = st.sampled_from([0o600, 0o644, 0o755, 0o444, 0o700, 0o000, 0o4755, 0o1777])
seeds = st.integers(0, 2**32 - 1)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """('ok', result) or ('err', errno): what both sides must agree on."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything observable about the tree under `root` (a fresh open per file)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            s = os.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                assert len(data) == s.st_size, f"{p}: stat size {s.st_size}, read {len(data)}"
                detail: object = (s.st_size, s.st_nlink, data)
            elif stat.S_ISLNK(s.st_mode):
                detail = (os.readlink(p),)
            else:
                detail = (sorted(os.listdir(p)),)
            out[rel] = (kind, stat.S_IMODE(s.st_mode), *detail)
    return out


def empty(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)  # as root: modes do not stand in the way
        else:
            child.unlink()


class MountModel(RuleBasedStateMachine):
    """The mount (`m`) against a plain directory (`p`); `b` is the mount's backing."""

    mount: Mount
    plain: Path

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.m, self.p, self.b = self.mount.mnt, self.plain, self.mount.backing
        self.open_fds: list[tuple[int, int]] = []

    @initialize(sizes=st.lists(st.integers(0, MAX_FILE), min_size=3, max_size=3), seed=seeds)
    def reset(self, sizes: list[int], seed: int) -> None:
        """Empty both trees, then give them the same start: a few dirs and files."""
        empty(self.m)
        empty(self.p)
        assert not any(self.b.iterdir())
        for root in (self.p, self.m):
            for d in ("d", "e", "d/e"):
                os.mkdir(root / d)
            for i, (name, size) in enumerate(zip(("a", "d/a", "e/a"), sizes, strict=True)):
                (root / name).write_bytes(payload(seed + i, size))
        # Warm the cache with the start files, so later steps meet cached blocks.
        snapshot(self.m)

    def teardown(self) -> None:
        self.close_all()

    def close_all(self) -> None:
        for fds in self.open_fds:
            for fd in fds:
                os.close(fd)
        self.open_fds.clear()

    def both(self, op: Callable[[Path], object]) -> object:
        want = outcome(lambda: op(self.p))
        got = outcome(lambda: op(self.m))
        assert got == want, f"mount: {got!r}, plain directory: {want!r}"
        return want

    # ---- whole-file operations (each opens afresh) -------------------------

    @rule(path=paths, offset=offsets, n=lengths, seed=seeds)
    def write(self, path: str, offset: int, n: int, seed: int) -> None:
        data = payload(seed, min(n, MAX_FILE - offset))

        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=paths, n=lengths, seed=seeds)
    def append(self, path: str, n: int, seed: int) -> None:
        data = payload(seed, n)

        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size + n > MAX_FILE:
                    return -1
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=paths, offset=offsets, n=lengths)
    def read(self, path: str, offset: int, n: int) -> None:
        def op(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, n, offset)
            finally:
                os.close(fd)

        self.both(op)

    @rule(path=paths)
    def read_whole(self, path: str) -> None:
        self.both(lambda root: (root / path).read_bytes())

    @rule(path=paths, size=offsets)
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=paths, seed=seeds, n=lengths)
    def open_trunc_write(self, path: str, seed: int, n: int) -> None:
        data = payload(seed, n)

        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_RDWR | os.O_TRUNC | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
                os.lseek(fd, 0, os.SEEK_SET)
                assert os.read(fd, n + 1) == data
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(op)

    # ---- names -------------------------------------------------------------

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(path=paths, mode=st.sampled_from([0o755, 0o700, 0o777]))
    def mkdir(self, path: str, mode: int) -> None:
        self.both(lambda root: os.mkdir(root / path, mode))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(dest=st.sampled_from([*NAMES, "../a", "missing", "x" * 200]), path=paths)
    def symlink(self, dest: str, path: str) -> None:
        if dest.startswith("..") and "/" not in path:
            dest = dest[3:]  # never point outside the tree
        self.both(lambda root: os.symlink(dest, root / path))

    @rule(path=paths)
    def readlink(self, path: str) -> None:
        self.both(lambda root: os.readlink(root / path))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(path=paths, mode=modes)
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / path, mode))

    @rule(path=paths)
    def stat(self, path: str) -> None:
        def op(root: Path) -> tuple:
            s = os.stat(root / path)
            size = s.st_size if stat.S_ISREG(s.st_mode) else None
            return (s.st_mode, size, s.st_nlink if size is not None else None)

        self.both(op)

    @rule(path=st.sampled_from([".", "d", "e", "d/e", "a"]))
    def listdir(self, path: str) -> None:
        self.both(lambda root: sorted(os.listdir(root / path)))

    # ---- open handles that live across steps ---------------------------------

    @rule(
        target=handles,
        path=paths,
        flags=st.sampled_from(
            [os.O_RDONLY, os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_APPEND]
        ),
    )
    def open_handle(self, path: str, flags: int) -> object:
        fds: dict[str, int] = {}

        def op(root: Path) -> bool:
            fds[str(root)] = os.open(root / path, flags, 0o644)
            return True

        if self.both(op)[0] == "err":
            return None  # neither side opened it
        pair = (fds[str(self.p)], fds[str(self.m)])
        self.open_fds.append(pair)
        return pair

    def _pair(self, h: tuple[int, int] | None) -> tuple[int, int] | None:
        return h if h in self.open_fds else None

    @rule(h=handles, offset=offsets, n=lengths)
    def handle_read(self, h: tuple[int, int] | None, offset: int, n: int) -> None:
        if (pair := self._pair(h)) is not None:
            want = outcome(lambda: os.pread(pair[0], n, offset))
            got = outcome(lambda: os.pread(pair[1], n, offset))
            assert got == want

    @rule(h=handles, offset=offsets, n=lengths, seed=seeds)
    def handle_write(self, h: tuple[int, int] | None, offset: int, n: int, seed: int) -> None:
        if (pair := self._pair(h)) is not None:
            data = payload(seed, min(n, MAX_FILE - offset))
            want = outcome(lambda: os.pwrite(pair[0], data, offset))
            got = outcome(lambda: os.pwrite(pair[1], data, offset))
            assert got == want
            if want[0] == "ok":  # O_APPEND: both appended; same size either way
                assert os.fstat(pair[1]).st_size == os.fstat(pair[0]).st_size

    @rule(h=handles, size=offsets)
    def handle_truncate(self, h: tuple[int, int] | None, size: int) -> None:
        if (pair := self._pair(h)) is not None:
            want = outcome(lambda: os.ftruncate(pair[0], size))
            got = outcome(lambda: os.ftruncate(pair[1], size))
            assert got == want

    @rule(h=consumes(handles))
    def handle_close(self, h: tuple[int, int] | None) -> None:
        if (pair := self._pair(h)) is not None:
            self.open_fds.remove(pair)
            for fd in pair:
                os.close(fd)

    # ---- changes made outside the mount, then a fresh open -------------------

    def _outside(self, path: str, change: Callable[[int], None]) -> None:
        # Close-to-open: only opens after the change must see it.
        self.close_all()
        want = outcome(lambda: _with_fd(self.p / path, os.O_WRONLY, change))
        got = outcome(lambda: _with_fd(self.b / path, os.O_WRONLY, change))
        assert got == want
        self.read_whole(path)
        self.stat(path)

    @rule(path=paths, offset=offsets, n=st.integers(1, 12000), seed=seeds)
    def outside_write(self, path: str, offset: int, n: int, seed: int) -> None:
        data = payload(seed, min(n, MAX_FILE - offset))
        self._outside(path, lambda fd: _all(os.pwrite(fd, data, offset), len(data)))

    @rule(path=paths, seed=seeds)
    def outside_rewrite_same_size(self, path: str, seed: int) -> None:
        """Same size, new content, mtime possibly equal to the cached one."""

        def change(fd: int) -> None:
            size = os.fstat(fd).st_size
            before = os.stat(f"/proc/self/fd/{fd}")
            os.pwrite(fd, payload(seed, size), 0)
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))

        self._outside(path, change)

    @rule(path=paths, n=st.integers(1, 12000), seed=seeds)
    def outside_append(self, path: str, n: int, seed: int) -> None:
        def change(fd: int) -> None:
            size = os.fstat(fd).st_size
            data = payload(seed, min(n, MAX_FILE - size))
            _all(os.pwrite(fd, data, size), len(data))

        self._outside(path, change)

    @rule(path=paths, size=offsets)
    def outside_truncate(self, path: str, size: int) -> None:
        self._outside(path, lambda fd: os.ftruncate(fd, size))

    # ---- after every step ----------------------------------------------------

    @invariant()
    def same_tree(self) -> None:
        assert snapshot(self.m) == snapshot(self.p)
        # The mount is a mirror: what it shows is what BACKING holds.
        assert snapshot(self.b) == snapshot(self.p)


def _with_fd(path: Path, flags: int, fn: Callable[[int], None]) -> None:
    fd = os.open(path, flags)
    try:
        fn(fd)
    finally:
        os.close(fd)


def _all(written: int, want: int) -> None:
    assert written == want


@pytest.mark.parametrize(
    "local_tier, options",
    [("memlend", ()), ("kernel", ()), ("kernel", ("--no-passthrough",))],
    ids=["memlend", "kernel", "kernel-no-passthrough"],
)
def test_mount_matches_plain_directory(
    mount_factory, tmp_path: Path, local_tier: str, options: tuple[str, ...]
) -> None:
    """The kernel tier twice: as root its small written files are the kernel's
    (passthrough), and without that every read and write goes through the daemon."""
    mnt = mount_factory("--cache-size", "1M", "--block-size", "4K", *options)
    plain = tmp_path / "plain"
    plain.mkdir()
    MountModel.mount = mnt
    MountModel.plain = plain
    run_state_machine_as_test(
        MountModel,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    s = mnt.stats()
    if local_tier == "memlend":  # the small cache was really exercised
        assert s["local_hits"] > 0
        assert s["invalidated_blocks"] > 0
    elif s.get("passthrough"):  # the kernel served written files from the backing store
        assert s["passthrough_opens"] > 0
    else:  # the kernel's misses reached the daemon (its hits never do)
        assert s["local_misses"] > 0
