"""The backing store's copy of written pages is dropped later, not at close; a removed
file's descriptor is let go at once, so its blocks are freed as with a local rm."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Mount
from memlend.fs.page_dropper import PageDropper


def open_fds(tmp_path: Path, n: int) -> list[int]:
    fds = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 4096)
        fds.append(os.open(p, os.O_RDONLY))
    return fds


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_descriptors_are_dropped_after_the_delay_or_when_forgotten(tmp_path: Path) -> None:
    d = PageDropper(delay=0.3, limit=3)
    try:
        a, b, c, e = open_fds(tmp_path, 4)
        for i, fd in enumerate((a, b, c)):
            d.later(fd, i)
        d.forget(1)
        assert not is_open(b) and is_open(a) and is_open(c)
        e2 = os.dup(e)
        d.later(e, 3)  # over the limit of 3 (b's entry counts until due): a goes at once
        assert not is_open(a)
        d.later(e2, 4)
        deadline = time.monotonic() + 10
        # waiting() drops to 0 when the dropper takes an entry, before it closes it.
        while (d.waiting() or any(map(is_open, (c, e, e2)))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.waiting() == 0 and not any(map(is_open, (c, e, e2)))
    finally:
        d.close()


def test_close_lets_everything_go(tmp_path: Path) -> None:
    d = PageDropper(delay=60)
    fds = open_fds(tmp_path, 3)
    for i, fd in enumerate(fds):
        d.later(fd, i)
    d.close()
    assert not any(is_open(fd) for fd in fds)


def deleted_fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            out.append(target)
    return out


def test_a_written_then_removed_file_is_not_held_by_the_daemon(mount: Mount) -> None:
    for name in ("a", "b"):
        (mount.mnt / name).write_bytes(os.urandom(64 * 1024))
    (mount.mnt / "a").unlink()
    os.rename(mount.mnt / "b", mount.mnt / "c")
    (mount.mnt / "d").write_bytes(b"new")
    os.rename(mount.mnt / "d", mount.mnt / "c")  # replaces the written file c
    # RELEASE is asynchronous (close(2) does not wait for it): give it a moment, far
    # less than the page dropper's delay.
    deadline = time.monotonic() + 5
    while deleted_fds(mount.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deleted_fds(mount.pid) == []
    assert (mount.backing / "c").read_bytes() == b"new"
