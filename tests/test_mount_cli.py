"""The mount command line with bad input, and the ways a mount ends.

Every user mistake is exactly one line on stderr, no traceback, a non-zero exit
status, and no mount (nor daemon) left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MEMLEND, Mount, _wait_gone, force_unmount, is_mounted, memlend
from memlend.fs.daemon import READAHEAD_KB

NOBODY = 65534


def mounts_at(path: Path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == real)


def daemons_for(path: Path) -> list[int]:
    """Pids of memlend daemons whose command line names `path`."""
    real = os.path.realpath(path).encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"memlend" in args and b"mount" in args and real in args:
            pids.append(int(pid))
    return pids


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr
    assert proc.returncode != 0, f"exit 0; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert proc.stdout == "", proc.stdout
    for w in words:
        assert w.lower() in err.lower(), f"{w!r} not in {err!r}"
    return err


def bad_mount(
    mnt: Path, *args: str, words: tuple[str, ...] = (), existing: Mount | None = None
) -> str:
    """Run a `memlend mount` that must fail; `existing`: the mount already at `mnt`."""
    proc = memlend("mount", *args, check=False)
    try:
        err = assert_user_error(proc, *words)
        assert mounts_at(mnt) == (1 if existing else 0)
        assert daemons_for(mnt) == ([existing.pid] if existing else [])
        return err
    finally:
        if proc.returncode == 0:
            memlend("umount", str(mnt), check=False)
            force_unmount(mnt)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    b, m = tmp_path / "backing", tmp_path / "mnt"
    b.mkdir()
    m.mkdir()
    return b, m


def test_missing_backing(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, m = dirs
    bad_mount(m, str(tmp_path / "nope"), str(m), words=("nope", "does not exist"))


def test_backing_is_a_file(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, m = dirs
    (tmp_path / "file").write_text("x")
    bad_mount(m, str(tmp_path / "file"), str(m), words=("not a directory",))


def test_missing_mountpoint(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    b, _ = dirs
    missing = tmp_path / "nomnt"
    bad_mount(missing, str(b), str(missing), words=("nomnt", "does not exist"))
    assert not missing.exists()


def test_mountpoint_busy(mount: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (mount.mnt / "f").write_text("still here")
    bad_mount(mount.mnt, str(other), str(mount.mnt), words=("busy",), existing=mount)
    assert mounts_at(mount.mnt) == 1
    assert (mount.mnt / "f").read_text() == "still here"
    assert mount.stats()["pid"] == mount.pid


def test_mountpoint_inside_backing(dirs: tuple[Path, Path]) -> None:
    b, _ = dirs
    inner = b / "inner"
    inner.mkdir()
    bad_mount(inner, str(b), str(inner), words=("inside",))
    bad_mount(b, str(b), str(b), words=("inside",))


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("--cache-size", "12XB", ("12XB",)),
        ("--cache-size", "-5M", ("-5M",)),
        ("--cache-size", "", ()),
        ("--block-size", "3000", ("power of two",)),
        ("--block-size", "12K", ("power of two",)),
        ("--block-size", "2M", ("power of two",)),
        ("--block-size", "abc", ("abc",)),
        ("--policy", "nosuchpolicy", ("nosuchpolicy",)),
        ("--cache-size", "4K", ("too small",)),  # (with --local-tier memlend: its cache)
        ("--threads", "0", ("threads",)),
    ],
)
def test_bad_options(dirs: tuple[Path, Path], option: str, value: str, words: tuple) -> None:
    b, m = dirs
    tier = ["--local-tier=memlend"] if option == "--cache-size" else []
    bad_mount(m, str(b), str(m), f"{option}={value}", *tier, words=words)


def test_stats_and_umount_on_a_plain_directory(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, m = dirs
    for cmd in (["stats", str(m)], ["stats", "--json", str(m)], ["umount", str(m)]):
        assert_user_error(memlend(*cmd, check=False), "not a memlend mount")
    for cmd in (["stats", str(tmp_path / "nope")], ["umount", str(tmp_path / "nope")]):
        assert_user_error(memlend(*cmd, check=False), "nope")
    # Another file system mounted there (a tmpfs) is not a memlend mount either.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(m)], check=True)
    try:
        for cmd in (["stats", str(m)], ["umount", str(m)]):
            assert_user_error(memlend(*cmd, check=False), "not a memlend mount")
        assert is_mounted(m)
    finally:
        subprocess.run(["umount", str(m)], check=True)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory other users can reach (tmp_path's parents are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="memlend-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        force_unmount(d / "mnt")
        shutil.rmtree(d, ignore_errors=True)


def test_no_permission_to_mount(public_tmp: Path) -> None:
    """An unprivileged user without fusermount3 (PATH lacks it) cannot mount."""
    b, m, run = public_tmp / "backing", public_tmp / "mnt", public_tmp / "run"
    for d in (b, m, run):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    env = {"PATH": "/nonexistent", "XDG_RUNTIME_DIR": str(run), "HOME": str(run)}
    setpriv = shutil.which("setpriv") or "setpriv"
    proc = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         *MEMLEND, "mount", str(b), str(m)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert_user_error(proc, "permission")
    assert not is_mounted(m)
    assert daemons_for(m) == []


# ---- ending a mount ----------------------------------------------------------------


def test_sigterm_unmounts_cleanly(mount: Mount) -> None:
    (mount.mnt / "f").write_bytes(b"data")
    os.kill(mount.pid, signal.SIGTERM)
    assert _wait_gone(mount.pid, timeout=10), "daemon still running 10 s after SIGTERM"
    assert not is_mounted(mount.mnt)
    assert (mount.backing / "f").read_bytes() == b"data"
    assert os.listdir(mount.mnt) == []  # the bare mountpoint again


def test_sigint_unmounts_cleanly(mount: Mount) -> None:
    os.kill(mount.pid, signal.SIGINT)
    assert _wait_gone(mount.pid, timeout=10)
    assert not is_mounted(mount.mnt)


def test_umount_stops_the_daemon(mount: Mount) -> None:
    proc = memlend("umount", str(mount.mnt), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not is_mounted(mount.mnt)
    assert _wait_gone(mount.pid, timeout=5)


def test_umount_busy_then_lazy(mount: Mount) -> None:
    f = mount.mnt / "f"
    f.write_bytes(b"open while unmounting")
    with open(f, "rb", buffering=0) as held:
        proc = memlend("umount", str(mount.mnt), check=False)
        assert_user_error(proc, "busy", "--lazy")
        assert is_mounted(mount.mnt)
        assert mount.stats()["pid"] == mount.pid  # still served

        t0 = time.monotonic()
        proc = memlend("umount", "--lazy", str(mount.mnt), check=False, timeout=60)
        took = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mount.mnt)
        assert took < 10, f"umount --lazy took {took:.1f} s with a file still open"
        # The open file keeps working until it is closed...
        assert held.read() == b"open while unmounting"
    # ... then the daemon ends.
    assert _wait_gone(mount.pid, timeout=10), "daemon still running after the last close"


def test_foreground_mount_exits_on_sigterm(dirs: tuple[Path, Path]) -> None:
    b, m = dirs
    proc = subprocess.Popen(
        [*MEMLEND, "mount", "--foreground", str(b), str(m), "--cache-size", "1M",
         "--block-size", "4K"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Ready once it says so (stderr also carries its log lines).
        assert proc.stderr is not None
        lines = []
        while not (line := proc.stderr.readline()).startswith("memlend: mounted"):
            assert line, f"foreground mount ended before it was ready: {lines}"
            lines.append(line)
        assert is_mounted(m)
        (m / "x").write_text("y")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not is_mounted(m)
        assert (b / "x").read_text() == "y"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(m)


@pytest.mark.skipif(os.geteuid() != 0, reason="the bdi's read_ahead_kb is root's to set")
def test_kernel_tier_sets_its_read_ahead_also_at_a_path_with_a_space(tmp_path: Path) -> None:
    b, m = tmp_path / "backing dir", tmp_path / "mount point"
    b.mkdir()
    m.mkdir()
    memlend("mount", str(b), str(m), "--local-tier", "kernel", "--log-file",
            str(tmp_path / "log"))  # fmt: skip
    try:
        dev = os.stat(m).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert bdi.read_text().strip() == str(READAHEAD_KB) != "128"  # not FUSE's default
    finally:
        memlend("umount", str(m), check=False)
        force_unmount(m)
