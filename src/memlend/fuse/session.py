"""The FUSE request loop: read requests from /dev/fuse, decode, call Operations, reply.

Several worker threads block in read(2) on the same /dev/fuse descriptor; the
kernel hands each request to exactly one of them. Each worker owns one
preallocated request buffer (os.readv into it, memoryview slices out of it, no
copies of write payloads) and replies with one os.writev. The GIL is released
in every system call, so a worker waiting on the disk does not stall the
others; a cached read is served without leaving the worker that read it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence

from memlend import native
from memlend.fuse import wire
from memlend.fuse.api import BIG_READ, Context, Operations, SetattrRequest
from memlend.fuse.forgets import ForgetQueue
from memlend.fuse.wire import Op

log = logging.getLogger("memlend.fuse")

NO_REPLY = object()  # FORGET and INTERRUPT must not be answered

_HDR = wire.IN_HEADER.size
_BIG_REQUEST = 256 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_READ = int(Op.READ)
_READ_ARGS = struct.Struct("<QQI")  # fh offset size: the head of fuse_read_in
_OUT = wire.OUT_HEADER
_NO_ATTR = (0,) * 16  # the fuse_attr of a negative entry


class Session:
    """One mounted FUSE connection served by `ops`."""

    def __init__(
        self,
        fd: int,
        ops: Operations,
        *,
        threads: int = 16,
        max_write: int = 1 << 20,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        writeback_cache: bool = False,
        auto_inval_data: bool = True,
        passthrough: bool = False,
    ) -> None:
        self.fd = fd
        self.ops = ops
        self.threads = threads
        self.max_write = max_write
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.writeback_cache = writeback_cache  # asked for; granted or not after INIT
        self.auto_inval_data = auto_inval_data
        self.passthrough = passthrough  # asked for; granted or not after INIT
        self.proto_minor = 0
        self.mmap_allowed = False  # FUSE_DIRECT_IO_ALLOW_MMAP negotiated
        self._bufsize = max(max_write + 4096, wire.MIN_READ_BUFFER)
        self._workers: list[threading.Thread] = []
        self.closed = threading.Event()  # set when a worker found the mount gone
        self._prune_ok = True  # cleared if the kernel refuses FUSE_NOTIFY_PRUNE
        self.forgets: ForgetQueue | None = None  # FORGETs queued in C (fuse/forgets.py)
        self._handlers: dict[int, Callable[..., object]] = {
            Op.LOOKUP: self._lookup,
            Op.FORGET: self._forget,
            Op.BATCH_FORGET: self._batch_forget,
            Op.GETATTR: self._getattr,
            Op.SETATTR: self._setattr,
            Op.READLINK: self._readlink,
            Op.SYMLINK: self._symlink,
            Op.MKNOD: self._mknod,
            Op.MKDIR: self._mkdir,
            Op.UNLINK: self._unlink,
            Op.RMDIR: self._rmdir,
            Op.RENAME: self._rename,
            Op.RENAME2: self._rename2,
            Op.LINK: self._link,
            Op.OPEN: self._open,
            Op.CREATE: self._create,
            Op.WRITE: self._write,
            Op.FLUSH: self._flush,
            Op.RELEASE: self._release,
            Op.FSYNC: self._fsync,
            Op.FALLOCATE: self._fallocate,
            Op.LSEEK: self._lseek,
            Op.OPENDIR: self._opendir,
            Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus,
            Op.RELEASEDIR: self._releasedir,
            Op.FSYNCDIR: self._fsyncdir,
            Op.STATFS: self._statfs,
            Op.SETXATTR: self._setxattr,
            Op.GETXATTR: self._getxattr,
            Op.LISTXATTR: self._listxattr,
            Op.REMOVEXATTR: self._removexattr,
            Op.INTERRUPT: lambda *a: NO_REPLY,
            Op.DESTROY: self._destroy,
        }

    # ---- life cycle -------------------------------------------------------

    def handshake(self) -> None:
        """Answer the kernel's INIT; must run before start()."""
        buf = bytearray(self._bufsize)
        while True:
            n = self._read_request(buf)
            if n is None:
                raise OSError(errno.ENODEV, "FUSE connection closed before INIT")
            _, opcode, unique, *_ = wire.IN_HEADER.unpack_from(buf, 0)
            if opcode == Op.INIT:
                break
            self._reply_error(unique, errno.EIO)
        body = bytes(buf[_HDR:n]).ljust(wire.INIT_IN.size, b"\0")
        major, minor, max_readahead, flags, flags2 = wire.INIT_IN.unpack_from(body)
        if major != wire.KERNEL_MAJOR:
            self._reply_error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"unsupported FUSE protocol {major}.{minor}")
        offered = flags | (flags2 << 32 if flags & wire.INIT_EXT else 0)
        wanted = (
            wire.ASYNC_READ
            | wire.BIG_WRITES
            | wire.MAX_PAGES
            | wire.PARALLEL_DIROPS
            | (wire.AUTO_INVAL_DATA if self.auto_inval_data else 0)
            | wire.INIT_EXT
            | wire.DIRECT_IO_ALLOW_MMAP
            | (wire.WRITEBACK_CACHE if self.writeback_cache else 0)
            # The kernel refuses passthrough beside its writeback cache.
            | (wire.PASSTHROUGH if self.passthrough and not self.writeback_cache else 0)
        )
        if type(self.ops).readdir is not Operations.readdir:
            # `ls -l` and friends: names with their attributes in one request, not a
            # LOOKUP per entry; the kernel asks for it where lookups follow a listing.
            wanted |= wire.DO_READDIRPLUS | wire.READDIRPLUS_AUTO
        if type(self.ops).kill_suidgid is not Operations.kill_suidgid:
            wanted |= wire.HANDLE_KILLPRIV_V2  # the file system clears set-ID bits
        granted = offered & wanted
        self.kernel_proto = (major, minor)  # what the kernel speaks (memlend doctor)
        self.kernel_flags = offered
        self.writeback_cache = bool(granted & wire.WRITEBACK_CACHE)
        self.passthrough = bool(granted & wire.PASSTHROUGH)
        self.mmap_allowed = bool(granted & wire.DIRECT_IO_ALLOW_MMAP)
        self.proto_minor = min(minor, wire.OUR_MAX_MINOR)
        if not granted & wire.MAX_PAGES:
            self.max_write = min(self.max_write, 128 * 1024)
        max_pages = self.max_write // 4096
        out = wire.INIT_OUT.pack(
            wire.KERNEL_MAJOR,
            self.proto_minor,
            max_readahead,
            granted & 0xFFFFFFFF,
            16,  # max_background
            12,  # congestion_threshold
            self.max_write,
            1,  # time_gran: nanoseconds
            max_pages,
            0,
            granted >> 32,
            1 if self.passthrough else 0,  # max_stack_depth: backing files are not FUSE
        )
        self._reply(unique, [out])
        self.ops.init(self)

    def start(self) -> None:
        if native.lib is not None:
            self.forgets = ForgetQueue(native.lib, self.fd, self.ops.forget_many)
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def busy_workers(self) -> int:
        return sum(t.is_alive() for t in self._workers)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the workers to end (after unmount); True if they all did."""
        for t in self._workers:
            t.join(timeout)
        done = not any(t.is_alive() for t in self._workers)
        if done and self.forgets is not None:
            self.forgets.close()
        return done

    def notify_inval_inode(self, nodeid: int, offset: int = 0) -> None:
        """Tell the kernel to drop its cached attributes of `nodeid`, and its cached
        pages from `offset` on (none if `offset` is negative)."""
        body = wire.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, 0)
        try:
            os.writev(self.fd, [_OUT.pack(_OUT.size + len(body), wire.NOTIFY_INVAL_INODE, 0), body])
        except OSError as e:  # ENOENT: the kernel no longer knows it; fine
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.debug("notify_inval_inode(%d): %s", nodeid, e)

    def notify_prune(self, nodeids: Sequence[int]) -> bool:
        """Ask the kernel to forget `nodeids` (those it is not using): it answers with
        FORGETs. False if this kernel cannot (older than Linux 6.18)."""
        if not self._prune_ok:
            return False
        body = wire.NOTIFY_PRUNE_OUT.pack(len(nodeids), 0, 0)
        ids = struct.pack(f"<{len(nodeids)}Q", *nodeids)
        size = _OUT.size + len(body) + len(ids)
        try:
            os.writev(self.fd, [_OUT.pack(size, wire.NOTIFY_PRUNE, 0), body, ids])
        except OSError as e:
            if e.errno == errno.EINVAL:  # unknown notification: an older kernel
                self._prune_ok = False
                log.warning("this kernel cannot be asked to forget inodes (FUSE_NOTIFY_PRUNE): "
                            "the inode table grows with what the kernel keeps")  # fmt: skip
                return False
            if e.errno != errno.ENODEV:
                log.debug("notify_prune(%d nodeids): %s", len(nodeids), e)
        return True

    # ---- the loop ---------------------------------------------------------

    def _read_request(self, buf: bytearray) -> int | None:
        while True:
            try:
                return os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we got it
                if e.errno == errno.ENODEV:
                    return None  # unmounted
                raise

    def _worker(self) -> None:
        # mmap, not bytearray: pages are only taken when a request needs them, and
        # given back after a big one, so idle workers cost (almost) no memory.
        buf = mmap.mmap(-1, self._bufsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(buf)
        handlers = self._handlers
        unpack = wire.IN_HEADER.unpack_from
        read_args = _READ_ARGS.unpack_from
        ops_read, ops_read_done = self.ops.read, self.ops.read_done
        pack_out = _OUT.pack
        fd = self.fd
        # A C read path serves READs of lent blocks itself and hands the rest over;
        # without it, C still reads when it can, to queue FORGETs (fuse/forgets.py).
        fast = self.ops.read_worker()
        next_request = native.lib.next_request if native.lib is not None else None
        while True:
            try:
                if fast is not None:
                    n = fast.next(fd, buf)
                elif next_request is not None:
                    n = next_request(fd, buf)
                else:
                    n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we got it
                if e.errno != errno.ENODEV:  # ENODEV: unmounted, the normal end
                    log.error("reading /dev/fuse failed: %s", e)
                self.closed.set()
                return
            if n <= 0:  # the C read path served it, or found the mount gone
                if n < 0:
                    self.closed.set()
                    return
                continue
            _, opcode, unique, nodeid, uid, gid, pid, extlen, _ = unpack(buf, 0)
            if opcode == _READ:
                # The hot path, inlined: no Context, no dispatch, one writev.
                fh, offset, size = read_args(buf, _HDR)
                # Two failures, two meanings: an error from the read is the answer
                # (ENOENT included: a backing file gone), while ENOENT/ENODEV from
                # writing the reply mean the kernel no longer waits for it.
                try:
                    if fast is not None and fast.asked:  # the lender said no already
                        parts = ops_read(nodeid, fh, offset, size, True)
                    else:
                        parts = ops_read(nodeid, fh, offset, size)
                    iov = [pack_out(_OUT.size + sum(map(len, parts)), 0, unique), *parts]
                except OSError as e:
                    self._reply_error(unique, e.errno or errno.EIO)
                except Exception:
                    log.exception("READ failed")
                    self._reply_error(unique, errno.EIO)
                else:
                    try:
                        os.writev(fd, iov)
                    except OSError as e:
                        self._reply_failed(unique, e)
                if size > BIG_READ:  # its reply buffer is free again, also after a failure
                    ops_read_done()
                continue
            handler = handlers.get(opcode)
            if handler is None:
                self._reply_error(unique, errno.ENOSYS)
                continue
            body = view[_HDR : n - extlen * 8]
            try:
                result = handler(nodeid, body, Context(uid, gid, pid))
            except OSError as e:
                self._reply_error(unique, e.errno or errno.EIO)
                continue
            except Exception:
                log.exception("%s failed", Op(opcode).name)
                self._reply_error(unique, errno.EIO)
                continue
            if result is None:
                self._reply(unique, ())
            elif isinstance(result, bytes | memoryview | bytearray):
                self._reply(unique, [result])
            elif result is not NO_REPLY:
                self._reply(unique, result)
            if n > _BIG_REQUEST:
                buf.madvise(mmap.MADV_DONTNEED)  # request done: give its pages back

    def _reply(self, unique: int, payload: Sequence[bytes | memoryview]) -> None:
        try:
            size = _OUT.size + sum(len(p) for p in payload)
            if len(payload) >= _IOV_MAX:
                # writev() refuses more than IOV_MAX pieces (EINVAL): a READDIR of a big
                # directory (Linux 6.x asks for up to 128 KiB of entries) has thousands
                payload = [b"".join(payload)]
            os.writev(self.fd, [_OUT.pack(size, 0, unique), *payload])
        except OSError as e:
            self._reply_failed(unique, e)
        except Exception:  # a handler returned something that is not a reply
            log.exception("reply to request %d failed", unique)
            self._reply_error(unique, errno.EIO)

    def _reply_failed(self, unique: int, e: OSError) -> None:
        # ENOENT: the request was interrupted and the kernel gave up on it; ENODEV:
        # unmounted. Anything else: the kernel refused the reply and still waits.
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("reply to request %d failed: %s", unique, e)
            # A request never answered blocks its caller for good (not even
            # SIGKILL frees it): answer it with an error instead.
            self._reply_error(unique, errno.EIO)

    def _reply_error(self, unique: int, err: int) -> None:
        if not 0 < err < 512:
            err = errno.EIO  # the kernel refuses (EINVAL) errors outside 1..511
        try:
            os.write(self.fd, _OUT.pack(_OUT.size, -err, unique))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("error reply to request %d failed: %s", unique, e)

    # ---- decoding: one method per opcode ----------------------------------

    def _entry(self, result: tuple[int, os.stat_result]) -> bytes:
        nodeid, st = result
        return wire.entry_out(nodeid, st, self.entry_timeout, self.attr_timeout)

    def _lookup(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        (name,) = wire.split_names(body, 1)
        try:
            return self._entry(self.ops.lookup(ctx, nodeid, name))
        except FileNotFoundError:
            if not self.entry_timeout:
                raise
            # A negative entry: the kernel remembers the name is absent for as long
            # as a positive one, instead of asking again (a create's LOOKUP, PATH
            # searches). Names made outside the mount show within entry_timeout.
            es, ens = wire.split_timeout(self.entry_timeout)
            return wire.ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *_NO_ATTR)

    def _forget(self, nodeid: int, body: memoryview, ctx: Context) -> object:
        (nlookup,) = wire.FORGET_IN.unpack_from(body)
        self.ops.forget(nodeid, nlookup)
        return NO_REPLY

    def _batch_forget(self, nodeid: int, body: memoryview, ctx: Context) -> object:
        count, _ = wire.BATCH_FORGET_IN.unpack_from(body)
        base = wire.BATCH_FORGET_IN.size
        for i in range(count):
            node, nlookup = wire.FORGET_ONE.unpack_from(body, base + i * wire.FORGET_ONE.size)
            self.ops.forget(node, nlookup)
        return NO_REPLY

    def _getattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        flags, _, fh = wire.GETATTR_IN.unpack_from(body)
        st = self.ops.getattr(nodeid, fh if flags & wire.GETATTR_FH else None)
        return wire.attr_out(st, self.attr_timeout)

    def _setattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, uid, gid, _) = (
            wire.SETATTR_IN.unpack_from(body)
        )
        req = SetattrRequest(
            fh=fh if valid & wire.FATTR_FH else None,
            mode=mode if valid & wire.FATTR_MODE else None,
            uid=uid if valid & wire.FATTR_UID else None,
            gid=gid if valid & wire.FATTR_GID else None,
            size=size if valid & wire.FATTR_SIZE else None,
            atime_ns=atime * 1_000_000_000 + atimens if valid & wire.FATTR_ATIME else None,
            mtime_ns=mtime * 1_000_000_000 + mtimens if valid & wire.FATTR_MTIME else None,
            atime_now=bool(valid & wire.FATTR_ATIME_NOW),
            mtime_now=bool(valid & wire.FATTR_MTIME_NOW),
            kill_suidgid=bool(valid & wire.FATTR_KILL_SUIDGID),
        )
        return wire.attr_out(self.ops.setattr(ctx, nodeid, req), self.attr_timeout)

    def _readlink(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        return self.ops.readlink(nodeid)

    def _symlink(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        name, target = wire.split_names(body, 2)
        return self._entry(self.ops.symlink(ctx, nodeid, name, target))

    def _mknod(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        mode, rdev, _umask, _ = wire.MKNOD_IN.unpack_from(body)
        (name,) = wire.split_names(body[wire.MKNOD_IN.size :], 1)
        return self._entry(self.ops.mknod(ctx, nodeid, name, mode, wire.decode_dev(rdev)))

    def _mkdir(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        mode, _umask = wire.MKDIR_IN.unpack_from(body)
        (name,) = wire.split_names(body[wire.MKDIR_IN.size :], 1)
        return self._entry(self.ops.mkdir(ctx, nodeid, name, mode))

    def _unlink(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        (name,) = wire.split_names(body, 1)
        self.ops.unlink(ctx, nodeid, name)

    def _rmdir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        (name,) = wire.split_names(body, 1)
        self.ops.rmdir(ctx, nodeid, name)

    def _rename(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        (newdir,) = wire.RENAME_IN.unpack_from(body)
        old, new = wire.split_names(body[wire.RENAME_IN.size :], 2)
        self.ops.rename(ctx, nodeid, old, newdir, new, 0)

    def _rename2(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        newdir, flags, _ = wire.RENAME2_IN.unpack_from(body)
        old, new = wire.split_names(body[wire.RENAME2_IN.size :], 2)
        self.ops.rename(ctx, nodeid, old, newdir, new, flags)

    def _link(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        (oldnode,) = wire.LINK_IN.unpack_from(body)
        (name,) = wire.split_names(body[wire.LINK_IN.size :], 1)
        return self._entry(self.ops.link(ctx, oldnode, nodeid, name))

    def _open(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        flags, in_flags = wire.OPEN_IN.unpack_from(body)
        if in_flags & wire.OPEN_KILL_SUIDGID:  # O_TRUNC (only with FUSE_ATOMIC_O_TRUNC)
            self.ops.kill_suidgid(ctx, nodeid, None)
        fh, open_flags = self.ops.open(ctx, nodeid, flags)
        return wire.OPEN_OUT.pack(fh, open_flags, self._backing(fh, open_flags))

    def _create(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        flags, mode, _umask, in_flags = wire.CREATE_IN.unpack_from(body)
        (name,) = wire.split_names(body[wire.CREATE_IN.size :], 1)
        kill = bool(in_flags & wire.OPEN_KILL_SUIDGID)
        node, st, fh, open_flags = self.ops.create(ctx, nodeid, name, mode, flags, kill)
        out = wire.OPEN_OUT.pack(fh, open_flags, self._backing(fh, open_flags))
        return self._entry((node, st)) + out

    def _backing(self, fh: int, open_flags: int) -> int:
        return self.ops.backing_id(fh) if open_flags & wire.FOPEN_PASSTHROUGH else 0

    # ---- passthrough: backing files registered with the kernel (root only) ----

    def backing_open(self, fd: int) -> int:
        """Register the open backing file `fd`; its id, for FOPEN_PASSTHROUGH replies.
        OSError if the kernel refuses (not root, a stacked backing file system...)."""
        arg = bytearray(wire.BACKING_MAP.pack(fd, 0, 0))
        return fcntl.ioctl(self.fd, wire.DEV_IOC_BACKING_OPEN, arg, True)

    def backing_close(self, backing_id: int) -> None:
        """Forget a backing id; files opened with it keep their backing file."""
        arg = bytearray(struct.pack("<I", backing_id))
        try:
            fcntl.ioctl(self.fd, wire.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as e:  # unmounted meanwhile: nothing left to forget
            log.debug("backing_close(%d): %s", backing_id, e)

    def _write(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh, offset, size, write_flags, *_ = wire.WRITE_IN.unpack_from(body)
        if write_flags & wire.WRITE_KILL_SUIDGID:  # before the data, as the kernel does
            self.ops.kill_suidgid(ctx, nodeid, fh)
        start = wire.WRITE_IN.size
        written = self.ops.write(nodeid, fh, offset, body[start : start + size])
        return wire.WRITE_OUT.pack(written, 0)

    def _flush(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, *_ = wire.FLUSH_IN.unpack_from(body)
        self.ops.flush(nodeid, fh)

    def _release(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, *_ = wire.RELEASE_IN.unpack_from(body)
        self.ops.release(nodeid, fh)

    def _fsync(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, flags, _ = wire.FSYNC_IN.unpack_from(body)
        self.ops.fsync(nodeid, fh, bool(flags & wire.FSYNC_FDATASYNC))

    def _fallocate(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, offset, length, mode, _ = wire.FALLOCATE_IN.unpack_from(body)
        self.ops.fallocate(nodeid, fh, offset, length, mode)

    def _lseek(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh, offset, whence, _ = wire.LSEEK_IN.unpack_from(body)
        return wire.LSEEK_OUT.pack(self.ops.lseek(nodeid, fh, offset, whence))

    def _opendir(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        flags, _ = wire.OPEN_IN.unpack_from(body)
        return wire.OPEN_OUT.pack(self.ops.opendir(ctx, nodeid, flags), 0, 0)

    def _readdir(self, nodeid: int, body: memoryview, ctx: Context) -> list[bytes]:
        fh, offset, size, *_ = wire.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        for entry in self.ops.readdir(nodeid, fh, offset):
            rec = wire.dirent(entry.ino, entry.next_offset, entry.dtype, entry.name)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return out  # thousands of records for a big directory: _reply joins them

    def _readdirplus(self, nodeid: int, body: memoryview, ctx: Context) -> list[bytes]:
        fh, offset, size, *_ = wire.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        for entry in self.ops.readdir(nodeid, fh, offset):
            need = wire.direntplus_size(entry.name)
            if used + need > size:
                break  # checked before the lookup: an entry not sent is not looked up
            plus = None
            if entry.name not in (b".", b".."):
                try:
                    plus = self._entry(self.ops.lookup(ctx, nodeid, entry.name))
                except OSError:
                    pass  # gone meanwhile: sent without attributes, looked up later
            if plus is None:  # nodeid 0: the kernel makes no entry of it
                plus = wire.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0, entry.ino, *_NO_ATTR[1:9],
                                           entry.dtype << 12, *_NO_ATTR[10:])  # fmt: skip
            out.append(wire.dirent(entry.ino, entry.next_offset, entry.dtype, entry.name, plus))
            used += need
        return out

    def _releasedir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, *_ = wire.RELEASE_IN.unpack_from(body)
        self.ops.releasedir(nodeid, fh)

    def _fsyncdir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, flags, _ = wire.FSYNC_IN.unpack_from(body)
        self.ops.fsyncdir(nodeid, fh, bool(flags & wire.FSYNC_FDATASYNC))

    def _statfs(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        s = self.ops.statfs(nodeid)
        return wire.KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
            s.f_bsize, s.f_namemax, s.f_frsize, 0,
        )  # fmt: skip

    def _setxattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        size, flags = wire.SETXATTR_IN.unpack_from(body)
        rest = body[wire.SETXATTR_IN.size :]
        (name,) = wire.split_names(rest, 1)
        start = len(name) + 1
        self.ops.setxattr(nodeid, name, bytes(rest[start : start + size]), flags)

    def _getxattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        size, _ = wire.GETXATTR_IN.unpack_from(body)
        (name,) = wire.split_names(body[wire.GETXATTR_IN.size :], 1)
        return self._sized(self.ops.getxattr(nodeid, name), size)

    def _listxattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        size, _ = wire.GETXATTR_IN.unpack_from(body)
        names = self.ops.listxattr(nodeid)
        return self._sized(b"".join(n + b"\0" for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        # size 0 asks only for the length; a too-small buffer is ERANGE.
        if size == 0:
            return wire.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        return value

    def _removexattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        (name,) = wire.split_names(body, 1)
        self.ops.removexattr(nodeid, name)

    def _destroy(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.ops.destroy()
