"""Mounting and unmounting a FUSE file system without libfuse.

As root we call mount(2) ourselves with an open /dev/fuse descriptor; anyone
else goes through the setuid helper fusermount3, which mounts and hands the
descriptor back over a Unix socket (_FUSE_COMMFD), as libfuse does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import subprocess

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(Exception):
    """Mounting failed; the message is meant for the user."""


def is_mountpoint(path: str) -> bool:
    """True if `path` is itself a mount point (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = line.split(b" ")[4].decode("unicode_escape", "replace")
            if mnt == real:
                return True
    return False


def mount_type(path: str) -> str | None:
    """The file-system type of the mount at `path` (the top one), if any."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if fields[4].decode("unicode_escape", "replace") == real:
                found = fields[fields.index(b"-") + 1].decode()
    return found


def fs_type(dev: int, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the mounted file system whose device number is `dev` (None if
    no mount says it is): that of the files of any path with this st_dev."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if fields[2] == want and "-" in fields:
                return fields[fields.index("-") + 1]
    return None


def is_dead_mount(path: str) -> bool:
    """True if `path` is in a FUSE mount whose daemon is gone (a dead mount).

    statfs, because the kernel always asks the daemon for it: a stat may still be
    answered from cached attributes for a moment after the daemon died."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount_dead(mountpoint: str) -> None:
    """Remove the dead mount at `mountpoint`: detached lazily if files are still
    open in it (they only get ENOTCONN now). OSError if it cannot be done."""
    try:
        unmount(mountpoint)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        unmount(mountpoint, lazy=True)


FUSE_CONF = "/etc/fuse.conf"


def user_allow_other(fuse_conf: str = FUSE_CONF) -> bool:
    """Whether fusermount3 lets non-root users mount with allow_other."""
    try:
        with open(fuse_conf) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount(mountpoint: str, fsname: str, *, max_read: int, allow_other: bool = True) -> int:
    """Mount a FUSE file system at `mountpoint`; return the /dev/fuse descriptor."""
    st = os.stat(mountpoint)
    options = ["default_permissions"]
    if allow_other and (os.geteuid() == 0 or user_allow_other()):
        options.append("allow_other")
    if os.geteuid() == 0:
        return _mount_as_root(mountpoint, fsname, st.st_mode, options, max_read)
    return _mount_with_fusermount(mountpoint, fsname, options, max_read)


def _mount_as_root(
    mountpoint: str, fsname: str, root_mode: int, options: list[str], max_read: int
) -> int:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(
            f"cannot open /dev/fuse: {e.strerror} (is the fuse module loaded?)"
        ) from None
    data = ",".join(
        [
            f"fd={fd}",
            f"rootmode={root_mode & 0o170000:o}",
            f"user_id={os.getuid()}",
            f"group_id={os.getgid()}",
            f"max_read={max_read}",
            *options,
        ]
    )
    rc = _libc.mount(
        fsname.encode(),
        mountpoint.encode(),
        b"fuse.memlend",
        MS_NOSUID | MS_NODEV,
        data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def _mount_with_fusermount(mountpoint: str, fsname: str, options: list[str], max_read: int) -> int:
    helper = shutil.which("fusermount3")
    if helper is None:
        raise MountError("no permission to mount: not root and fusermount3 is not installed")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opts = ",".join([f"fsname={fsname}", "subtype=memlend", f"max_read={max_read}", *options])
    try:
        proc = subprocess.run(
            [helper, "-o", opts, "--", mountpoint],
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1:] or ["fusermount3 failed"]
            raise MountError(f"mount {mountpoint}: {why[0]}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"mount {mountpoint}: fusermount3 sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount `mountpoint`; OSError (errno set) if it cannot be done."""
    if os.geteuid() == 0:
        if _libc.umount2(mountpoint.encode(), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    helper = shutil.which("fusermount3")
    if helper is None:
        raise OSError(errno.EPERM, "not root and fusermount3 is not installed", mountpoint)
    args = [helper, "-u", *(["-z"] if lazy else []), "--", mountpoint]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["fusermount3 -u failed"])[-1]
        busy = "busy" in msg
        raise OSError(errno.EBUSY if busy else errno.EINVAL, msg, mountpoint)
