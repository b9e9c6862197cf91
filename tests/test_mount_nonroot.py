"""Non-root mounts through fusermount3, as uid 65534 (nobody) and a second user.

This host's /dev/fuse is 0600 root and fusermount3 opens it with the caller's
rights, so no user but root can mount here (Debian's udev makes it 0666). The test
therefore runs in a private mount namespace (unshare -m) with a 0666 /dev/fuse node
bind-mounted over the real one and a fresh tmpfs on /tmp: the host's /dev and /tmp
are untouched, and all of it goes away with the namespace. The venv's Python lives
under /root (0700 here), so the users run the system Python of the same version with
the venv's packages on PYTHONPATH.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import memlend
from conftest import _wait_gone


def _second_user() -> int:
    """fusermount3 wants a passwd entry: the first unprivileged account other than nobody."""
    ids = sorted(p.pw_uid for p in pwd.getpwall() if 0 < p.pw_uid < 65534)
    ids = [u for u in ids if u >= 1000] or ids
    return ids[0] if ids else 65533


USERS = (65534, _second_user())  # nobody and another user
SRC = str(Path(memlend.__file__).resolve().parent.parent)
SITE = sysconfig.get_paths()["purelib"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users and unshare"),
    pytest.mark.skipif(
        not (shutil.which("unshare") and shutil.which("setpriv") and shutil.which("fusermount3")),
        reason="needs unshare, setpriv (util-linux) and fusermount3",
    ),
]


def _python_for(uid: int) -> str:
    """A Python of this version that `uid` may run."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        ok = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", "-i",
             exe, "-c", ""],
            capture_output=True, check=False,
        )  # fmt: skip
        if os.path.exists(exe) and ok.returncode == 0:
            return exe
    pytest.skip(f"no {version} that uid {uid} can run (the venv's is under a private home)")


SCRIPT = r"""
set -u
mount -t tmpfs -o mode=1777 memlend-test /tmp
mknod -m 666 /tmp/fuse c 10 229
mount --bind /tmp/fuse /dev/fuse
as() { u=$1; shift; setpriv --reuid=$u --regid=$u --clear-groups env -i PATH=/usr/bin:/bin \
       PYTHONPATH="$PYPATH" "$@"; }
memlend() { u=$1; shift; as $u "$PY" -m memlend "$@"; }
trap 'for u in $USERS; do umount -l /tmp/u$u/m 2>/dev/null; done' EXIT
for u in $USERS; do
  mkdir -p /tmp/u$u/b /tmp/u$u/m
  echo "backing of $u" > /tmp/u$u/b/f
  chown -R $u:$u /tmp/u$u
done
# A third user plants a symlink where uid 65532's log directory would be.
as 65534 ln -s /tmp/u65534 /tmp/memlend-65532
mkdir -p /tmp/u65532/b /tmp/u65532/m && chown -R 65532:65532 /tmp/u65532
out=$(memlend 65532 mount /tmp/u65532/b /tmp/u65532/m 2>&1)
echo "planted: rc=$? $(echo "$out" | tail -n 1)"
# Both users mount with the default log directory: the first must not lock out the next.
for u in $USERS; do
  memlend $u mount /tmp/u$u/b /tmp/u$u/m || exit 10
  echo "pid $u $(memlend $u stats /tmp/u$u/m --json | "$PY" -c "$PRINT_PID")"
done
for u in $USERS; do
  echo "read $u: $(as $u cat /tmp/u$u/m/f)"
  as $u sh -c "echo written by \$(id -u) > /tmp/u$u/m/new" || exit 11
  echo "backing $u: $(cat /tmp/u$u/b/new) owner $(stat -c %u /tmp/u$u/b/new)"
  echo "logdir $u: $(stat -c '%a %u %F' /tmp/memlend-$u) $(ls /tmp/memlend-$u)"
  echo "mounted $u: $(grep -c " /tmp/u$u/m fuse.memlend " /proc/self/mounts)"
done
for u in $USERS; do memlend $u umount /tmp/u$u/m || exit 12; done
echo "left mounted: $(grep -c " /tmp/u[0-9]*/m fuse.memlend " /proc/self/mounts)"
"""


def test_two_users_mount_read_write_and_unmount(tmp_path: Path) -> None:
    py = _python_for(USERS[0])
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PY": py,
        "PYPATH": f"{SRC}:{SITE}",
        "USERS": " ".join(map(str, USERS)),
        "PRINT_PID": "import json, sys; print(json.load(sys.stdin)['pid'])",
    }
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT],
        capture_output=True, text=True, env=env, timeout=120, cwd="/",
    )  # fmt: skip
    out = proc.stdout
    pids = [int(line.split()[2]) for line in out.splitlines() if line.startswith("pid ")]
    for pid in pids:  # the namespace's daemons must end with their unmount
        if not _wait_gone(pid):
            os.kill(pid, 9)
            pytest.fail(f"daemon {pid} outlived its unmount")
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    planted = lines["planted"]
    assert planted.startswith("rc=2 memlend: /tmp/memlend-65532 is a symbolic link"), planted
    assert len(pids) == 2
    for u in USERS:
        assert lines[f"read {u}"] == f"backing of {u}"
        assert lines[f"backing {u}"] == f"written by {u} owner {u}"
        mode, owner, *kind_and_files = lines[f"logdir {u}"].split()
        assert (mode, owner) == ("700", str(u))
        assert kind_and_files[-1] == f"mount-tmp_u{u}_m.log"
        assert lines[f"mounted {u}"] == "1"
    assert lines["left mounted"] == "0"
