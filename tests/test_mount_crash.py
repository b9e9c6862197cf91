"""After kill -9 of a mount daemon its mountpoint is a dead mount (ENOTCONN for
everything): each command says so in one line or repairs it, never "not a
directory" or "does not exist"."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Mount, _wait_gone, is_mounted, memlend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def kill9(mount: Mount) -> None:
    os.kill(mount.pid, signal.SIGKILL)
    assert _wait_gone(mount.pid)
    assert is_mounted(mount.mnt)
    # what users see: ENOTCONN, or ECONNABORTED for a request the abort caught (once
    # seen under load: EIO for a request in flight as the connection went)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            os.statvfs(mount.mnt)
        if e.value.errno != errno.EIO:
            break
        time.sleep(0.1)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    return proc.stderr


def test_stats_on_a_dead_mount(mount: Mount) -> None:
    (mount.mnt / "f").write_bytes(b"x")
    os.stat(mount.mnt)  # the root's attributes cached: stat() may still succeed
    kill9(mount)
    proc = memlend("stats", str(mount.mnt), check=False)
    assert proc.returncode == 2
    assert one_line(proc) == (
        f"memlend: {mount.mnt}: the memlend daemon is gone (dead mount); "
        f"run `memlend umount {mount.mnt}`\n"
    )


@pytest.mark.parametrize("open_file", [False, True])
def test_umount_removes_a_dead_mount(mount: Mount, open_file: bool) -> None:
    (mount.mnt / "f").write_bytes(b"x")
    fd = os.open(mount.mnt / "f", os.O_RDONLY) if open_file else -1
    try:
        kill9(mount)
        proc = memlend("umount", str(mount.mnt), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "daemon was gone" in one_line(proc)
        assert not is_mounted(mount.mnt)
        assert os.path.isdir(mount.mnt) and os.listdir(mount.mnt) == []
    finally:
        if fd >= 0:
            # A file open in it made it busy (detached lazily). A read-only handle
            # sends no FLUSH (FOPEN_NOFLUSH), so its close succeeds.
            os.close(fd)


def test_mount_over_a_dead_mount(mount: Mount, tmp_path: Path) -> None:
    (mount.mnt / "f").write_bytes(b"data")
    kill9(mount)
    log = tmp_path / "again.log"
    proc = memlend("mount", str(mount.backing), str(mount.mnt), "--log-file", str(log))
    assert "warning" in one_line(proc) and "dead mount" in proc.stderr
    try:
        assert (mount.mnt / "f").read_bytes() == b"data"
        assert mount.stats()["pid"] != mount.pid
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split()[4] == str(mount.mnt) for line in f) == 1
    finally:
        memlend("umount", str(mount.mnt), check=False)
    assert not is_mounted(mount.mnt)
