"""FUSE kernel protocol: opcodes, flags and wire structs (linux/fuse.h, 7.x).

Pure data: no I/O here. Struct layouts follow include/uapi/linux/fuse.h; we
speak protocol 7.40 at most (FUSE_DIRECT_IO_ALLOW_MMAP needs 7.39), which the
kernel accepts from any server that replies with a minor at or below its own.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum

KERNEL_MAJOR = 7
OUR_MAX_MINOR = 40
ROOT_ID = 1
# The kernel refuses reads of /dev/fuse into buffers smaller than this.
MIN_READ_BUFFER = 8192


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# INIT flags (fuse_init_in.flags; bits 32.. travel in flags2).
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13  # READDIRPLUS: entries with their attributes, one request
READDIRPLUS_AUTO = 1 << 14  # ...only when the kernel sees them looked up (ls -l)
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37  # Linux 6.9: a file's reads and writes go to a backing file

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5  # close(2) sends no FLUSH (ignored under the writeback cache)
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7  # open_out.backing_id names the backing file

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_write_in.write_flags
WRITE_KILL_SUIDGID = 1 << 2
# fuse_open_in.open_flags, fuse_create_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0

# fuse_getattr_in.getattr_flags
GETATTR_FH = 1 << 0
# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0

# Notifications (unsolicited messages: unique = 0, error = code).
NOTIFY_INVAL_INODE = 2
NOTIFY_PRUNE = 9  # Linux 6.18 (7.45): forget these nodeids if unused

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR_FMT = "QQQQQQIIIIIIIIII"
ATTR = struct.Struct("<" + ATTR_FMT)
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR_FMT)
ATTR_OUT = struct.Struct("<QII" + ATTR_FMT)
INIT_IN = struct.Struct("<IIIII44x")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... flags2 max_stack_depth
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = READ_IN  # same layout: fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
SETXATTR_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then name padded to 8
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
NOTIFY_PRUNE_OUT = struct.Struct("<IIQ")  # count pad spare, then count u64 nodeids


def encode_dev(dev: int) -> int:
    """glibc dev_t -> the kernel's 32-bit new_encode_dev form used in fuse_attr."""
    major, minor = os.major(dev), os.minor(dev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(dev: int) -> int:
    """The kernel's new_encode_dev form (mknod) -> glibc dev_t."""
    return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def attr_fields(st: os.stat_result) -> tuple[int, ...]:
    """The fuse_attr fields of a stat result, in wire order."""
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return (
        st.st_ino,
        st.st_size,
        st.st_blocks,
        a // 1_000_000_000,
        m // 1_000_000_000,
        c // 1_000_000_000,
        a % 1_000_000_000,
        m % 1_000_000_000,
        c % 1_000_000_000,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        encode_dev(st.st_rdev),
        st.st_blksize,
        0,
    )


def split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def entry_out(nodeid: int, st: os.stat_result, entry_timeout: float, attr_timeout: float) -> bytes:
    es, ens = split_timeout(entry_timeout)
    ats, ans = split_timeout(attr_timeout)
    return ENTRY_OUT.pack(nodeid, 0, es, ats, ens, ans, *attr_fields(st))


def attr_out(st: os.stat_result, attr_timeout: float) -> bytes:
    s, ns = split_timeout(attr_timeout)
    return ATTR_OUT.pack(s, ns, 0, *attr_fields(st))


def dirent(ino: int, next_off: int, dtype: int, name: bytes, plus_entry: bytes = b"") -> bytes:
    """One fuse_dirent (or fuse_direntplus when plus_entry is given), 8-byte aligned."""
    body = plus_entry + DIRENT.pack(ino, next_off, len(name), dtype) + name
    return body + b"\0" * (-len(body) % 8)


def direntplus_size(name: bytes) -> int:
    """The size of one fuse_direntplus record for `name`, padding included."""
    n = ENTRY_OUT.size + DIRENT.size + len(name)
    return n + (-n % 8)


def split_names(data: bytes | memoryview, count: int) -> list[bytes]:
    """The first `count` NUL-terminated names in a request body."""
    parts = bytes(data).split(b"\0", count)
    if len(parts) <= count:
        raise ValueError("request body lacks a NUL-terminated name")
    return parts[:count]


# ioctls on /dev/fuse for passthrough (Linux 6.9, root only): register an open backing
# file, _IOW(229, 1, struct fuse_backing_map {s32 fd; u32 flags; u64 padding}) -> its
# backing id; forget one, _IOW(229, 2, u32 backing id).
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502
BACKING_MAP = struct.Struct("<iIQ")
