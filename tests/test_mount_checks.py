"""What `memlend mount` refuses or warns about before serving (issue 10, item 7):
non-empty mountpoints, a backing directory inside the mountpoint, secret files that
others may read, and allow_other dropped for a non-root mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import force_unmount, is_mounted, memlend
from memlend.fs.daemon import allow_other_dropped
from memlend.fuse.mount import FUSE_CONF, user_allow_other

NOBODY = 65534


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Mountpoints a test mounted itself: unmounted at teardown in every path."""
    mnts: list[Path] = []
    yield mnts
    for m in mnts:
        memlend("umount", str(m), check=False)
        force_unmount(m)


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    return backing, mnt


def refused(*args: str) -> str:
    r = memlend("mount", *args, check=False)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_a_non_empty_mountpoint_is_refused_unless_nonempty(tmp_path: Path, mounted) -> None:
    backing, mnt = dirs(tmp_path)
    (backing / "data").write_bytes(b"backing")
    (mnt / "mine").write_bytes(b"hidden while mounted")
    err = refused(str(backing), str(mnt), "--log-file", str(tmp_path / "log"))
    assert f"mountpoint {mnt} is not empty (1 entries)" in err and "--nonempty" in err
    assert not is_mounted(mnt)
    mounted.append(mnt)
    memlend("mount", str(backing), str(mnt), "--nonempty", "--log-file", str(tmp_path / "log"))
    assert is_mounted(mnt)
    assert os.listdir(mnt) == ["data"]
    memlend("umount", str(mnt))
    assert (mnt / "mine").read_bytes() == b"hidden while mounted"  # untouched


def test_a_backing_directory_inside_or_equal_to_the_mountpoint_is_refused(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    (mnt / "inner" / "backing").mkdir(parents=True)
    err = refused(str(mnt / "inner" / "backing"), str(mnt))
    assert "is inside the mountpoint" in err
    err = refused(str(mnt), str(mnt))
    assert "inside the backing directory" in err  # equal: the existing check says so


def test_a_secret_file_others_can_read_is_warned_about(tmp_path: Path, mounted) -> None:
    backing, mnt = dirs(tmp_path)
    secret, seal = tmp_path / "secret", tmp_path / "seal"
    for path, mode in ((secret, 0o644), (seal, 0o600)):
        path.write_text(os.urandom(32).hex() + "\n")
        path.chmod(mode)
    mounted.append(mnt)
    # No lender listens there: the mount starts anyway and retries in the background.
    r = memlend("mount", str(backing), str(mnt), "--lender", "memlend://127.0.0.1:9",
                "--secret-file", str(secret), "--seal-key-file", str(seal),
                "--log-file", str(tmp_path / "log"))  # fmt: skip
    assert is_mounted(mnt)
    assert f"warning: secret file {secret} is accessible by group or others (mode 0644" in (
        r.stderr
    )
    assert str(seal) not in r.stderr


def test_allow_other_dropped_is_said(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# mount_max = 1000\n#user_allow_other\n")
    assert allow_other_dropped(0, str(conf)) is None  # root: always allow_other
    assert "needs user_allow_other in" in (allow_other_dropped(1000, str(conf)) or "")
    conf.write_text("user_allow_other\n")
    assert allow_other_dropped(1000, str(conf)) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.skipif(user_allow_other(), reason=f"{FUSE_CONF} allows allow_other")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_non_root_mount_warns_that_others_cannot_use_it() -> None:
    """A real mount by `nobody` through fusermount3: the warning, and that it is true."""
    top = Path(tempfile.mkdtemp(prefix="memlend-nobody-"))
    backing, mnt = top / "backing", top / "mnt"
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = {**os.environ, "HOME": str(top), "XDG_RUNTIME_DIR": str(top)}
    daemon = None
    try:
        top.chmod(0o755)
        for d in (backing, mnt):
            d.mkdir()
            os.chown(d, NOBODY, NOBODY)
        os.chown(top, NOBODY, NOBODY)
        nobody = [*as_nobody, sys.executable, "-m", "memlend"]
        # In the foreground: this host's interpreter may not let `nobody` start another.
        daemon = subprocess.Popen(
            [*nobody, "mount", str(backing), str(mnt), "--foreground"],
            stderr=subprocess.PIPE, text=True, env=env, cwd=top,
        )  # fmt: skip
        assert daemon.stderr is not None
        first = daemon.stderr.readline()
        assert "other users (root included) cannot use this mount" in first, first
        if not os.stat("/dev/fuse").st_mode & 0o006:
            # This host lets only root open /dev/fuse: the warning is all that can be
            # checked; the mount fails with a clear error.
            rest = daemon.stderr.read()
            assert daemon.wait(10) != 0 and "/dev/fuse: Permission denied" in rest, rest
            pytest.skip("/dev/fuse is root-only here: the non-root mount itself not tested")
        lines = [first]
        while len(lines) < 20 and lines[-1] and "mounted" not in lines[-1]:
            lines.append(daemon.stderr.readline())
        assert "mounted" in lines[-1], lines
        with pytest.raises(PermissionError):  # root is "another user" here
            os.listdir(mnt)
        r = subprocess.run([*nobody, "umount", str(mnt)], capture_output=True, text=True,
                           env=env, cwd=top, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert daemon.wait(10) == 0
    finally:
        force_unmount(mnt)
        if daemon is not None:
            if daemon.poll() is None:
                daemon.kill()
            daemon.wait(10)
            if daemon.stderr is not None:
                daemon.stderr.close()
        shutil.rmtree(top, ignore_errors=True)
