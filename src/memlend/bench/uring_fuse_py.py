"""uring_fuse.c's server in Python: can a Python loop drive FUSE over io_uring, and to what end?

    python -m memlend.bench.uring_fuse_py SRCFILE MOUNTPOINT classic|uring

Serves SRCFILE (held in memory) as MOUNTPOINT/data, read-only, FOPEN_DIRECT_IO, with
the same requests answered as uring_fuse.c (LOOKUP, GETATTR, OPEN(DIR), READ, READDIR
empty, STATFS, FLUSH, RELEASE(DIR), FORGET; else ENOSYS), in the way memlend's loop
works: os.readv into a preallocated buffer, one os.writev per reply (classic, one
thread); or over io_uring (uring): one thread per possible CPU, each with its own ring
(IORING_SETUP_SQE128 | SINGLE_ISSUER | DEFER_TASKRUN, set up through ctypes syscalls
and mmap), 4 registered entries whose buffers are anonymous mmaps, and one
io_uring_enter() per request (ctypes, which drops the GIL) to commit the reply and
fetch the next request. SQEs are written into the mmap'd ring with struct.pack_into and
published by storing the new tail: the ordering relies on x86's total store order
(CPython has no release store); a benchmark, not a design. mount(2) as root through
memlend.fuse.mount. Prints one JSON line of counters when unmounted.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import struct
import sys
import threading

from memlend.fuse.mount import mount

IN_HDR = struct.Struct("<IIQQIIII")  # len opcode unique nodeid uid gid pid padding
OUT_HDR = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
READ_IN = struct.Struct("<QQI")  # fh offset size
OPEN_IN = struct.Struct("<II")  # flags open_flags
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes

LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE, FLUSH = 1, 2, 3, 14, 15, 17, 18, 25
INIT, OPENDIR, READDIR, RELEASEDIR, ACCESS, INTERRUPT, BATCH_FORGET = 26, 27, 28, 29, 34, 36, 42
ROOT, FILE_INO, TTL = 1, 2, 3600
FOPEN_DIRECT_IO = 1
FUSE_MAX_PAGES, FUSE_INIT_EXT, FUSE_OVER_IO_URING = 1 << 22, 1 << 30, 1 << 41
MAX_WRITE = 1 << 20

# io_uring (include/uapi/linux/io_uring.h) and FUSE-over-io_uring (linux/fuse.h 7.42+)
NR_IO_URING_SETUP, NR_IO_URING_ENTER = 425, 426
IORING_SETUP_SQE128, IORING_SETUP_CQSIZE = 1 << 10, 1 << 3
IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_DEFER_TASKRUN = 1 << 12, 1 << 13
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_FEAT_SINGLE_MMAP, IORING_ENTER_GETEVENTS, IORING_OP_URING_CMD = 1, 1, 46
CMD_REGISTER, CMD_COMMIT_AND_FETCH = 1, 2
PARAMS = struct.Struct("<7I3I10I10I")  # io_uring_params without the offsets' u64 tails
HEADER_SZ = 288  # struct fuse_uring_req_header: in_out[128] op_in[128] ent_in_out[32]
DEPTH = 4

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Server:
    def __init__(self, src: str, mnt: str, mode: str) -> None:
        with open(src, "rb") as f:
            self.data = f.read()
        self.size = len(self.data)
        self.view = memoryview(self.data)
        self.mode = mode
        self.mnt = mnt
        self.fd = mount(mnt, "uring_fuse_py", max_read=MAX_WRITE, allow_other=False)
        self.dev_requests = 0
        self.ring_requests = 0
        self.attrs: dict[int, bytes] = {}
        for ino in (ROOT, FILE_INO):
            attr = [ino, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4096, 0]
            if ino == ROOT:
                attr[9], attr[10] = stat.S_IFDIR | 0o755, 2
            else:
                attr[1], attr[2] = self.size, (self.size + 511) // 512
                attr[9], attr[10] = stat.S_IFREG | 0o444, 1
            self.attrs[ino] = ATTR.pack(*attr)

    # ---- the requests, shared by both transports ----------------------------------

    def handle(
        self, opcode: int, nodeid: int, opin: memoryview, name: bytes
    ) -> tuple[int, bytes | memoryview]:
        """(error, reply body) for one request; error -1 means: no reply."""
        if opcode == READ:
            _fh, off, size = READ_IN.unpack_from(opin)
            return 0, self.view[off : min(off + size, self.size)]
        if opcode == LOOKUP:
            if nodeid != ROOT or name != b"data":
                return -errno.ENOENT, b""
            return 0, ENTRY_HEAD.pack(FILE_INO, 0, TTL, TTL, 0, 0) + self.attrs[FILE_INO]
        if opcode == GETATTR:
            if nodeid not in self.attrs:
                return -errno.ENOENT, b""
            return 0, ATTR_OUT_HEAD.pack(TTL, 0, 0) + self.attrs[nodeid]
        if opcode in (OPEN, OPENDIR):
            if opcode == OPEN and OPEN_IN.unpack_from(opin)[0] & os.O_ACCMODE != os.O_RDONLY:
                return -errno.EACCES, b""
            return 0, OPEN_OUT.pack(0, FOPEN_DIRECT_IO if opcode == OPEN else 0, 0)
        if opcode in (READDIR, FLUSH, RELEASE, RELEASEDIR, ACCESS):
            return 0, b""
        if opcode == STATFS:
            return 0, struct.pack("<QQQQQIII28x", 0, 0, 0, 0, 0, 4096, 255, 4096)
        if opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            return -1, b""
        return -errno.ENOSYS, b""

    # ---- classic ------------------------------------------------------------------

    def dev_loop(self) -> None:
        buf = bytearray(MAX_WRITE + 8192)
        view = memoryview(buf)
        fd = self.fd
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                raise
            _len, opcode, unique, nodeid = IN_HDR.unpack_from(buf)[:4]
            self.dev_requests += 1
            if opcode == INIT:
                self.init(unique, view[40:n])
                continue
            body = view[40:n]
            name = bytes(body).split(b"\0", 1)[0] if opcode == LOOKUP else b""
            err, reply = self.handle(opcode, nodeid, body, name)
            if err == -1:
                continue
            if err:
                reply = b""
            try:
                os.writev(fd, [OUT_HDR.pack(16 + len(reply), err, unique), reply])
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def init(self, unique: int, body: memoryview) -> None:
        _major, minor, readahead, flags, flags2 = INIT_IN.unpack_from(body)
        offered = flags | (flags2 << 32 if flags & FUSE_INIT_EXT else 0)
        want = FUSE_MAX_PAGES | FUSE_INIT_EXT | (FUSE_OVER_IO_URING if self.mode == "uring" else 0)
        if want & FUSE_OVER_IO_URING and not offered & FUSE_OVER_IO_URING:
            print("uring_fuse_py: the kernel did not offer FUSE_OVER_IO_URING", file=sys.stderr)
            _libc.umount2(self.mnt.encode(), 2)  # MNT_DETACH: leave no dead mount behind
            os._exit(3)
        want &= offered
        out = INIT_OUT.pack(
            7, minor, readahead, want & 0xFFFFFFFF, 16, 12, MAX_WRITE, 1, 256, 0, want >> 32
        )
        os.writev(self.fd, [OUT_HDR.pack(16 + len(out), 0, unique), out])
        if self.mode == "uring":
            for qid in range(os.cpu_count() or 1):
                threading.Thread(target=Ring(self, qid).loop, daemon=True).start()


class Ring:
    """One queue: its own io_uring, DEPTH entries, the thread that waits on it."""

    def __init__(self, server: Server, qid: int) -> None:
        self.server, self.qid = server, qid
        self.payload_sz = MAX_WRITE

    def setup(self) -> None:
        params = ctypes.create_string_buffer(120)
        flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE
        flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        struct.pack_into("<II", params, 4, 2 * DEPTH, flags)  # cq_entries, flags
        fd = _syscall(NR_IO_URING_SETUP, DEPTH, params)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")
        self.ring_fd = fd
        p = PARAMS.unpack_from(params)
        sq_entries, cq_entries, features = p[0], p[1], p[5]
        sq = p[10:17]  # head tail ring_mask ring_entries flags dropped array
        cq = p[20:26]  # head tail ring_mask ring_entries overflow cqes
        sq_len = sq[6] + sq_entries * 4
        cq_len = cq[5] + cq_entries * 16
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if features & IORING_FEAT_SINGLE_MMAP:
            self.sq = self.cq = mmap.mmap(
                fd, max(sq_len, cq_len), mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING
            )
        else:
            self.sq = mmap.mmap(fd, sq_len, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQ_RING)
            self.cq = mmap.mmap(fd, cq_len, mmap.MAP_SHARED, prot, offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(fd, sq_entries * 128, mmap.MAP_SHARED, prot, offset=IORING_OFF_SQES)
        self.sq_tail, self.sq_mask, self.sq_array = sq[1], sq[2], sq[6]
        self.cq_head, self.cq_tail, self.cq_mask, self.cqes = cq[0], cq[1], cq[2], cq[5]
        self.mask_sq = struct.unpack_from("<I", self.sq, self.sq_mask)[0]
        self.mask_cq = struct.unpack_from("<I", self.cq, self.cq_mask)[0]
        self.pending = 0
        # Entry buffers: anonymous mmaps (stable addresses), and the iovecs naming them.
        self.headers = [mmap.mmap(-1, 4096) for _ in range(DEPTH)]
        self.payloads = [mmap.mmap(-1, self.payload_sz) for _ in range(DEPTH)]
        self.iovs = (ctypes.c_uint64 * (4 * DEPTH))()
        for i in range(DEPTH):
            self.iovs[4 * i] = ctypes.addressof(ctypes.c_char.from_buffer(self.headers[i]))
            self.iovs[4 * i + 1] = HEADER_SZ
            self.iovs[4 * i + 2] = ctypes.addressof(ctypes.c_char.from_buffer(self.payloads[i]))
            self.iovs[4 * i + 3] = self.payload_sz

    def queue(self, ent: int, cmd: int, commit_id: int) -> None:
        tail = struct.unpack_from("<I", self.sq, self.sq_tail)[0]
        idx = tail & self.mask_sq
        off = idx * 128
        addr, length = 0, 0
        if cmd == CMD_REGISTER:
            addr, length = ctypes.addressof(self.iovs) + 32 * ent, 2
        # opcode flags ioprio fd | cmd_op pad | addr | len rw_flags | user_data | rest
        struct.pack_into(
            "<BBHiIIQIIQ8x",
            self.sqes,
            off,
            IORING_OP_URING_CMD,
            0,
            0,
            self.server.fd,
            cmd,
            0,
            addr,
            length,
            0,
            ent,
        )
        struct.pack_into("<QQH62x", self.sqes, off + 48, 0, commit_id, self.qid)  # 80 bytes
        struct.pack_into("<I", self.sq, self.sq_array + 4 * idx, idx)
        struct.pack_into("<I", self.sq, self.sq_tail, tail + 1)  # x86 TSO: stores in order
        self.pending += 1

    def loop(self) -> None:
        self.setup()
        for i in range(DEPTH):
            self.queue(i, CMD_REGISTER, 0)
        server, cq = self.server, self.cq
        handle = server.handle
        while True:
            n = _syscall(
                NR_IO_URING_ENTER, self.ring_fd, self.pending, 1, IORING_ENTER_GETEVENTS, None, 0
            )
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                raise OSError(ctypes.get_errno(), "io_uring_enter")
            self.pending -= min(n, self.pending)
            head, tail = struct.unpack_from("<II", cq, self.cq_head)
            while head != tail:
                ent, res, _ = struct.unpack_from("<QiI", cq, self.cqes + 16 * (head & self.mask_cq))
                head += 1
                if res in (-errno.EAGAIN, -errno.EINTR):
                    self.queue(ent, CMD_REGISTER, 0)
                    continue
                if res < 0:
                    return  # ENOTCONN: unmounted
                hdr, payload = self.headers[ent], self.payloads[ent]
                _len, opcode, unique, nodeid = IN_HDR.unpack_from(hdr)[:4]
                commit_id, in_sz = struct.unpack_from("<QI", hdr, 264)
                server.ring_requests += 1
                name = payload[:in_sz].split(b"\0", 1)[0] if opcode == LOOKUP else b""
                err, reply = handle(opcode, nodeid, memoryview(hdr)[128:256], name)
                size = 0 if err else len(reply)
                if size:
                    payload[:size] = reply
                struct.pack_into("<IiQ", hdr, 0, 16 + size, err, unique)
                struct.pack_into("<I", hdr, 272, size)
                self.queue(ent, CMD_COMMIT_AND_FETCH, commit_id)
            struct.pack_into("<I", cq, self.cq_head, head)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[2] not in ("classic", "uring"):
        print(
            "usage: python -m memlend.bench.uring_fuse_py SRCFILE MOUNTPOINT classic|uring",
            file=sys.stderr,
        )
        return 2
    srv = Server(*args)
    srv.dev_loop()
    print(
        json.dumps(
            {"mode": args[2], "dev_requests": srv.dev_requests, "ring_requests": srv.ring_requests}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
