"""Ownership and permissions on a mount made by root (allow_other, default_permissions):
what an unprivileged user creates is theirs in BACKING, and the kernel refuses them
what the modes refuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import Mount

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# Runs as uid/gid 65534 with its working directory in the mount (the test's tmp_path
# is not reachable by other users, so every path is relative). Prints one line per step.
USER_PROGRAM = textwrap.dedent(
    """
    import errno, os
    os.umask(0o022)

    def step(name, fn):
        try:
            fn()
            print(name, "ok")
        except OSError as e:
            print(name, errno.errorcode[e.errno])

    def create():
        fd = os.open("file", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
        os.write(fd, b"mine")
        os.close(fd)

    def write_root_file():
        fd = os.open("rootfile", os.O_WRONLY)
        os.close(fd)

    def append_root_file():
        with open("rootfile", "ab") as f:
            f.write(b"x")

    step("create", create)
    step("mkdir", lambda: os.mkdir("dir", 0o777))
    step("mkdir_sgid", lambda: os.mkdir("sgid/sub", 0o777))
    step("create_sgid", lambda: open("sgid/f", "w").close())
    step("symlink", lambda: os.symlink("file", "link"))
    step("mknod_fifo", lambda: os.mkfifo("fifo", 0o600))
    step("hardlink", lambda: os.link("file", "hard"))
    step("rename", lambda: os.rename("file", "file2"))
    step("chmod_own", lambda: os.chmod("file2", 0o600))
    step("read_root_file", lambda: open("rootfile", "rb").read())
    step("write_root_file", write_root_file)
    step("append_root_file", append_root_file)
    step("truncate_root_file", lambda: os.truncate("rootfile", 0))
    step("chmod_root_file", lambda: os.chmod("rootfile", 0o666))
    step("chown_own_file", lambda: os.chown("file2", 0, 0))
    step("read_secret", lambda: open("secret", "rb").read())
    step("unlink_root_file_sticky", lambda: os.unlink("rootfile"))
    step("listdir_closed_dir", lambda: os.listdir("closed"))
    """
)


def run_as_nobody(cwd: Path) -> dict[str, str]:
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", USER_PROGRAM],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(line.split() for line in proc.stdout.splitlines())


def prepare(pub: Path) -> None:
    pub.mkdir()
    os.chmod(pub, 0o1777)  # world-writable, sticky like /tmp
    (pub / "rootfile").write_bytes(b"root's")
    os.chmod(pub / "rootfile", 0o644)
    (pub / "secret").write_bytes(b"secret")
    os.chmod(pub / "secret", 0o600)
    (pub / "closed").mkdir(mode=0o700)
    (pub / "sgid").mkdir()
    os.chown(pub / "sgid", 0, 4321)
    os.chmod(pub / "sgid", 0o2777)


def test_unprivileged_user_creates_as_self(mount: Mount, tmp_path: Path) -> None:
    prepare(tmp_path / "plain")
    prepare(mount.mnt / "pub")
    result = run_as_nobody(mount.mnt / "pub")
    # Exactly what a local file system does...
    assert result == run_as_nobody(tmp_path / "plain")

    expected = {
        "create": "ok",
        "mkdir": "ok",
        "mkdir_sgid": "ok",
        "create_sgid": "ok",
        "symlink": "ok",
        "mknod_fifo": "ok",
        "hardlink": "ok",
        "rename": "ok",
        "chmod_own": "ok",
        "read_root_file": "ok",
        "write_root_file": "EACCES",
        "append_root_file": "EACCES",
        "truncate_root_file": "EACCES",
        "chmod_root_file": "EPERM",
        "chown_own_file": "EPERM",
        "read_secret": "EACCES",
        "unlink_root_file_sticky": "EPERM",
        "listdir_closed_dir": "EACCES",
    }
    # ... which is this:
    assert result == expected

    b = mount.backing / "pub"

    def owner(p: Path) -> tuple[int, int, int]:
        s = os.lstat(p)
        return s.st_uid, s.st_gid, s.st_mode & 0o7777

    assert owner(b / "file2") == (NOBODY, NOBODY, 0o600)
    assert (b / "file2").read_bytes() == b"mine"
    assert owner(b / "dir") == (NOBODY, NOBODY, 0o755)
    assert owner(b / "link")[:2] == (NOBODY, NOBODY)
    assert os.readlink(b / "link") == "file"
    assert owner(b / "fifo") == (NOBODY, NOBODY, 0o600)
    assert os.lstat(b / "hard").st_ino == os.lstat(b / "file2").st_ino
    # In a set-group-ID directory, new nodes take the directory's group (and
    # subdirectories inherit the set-group-ID bit), as on a local file system.
    assert owner(b / "sgid/sub") == (NOBODY, 4321, 0o2755)
    assert owner(b / "sgid/f") == (NOBODY, 4321, 0o644)
    # The refused operations changed nothing.
    assert owner(b / "rootfile") == (0, 0, 0o644)
    assert (b / "rootfile").read_bytes() == b"root's"
    # The mount shows the same owners as BACKING.
    for name in ("file2", "dir", "link", "fifo", "sgid/sub", "sgid/f", "rootfile"):
        assert owner(mount.mnt / "pub" / name) == owner(b / name), name


def test_root_creates_as_root_and_chown_works(mount: Mount) -> None:
    f = mount.mnt / "f"
    f.write_bytes(b"x")
    assert os.stat(mount.backing / "f")[4:6] == (0, 0)
    os.chown(f, NOBODY, 4321)
    assert os.stat(mount.backing / "f")[4:6] == (NOBODY, 4321)
    os.symlink("f", mount.mnt / "l")
    os.chown(mount.mnt / "l", 1234, 1234, follow_symlinks=False)
    s = os.lstat(mount.backing / "l")
    assert (s.st_uid, s.st_gid) == (1234, 1234)
    assert os.stat(mount.backing / "f")[4:6] == (NOBODY, 4321)  # target untouched
