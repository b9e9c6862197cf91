"""Can a FUSE mount keep serving across a daemon restart? A probe (root only).

    python -m memlend.bench.restart_probe [--variant VARIANT|all] [--tier memlend|kernel]
                                          [--rounds N] [--json]
    python -m memlend.bench.restart_probe --replay NODES OPEN

A supervisor (this process) mounts and keeps the /dev/fuse descriptor; it starts a
worker (memlend's Session serving the real Passthrough operations, in a child
process that inherits the same open /dev/fuse file) and an application (another
process): files open for reading and writing, a directory open, a file unlinked while
open, and three requests in flight that hooks of the worker hold (a read of `slow`
before it is served; an O_APPEND write to `log` and a mkdir after they are done).
Then it kills the worker with SIGKILL, starts a new one on the same descriptor, and
reports what the application sees. Results: docs/reliability.md, "Restarting the
daemon under a live mount".

Identities across the restart: the worker appends every nodeid it gives the kernel
(with the backing inode's file handle), every FORGET, and every open file and
directory handle (fh, nodeid, open flags, passthrough backing id) to a journal file;
the new worker replays it: nodeids map to the same file handles (reopened lazily, by
open_by_handle_at), and each open fh is reopened by handle with the flags it was
opened with. --replay times that replay at scale, without a mount.

Variants (what the new worker does):
  resend     replays the journal, serves, then writes FUSE_NOTIFY_RESEND (code 7): the
             requests the dead worker had read go back to the pending queue, their
             unique with bit 63 set; the reply echoes it.
  standby    as resend, with the new worker started (interpreter and imports) before
             the kill and waiting: what a supervisor keeping a spare worker would see.
  keep-fds   as resend, and the worker hands every backing descriptor it opens to the
             supervisor (SCM_RIGHTS), which passes them on to the new worker: a file
             unlinked while open keeps its inode.
  no-bit     as standby, but the replies other than READ's leave bit 63 out of the
             unique: must a reply echo it?
  no-resend  as resend without the notification: what happens to the request in flight.
  handshake  starts as a fresh daemon would, with Session.handshake() (waits for INIT).
  no-hold    the supervisor closes its descriptor once the worker runs: the worker's
             death is the last close of /dev/fuse, as with the daemon today.
A request left unanswered is freed by aborting the connection (fusectl), so every
variant ends with the mount gone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from memlend.fs.cache import BlockCache, NoCache
from memlend.fs.inodes import Inode, open_by_handle
from memlend.fs.passthrough import _REOPEN_MASK, DirHandle, Handle, IoMode, Passthrough
from memlend.fuse import wire
from memlend.fuse.api import Context
from memlend.fuse.mount import is_mountpoint, mount, unmount
from memlend.fuse.session import Session
from memlend.stats import MountStats

NOTIFY_RESEND = 7  # FUSE_NOTIFY_RESEND, Linux 6.9 (protocol 7.40)
UNIQUE_RESEND = 1 << 63  # FUSE_UNIQUE_RESEND: set in the unique of a resent request
HAS_RESEND = 1 << 39  # FUSE_HAS_RESEND: offered by the kernel in INIT (information only)
VARIANTS = ("resend", "standby", "keep-fds", "no-bit", "no-resend", "handshake", "no-hold")
ANSWER_WITHIN = 5.0  # seconds given to a request after the new worker is ready
FUSECTL = "/sys/fs/fuse/connections"
HELD = ("read", "write", "mkdir")  # the requests in the worker's hands when it dies
HELD_DIR = "held-dir"
# `slow` and `log` are above PASSTHROUGH_MAX, so that on the kernel tier too their reads
# and writes reach the worker (smaller files read or written are opened in passthrough).
SIZES = {"log": (1 << 20) + 100, "a": 1 << 20, "b": 256 << 10, "slow": 2 << 20,
         "u": 16 << 10, "sub/c": 4096}  # fmt: skip
ATTR_TIMEOUT = 0.2  # short, so that the checks after the restart reach the daemon


# ---- the worker ----------------------------------------------------------------


class Journal:
    """An append-only record of what the kernel holds: one write(2) per record."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def add(self, *fields: object) -> None:
        os.write(self.fd, (" ".join(map(str, fields)) + "\n").encode())


def read_journal(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.endswith("\n")]


class JournaledPassthrough(Passthrough):
    """The real Passthrough, journaling its identities. Test hooks (the first worker
    only) keep three requests in the worker's hands, each after touching `marker`.KIND:
    a read of inode `block_ino` before it is served; and, as if the worker died between
    doing and answering, an append to inode `append_ino` and a mkdir of HELD_DIR after
    they are done."""

    def __init__(self, *args: Any, journal: Journal, block_ino: int = 0, append_ino: int = 0,
                 marker: str = "", **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.journal = journal
        self.block_ino = block_ino
        self.append_ino = append_ino
        self.marker = marker

    def _hold(self, kind: str, what: str) -> None:
        with open(f"{self.marker}.{kind}", "w") as f:
            f.write(what + "\n")
        time.sleep(3600)  # until SIGKILL

    def _mount_id(self, inode: Inode) -> int:
        for mount_id, fd in self._fds._mounts.items():
            if fd == inode.mount_fd:
                return mount_id
        return -1

    keeper: socket.socket | None = None  # keep-fds: the supervisor's end

    def _remember(self, fd: int, st: os.stat_result) -> int:
        nodeid = super()._remember(fd, st)
        inode = self._inodes.get(nodeid)
        if inode is not None and nodeid != wire.ROOT_ID:
            handle = inode.handle.hex() if inode.handle is not None else "-"
            self.journal.add("L", nodeid, st.st_dev, st.st_ino, self._mount_id(inode), handle)
        return nodeid

    def forget(self, nodeid: int, nlookup: int) -> None:
        super().forget(nodeid, nlookup)
        self.journal.add("F", nodeid, nlookup)

    def _new_handle(
        self, fd: int, inode: Inode, st: os.stat_result, flags: int, nodeid: int
    ) -> tuple[int, int]:
        fh, open_flags = super()._new_handle(fd, inode, st, flags, nodeid)
        self.journal.add("O", fh, nodeid, flags, self._handles[fh].backing)
        if self.keeper is not None:  # before the reply: kept before the kernel knows fh
            socket.send_fds(self.keeper, [f"O {fh}".encode()], [fd])
        return fh, open_flags

    def release(self, nodeid: int, fh: int) -> None:
        super().release(nodeid, fh)
        self.journal.add("R", fh)
        if self.keeper is not None:
            self.keeper.send(f"R {fh}".encode())

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> int:
        fh = super().opendir(ctx, nodeid, flags)
        self.journal.add("D", fh, nodeid)
        return fh

    def releasedir(self, nodeid: int, fh: int) -> None:
        super().releasedir(nodeid, fh)
        self.journal.add("R", fh)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> list[memoryview]:
        h = self._handles.get(fh)
        if self.block_ino and isinstance(h, Handle) and h.inode.key[1] == self.block_ino:
            self._hold("read", f"{nodeid} {fh} {offset} {size}")
        return super().read(nodeid, fh, offset, size)

    def write(self, nodeid: int, fh: int, offset: int, data: memoryview) -> int:
        n = super().write(nodeid, fh, offset, data)
        h = self._handles.get(fh)
        if self.append_ino and isinstance(h, Handle) and h.inode.key[1] == self.append_ino:
            self._hold("write", f"{nodeid} {fh} {offset} {n}")
        return n

    def mkdir(
        self, ctx: Context, parent: int, name: bytes, mode: int
    ) -> tuple[int, os.stat_result]:
        entry = super().mkdir(ctx, parent, name, mode)
        if self.marker and name == HELD_DIR.encode():
            self._hold("mkdir", f"{parent} {name.decode()}")
        return entry

    # ---- the new worker: the dead one's identities back ----

    def restore(
        self, records: list[list[str]], kept: dict[int, int] | None = None
    ) -> dict[str, Any]:
        """Rebuild nodeid -> inode and fh -> open file from the journal; `kept`: fh ->
        the dead worker's own descriptor, passed on by the supervisor (keep-fds)."""
        kept = kept or {}
        nodes: dict[int, list[Any]] = {}  # nodeid -> [dev, ino, mount_id, handle, nlookup]
        handles: dict[int, tuple[str, int, int, int]] = {}  # fh -> kind nodeid flags backing
        for rec in records:
            kind = rec[0]
            if kind == "L":
                nodeid = int(rec[1])
                if nodeid in nodes:
                    nodes[nodeid][4] += 1
                else:
                    handle = None if rec[5] == "-" else bytes.fromhex(rec[5])
                    nodes[nodeid] = [int(rec[2]), int(rec[3]), int(rec[4]), handle, 1]
            elif kind == "F":
                nodeid = int(rec[1])
                if nodeid in nodes:
                    nodes[nodeid][4] -= int(rec[2])
                    if nodes[nodeid][4] <= 0:
                        del nodes[nodeid]
            elif kind == "O":
                handles[int(rec[1])] = ("file", int(rec[2]), int(rec[3]), int(rec[4]))
            elif kind == "D":
                handles[int(rec[1])] = ("dir", int(rec[2]), 0, 0)
            elif kind == "R":
                handles.pop(int(rec[1]), None)
        counts = (
            "nodes",
            "nodes_without_handle",
            "files_reopened",
            "dirs_reopened",
            "handles_lost",
        )
        out: dict[str, Any] = dict.fromkeys(counts, 0)
        for nodeid, (dev, ino, mount_id, handle, nlookup) in nodes.items():
            mount_fd = self._fds._mounts.get(mount_id, -1)
            if handle is None or mount_fd < 0:
                out["nodes_without_handle"] += 1  # only a descriptor named it: gone
                continue
            # Lazily reopened by handle on first use, as an evicted one is.
            inode = Inode((dev, ino), handle, mount_fd, self._fds, nlookup=nlookup)
            self._inodes[nodeid] = inode
            self._by_key[inode.key] = nodeid
            out["nodes"] += 1
        lost: list[str] = []
        for fh, (kind, nodeid, flags, backing) in handles.items():
            inode = self._inodes.get(nodeid)
            try:
                if inode is None or inode.handle is None:
                    raise OSError(errno.ESTALE, "unknown node")
                if kind == "dir":
                    fd = open_by_handle(inode.mount_fd, inode.handle,
                                        os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # fmt: skip
                    self._handles[fh] = DirHandle(fd)
                    out["dirs_reopened"] += 1
                    continue
                if fh in kept:  # the same open file: no reopen, alive even if unlinked
                    fd = kept.pop(fh)
                    out["files_kept"] = out.get("files_kept", 0) + 1
                else:
                    fd = open_by_handle(
                        inode.mount_fd, inode.handle, flags & _REOPEN_MASK | os.O_CLOEXEC
                    )
            except OSError as e:  # ESTALE: unlinked, its last descriptor died with the worker
                out["handles_lost"] += 1
                lost.append(errno.errorcode.get(e.errno or 0, str(e)))
                continue
            state = self._validate(os.fstat(fd))
            accmode = flags & os.O_ACCMODE
            h = Handle(fd, inode, state, bool(flags & os.O_APPEND), accmode != os.O_WRONLY)
            h.writes = accmode != os.O_RDONLY
            self._handles[fh] = h
            out["files_reopened"] += 1
            if self.passthrough is not None:  # the kernel tier: how the kernel does its I/O
                # A backing id lives in the connection, not in the worker: still valid.
                m = self._io.setdefault(state.key, IoMode())
                if backing:
                    h.backing = m.backing = backing
                    m.passed += 1
                    out["passthrough_handles"] = out.get("passthrough_handles", 0) + 1
                else:
                    m.cached += 1
        out["handles_lost_errors"] = lost
        self._ids = itertools.count(max(nodes, default=wire.ROOT_ID) + 1)
        self._fhs = itertools.count(max(handles, default=0) + 1)
        return out


class ProbeSession(Session):
    """memlend's Session, noting the uniques with FUSE_UNIQUE_RESEND it answers (all
    replies but a successful READ's, which the hot path writes itself) in `log`."""

    resent_log = ""
    strip_bit = False  # answer a resent request without FUSE_UNIQUE_RESEND

    def _note(self, unique: int) -> int:
        if unique & UNIQUE_RESEND and self.resent_log:
            self._record(f"{unique:#x}")
        return unique & ~UNIQUE_RESEND if self.strip_bit else unique

    def _record(self, line: str) -> None:
        with open(self.resent_log, "a") as f:
            f.write(line + "\n")

    def _reply(self, unique: int, payload: Any) -> None:
        super()._reply(self._note(unique), payload)

    def _reply_failed(self, unique: int, e: OSError) -> None:
        if self.strip_bit:  # what the kernel said to a reply without the bit
            self._record(f"{unique:#x}:{errno.errorcode.get(e.errno or 0)}")
            return
        super()._reply_failed(unique, e)

    def _reply_error(self, unique: int, err: int) -> None:
        sent = self._note(unique)
        if sent == unique:
            super()._reply_error(unique, err)
            return
        try:  # written here: Session's own keeps quiet about ENOENT
            os.write(self.fd, wire.OUT_HEADER.pack(wire.OUT_HEADER.size, -err, sent))
        except OSError as e:
            self._record(f"{sent:#x}:{errno.errorcode.get(e.errno or 0)}")


def worker_main(args: argparse.Namespace) -> int:
    if args.variant in ("standby", "no-bit") and args.restore:
        print(json.dumps({"standby": True}), flush=True)
        if not sys.stdin.readline():
            return 1
    t0 = time.monotonic()
    stats = MountStats(pid=os.getpid(), backing=args.backing, cache_size=64 << 20,
                       block_size=64 << 10, policy="lru", local_tier=args.tier)  # fmt: skip
    kernel = args.tier == "kernel"
    cache = NoCache(64 << 10, stats) if kernel else BlockCache(64 << 20, 64 << 10, "lru", stats)
    fs = JournaledPassthrough(args.backing, cache, stats, local_tier=args.tier,
                              journal=Journal(args.journal), block_ino=args.block_ino,
                              append_ino=args.append_ino, marker=args.marker)  # fmt: skip
    # As serve() sets them up: the kernel tier without AUTO_INVAL_DATA, and with
    # passthrough for small written files (root).
    kwargs: dict[str, Any] = {"threads": 4, "attr_timeout": ATTR_TIMEOUT,
                              "entry_timeout": ATTR_TIMEOUT, "auto_inval_data": not kernel,
                              "passthrough": kernel}  # fmt: skip
    info: dict[str, Any] = {}
    if args.keeper >= 0:
        fs.keeper = socket.socket(fileno=args.keeper)
    if args.restore:
        records = read_journal(args.journal)
        init = json.loads(next(" ".join(r[1:]) for r in records if r[0] == "I"))
        session = ProbeSession(args.fd, fs, max_write=init["max_write"], **kwargs)
        session.resent_log = args.journal + ".resent"
        session.strip_bit = args.variant == "no-bit"
        if args.variant == "handshake":
            print(json.dumps({"ready": True, "handshake": True}), flush=True)
            try:
                session.handshake()  # as a fresh daemon: waits for an INIT that never comes
            except OSError as e:  # ENODEV: the probe aborted the connection to end it
                print(f"worker 2: {e}", file=sys.stderr)
                return 1
        session.proto_minor = init["proto_minor"]
        session.mmap_allowed = init["mmap_allowed"]
        session.kernel_flags = init["kernel_flags"]
        session.passthrough = init["passthrough"]
        if session.passthrough:
            fs.use_passthrough(session)
        t = time.monotonic()
        kept = {int(k): v for k, v in json.loads(args.kept).items()} if args.kept else {}
        info.update(fs.restore(records, kept))
        info["restore_ms"] = round((time.monotonic() - t) * 1000, 2)
        info["journal_records"] = len(records)
    else:
        session = Session(args.fd, fs, **kwargs)
        session.handshake()
        if session.passthrough:
            fs.use_passthrough(session)
        init = {"max_write": session.max_write, "proto_minor": session.proto_minor,
                "passthrough": session.passthrough,
                "mmap_allowed": session.mmap_allowed, "kernel_flags": session.kernel_flags,
                "kernel_proto": list(session.kernel_proto)}  # fmt: skip
        fs.journal.add("I", json.dumps(init))
        info["kernel_offers_resend"] = bool(session.kernel_flags & HAS_RESEND)
        info["kernel_proto"] = list(session.kernel_proto)
    session.start()
    if args.restore and args.variant in ("resend", "standby", "keep-fds", "no-bit"):
        out = wire.OUT_HEADER.pack(wire.OUT_HEADER.size, NOTIFY_RESEND, 0)
        t = time.monotonic()
        os.write(args.fd, out)
        info["resend_us"] = round((time.monotonic() - t) * 1e6)
    info["ready"] = True
    info["start_ms"] = round((time.monotonic() - t0) * 1000, 1)
    print(json.dumps(info), flush=True)
    while not session.closed.wait(0.5):
        pass
    session.wait(2)
    return 0


# ---- the supervisor and the application --------------------------------------


@dataclass
class Outcome:
    variant: str
    tier: str = "memlend"
    checks: dict[str, str] = field(default_factory=dict)  # what -> "ok" or what went wrong
    times_ms: dict[str, float] = field(default_factory=dict)
    worker1: dict[str, Any] = field(default_factory=dict)
    worker2: dict[str, Any] = field(default_factory=dict)
    in_flight: dict[str, str] = field(default_factory=dict)
    aborted: bool = False


def _timed(fn: Callable[[], object], timeout: float) -> tuple[str, object]:
    """("ok", value), ("error", errno name) or ("hung", None) if not done in time
    (the thread stays blocked until the connection is aborted)."""
    box: list[tuple[str, object]] = []

    def run() -> None:
        try:
            box.append(("ok", fn()))
        except OSError as e:
            box.append(("error", errno.errorcode.get(e.errno or 0, str(e))))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ("hung", None)


def _spawn(args: list[str], fd: int, extra: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """This module in a new process; `fd` (if >= 0) is inherited: the same open file;
    so are the descriptors `extra`."""
    cmd = [sys.executable, "-m", "memlend.bench.restart_probe", *args]
    if fd >= 0:
        cmd += ["--fd", str(fd)]
    fds = ((fd,) if fd >= 0 else ()) + extra
    return subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip


class Keeper:
    """The supervisor's side of keep-fds: holds the backing descriptor of every open fh
    the worker sends (SCM_RIGHTS), drops it at the worker's release message."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.held: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.theirs.close()  # the worker has it: its death ends _run
        self.thread.start()

    def _run(self) -> None:
        while True:
            msg, fds, _, _ = socket.recv_fds(self.ours, 64, 1)
            if not msg:
                return
            kind, fh = msg.decode().split()
            if kind == "O" and fds:
                self.held[int(fh)] = fds[0]
            elif kind == "R" and int(fh) in self.held:
                os.close(self.held.pop(int(fh)))

    def close(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()
        self.ours.close()
        if self.theirs.fileno() >= 0:
            self.theirs.close()


def _ready(proc: subprocess.Popen[str], timeout: float, key: str = "ready") -> dict[str, Any]:
    """The JSON line `proc` prints next (with `key` in it), or why there is none."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return {key: False, "why": f"no word within {timeout} s"}
    line = proc.stdout.readline()
    return json.loads(line) if line else {key: False, "why": f"exited {proc.wait()}"}


def _connection(mnt: str) -> str | None:
    """The fusectl directory name of the mount at `mnt` (its device minor)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return fields[2].split(":")[1]
    return None


def abort_connection(conn: str) -> None:
    """Abort FUSE connection `conn` through fusectl (mounted for the purpose if need be)."""
    mounted = False
    if not os.path.exists(f"{FUSECTL}/{conn}"):
        subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], check=False,
                       capture_output=True)  # fmt: skip
        mounted = True
    try:
        with open(f"{FUSECTL}/{conn}/abort", "w") as f:
            f.write("1")
    finally:
        if mounted:
            subprocess.run(["umount", FUSECTL], check=False, capture_output=True)


def _kill(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def app_main(args: argparse.Namespace) -> int:
    """The application: its own process, so that no other process of the probe holds
    files of the mount (a fork closing them would send a FLUSH to a dead worker and
    wait). Prints {"holding": ...} once its read is in the worker's hands, reads the
    kill time (CLOCK_MONOTONIC, shared by all processes) on stdin, prints the outcome."""
    mnt, backing = args.mnt, args.backing
    out: dict[str, Any] = {"checks": {}, "times_ms": {}, "in_flight": {}}
    checks, times = out["checks"], out["times_ms"]
    data = {}
    for name in SIZES:
        with open(os.path.join(backing, name), "rb") as f:
            data[name] = f.read()
    p = lambda name: os.path.join(mnt, name)  # noqa: E731
    fa = os.open(p("a"), os.O_RDWR)
    fb = os.open(p("b"), os.O_RDONLY)
    fdir = os.open(p("sub"), os.O_RDONLY | os.O_DIRECTORY)
    fu = os.open(p("u"), os.O_RDWR)
    fslow = os.open(p("slow"), os.O_RDONLY)
    assert os.pread(fa, 4096, 0) == data["a"][:4096]
    os.pwrite(fa, b"W" * 100, 8192)
    assert os.pread(fb, 4096, 4096) == data["b"][4096:8192]
    os.stat("c", dir_fd=fdir)
    os.pwrite(fu, b"U" * 100, 0)
    os.unlink(p("u"))
    flog = os.open(p("log"), os.O_WRONLY | os.O_APPEND)
    log_size = len(data["log"])
    # The requests in flight, each held by a hook of the worker (see JournaledPassthrough).
    held: dict[str, Callable[[], object]] = {
        "read": lambda: os.pread(fslow, 65536, 0) == data["slow"][:65536],
        "write": lambda: os.write(flog, b"L" * 100),
        "mkdir": lambda: os.mkdir(p(HELD_DIR)),
    }
    results: dict[str, tuple[str, object, float]] = {}

    def run(kind: str) -> None:
        try:
            results[kind] = ("ok", held[kind](), time.monotonic())
        except OSError as e:
            results[kind] = ("error", errno.errorcode.get(e.errno or 0), time.monotonic())

    threads = {k: threading.Thread(target=run, args=(k,), daemon=True) for k in HELD}
    deadline = time.monotonic() + 10
    for kind, t in threads.items():  # one at a time: each takes one worker thread
        t.start()
        while not os.path.exists(f"{args.marker}.{kind}") and time.monotonic() < deadline:
            time.sleep(0.005)
    holding = all(os.path.exists(f"{args.marker}.{k}") for k in HELD)
    print(json.dumps({"holding": holding}), flush=True)
    line = sys.stdin.readline()
    if not line:
        return 1
    t_kill = float(line)
    for kind, t in threads.items():
        t.join(max(0.0, deadline - time.monotonic()) + ANSWER_WITHIN)
        if kind not in results:
            out["in_flight"][kind] = f"not answered within {ANSWER_WITHIN:.0f} s"
            continue
        status, value, at = results[kind]
        if status == "ok":
            out["in_flight"][kind] = "answered" if value in (True, 100, None) else f"wrong: {value}"
            times[f"kill to in-flight {kind} answered"] = round((at - t_kill) * 1000, 1)
        else:
            out["in_flight"][kind] = f"error {value}"
    grew = os.stat(os.path.join(backing, "log")).st_size - log_size
    out["in_flight"]["write"] += f"; the backing file grew by {grew} bytes (100 written)"
    time.sleep(ATTR_TIMEOUT * 2)  # cached attributes and entries expire
    for f in (fa, fb):  # the kernel tier: its cached pages go, reads reach the worker
        _timed(lambda f=f: os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED), ANSWER_WITHIN)

    def check(name: str, fn: Callable[[], object], want: object) -> None:
        status, value = _timed(fn, ANSWER_WITHIN)
        if status == "ok" and value == want:
            checks[name] = "ok"
        elif status == "ok":
            checks[name] = "wrong data"
        else:
            checks[name] = status if value is None else f"{status} {value}"

    check("read, file opened before (fh reopened)", lambda: os.pread(fa, 4096, 0),
          data["a"][:4096])  # fmt: skip
    check("read back what worker 1 wrote", lambda: os.pread(fa, 100, 8192), b"W" * 100)
    check("write, file opened before", lambda: os.pwrite(fa, b"N" * 100, 16384), 100)
    check("fstat, file opened before", lambda: os.fstat(fa).st_size, SIZES["a"])
    check("read-only file opened before", lambda: os.pread(fb, 4096, 0), data["b"][:4096])
    check("lookup under a nodeid held (dir open before)",
          lambda: os.stat("c", dir_fd=fdir).st_size, SIZES["sub/c"])  # fmt: skip
    check("readdir, directory opened before", lambda: sorted(os.listdir(fdir)), ["c"])
    check("stat by path", lambda: os.stat(p("b")).st_size, SIZES["b"])
    check("new open and read", lambda: _read_new(p("sub/c")), data["sub/c"])
    check("read, unlinked file opened before", lambda: os.pread(fu, 100, 0), b"U" * 100)
    if checks["write, file opened before"] == "ok":
        with open(os.path.join(backing, "a"), "rb") as f:
            f.seek(16384)
            ok = f.read(100) == b"N" * 100
        checks["write reached the backing file"] = "ok" if ok else "missing"
    files = (("a", fa), ("b", fb), ("sub", fdir), ("u", fu), ("slow", fslow), ("log", flog))
    for name, f in files:
        closing = _timed(lambda f=f: os.close(f), ANSWER_WITHIN)  # type: ignore[misc]
        status = closing[0] if closing[1] is None else " ".join(map(str, closing))
        checks[f"close {name} (FLUSH, RELEASE)"] = status
    print(json.dumps(out), flush=True)
    if "hung" in checks.values() or any(t.is_alive() for t in threads.values()):
        os._exit(3)  # the supervisor aborts the connection, which frees the threads
    return 0


def probe(variant: str, base: str, tier: str = "memlend") -> Outcome:
    """One run: `variant` (VARIANTS), the worker's local tier `tier` (memlend, kernel),
    in the empty directory `base`."""
    out = Outcome(variant, tier)
    backing, mnt = os.path.join(base, "backing"), os.path.join(base, "mnt")
    journal, marker = os.path.join(base, "journal"), os.path.join(base, "blocked")
    os.makedirs(os.path.join(backing, "sub"))
    os.mkdir(mnt)
    for name, size in SIZES.items():
        with open(os.path.join(backing, name), "wb") as f:
            f.write(os.urandom(size))
    block_ino = os.stat(os.path.join(backing, "slow")).st_ino
    append_ino = os.stat(os.path.join(backing, "log")).st_ino
    fd = mount(mnt, "memlend-restart-probe", max_read=1 << 20)
    conn = _connection(mnt)
    w1 = w2 = app = None
    keeper = Keeper() if variant == "keep-fds" else None
    try:
        common = ["--backing", backing, "--journal", journal, "--variant", variant, "--tier", tier]
        hooks = ["--block-ino", str(block_ino), "--append-ino", str(append_ino), "--marker", marker]
        if keeper is not None:
            hooks += ["--keeper", str(keeper.theirs.fileno())]
            w1 = _spawn(["--worker", *common, *hooks], fd, (keeper.theirs.fileno(),))
            keeper.start()
        else:
            w1 = _spawn(["--worker", *common, *hooks], fd)
        out.worker1 = _ready(w1, 10)
        if not out.worker1.get("ready"):
            out.checks["worker 1 ready"] = str(out.worker1)
            return out
        if variant == "no-hold":
            os.close(fd)  # the worker's copy is now the only one
            fd = -1
        app = _spawn(["--app", "--mnt", mnt, "--backing", backing, "--marker", marker], -1)
        holding = _ready(app, 15, key="holding")
        if not holding.get("holding"):
            out.checks["read held by worker 1"] = str(holding)
            return out
        if variant in ("standby", "no-bit"):
            w2 = _spawn(["--worker", *common, "--restore"], fd)
            spare = _ready(w2, 10, key="standby")
            if not spare.get("standby"):
                out.checks["spare worker ready"] = str(spare)
                return out
        t_kill = time.monotonic()
        w1.kill()
        w1.wait(10)
        out.times_ms["worker 1 reaped"] = round((time.monotonic() - t_kill) * 1000, 1)
        if w2 is not None and w2.stdin is not None:
            w2.stdin.write("go\n")
            w2.stdin.flush()
            out.worker2 = _ready(w2, 10)
            out.times_ms["kill to worker 2 ready"] = round((time.monotonic() - t_kill) * 1000, 1)
        elif keeper is not None:
            keeper.thread.join(5)  # the dead worker's end closed: all its messages are in
            kept = ["--kept", json.dumps(keeper.held)]
            w2 = _spawn(["--worker", *common, "--restore", *kept], fd, tuple(keeper.held.values()))
            keeper.close()  # the new worker has them now
            out.worker2 = _ready(w2, 10)
            out.times_ms["kill to worker 2 ready"] = round((time.monotonic() - t_kill) * 1000, 1)
        elif fd >= 0:
            w2 = _spawn(["--worker", *common, "--restore"], fd)
            out.worker2 = _ready(w2, 10)
            out.times_ms["kill to worker 2 ready"] = round((time.monotonic() - t_kill) * 1000, 1)
        assert app.stdin is not None
        app.stdin.write(f"{t_kill}\n")
        app.stdin.flush()
        result = _ready(app, 14 * ANSWER_WITHIN, key="checks")  # each check may hang
        out.in_flight = result.get("in_flight", {"?": str(result)})
        out.checks.update(result.get("checks", {}))
        out.times_ms.update(result.get("times_ms", {}))
    finally:
        out.aborted = _teardown(mnt, conn, fd, app, [w1, w2])
        if keeper is not None:
            keeper.close()
    if os.path.exists(journal + ".resent"):
        with open(journal + ".resent") as f:
            lines = f.read().split()
        out.worker2["replies with bit 63 (not counting READ)"] = [x for x in lines if ":" not in x]
        refused = [x for x in lines if ":" in x]
        if refused:
            out.worker2["replies without the bit, refused (unique:errno)"] = refused
    return out


def _read_new(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _teardown(
    mnt: str, conn: str | None, fd: int, app: subprocess.Popen[str] | None, workers: list[Any]
) -> bool:
    """Let the application end, unmount, stop the workers; True if the connection had to
    be aborted (a request left hanging)."""
    aborted = False
    if app is not None:
        if app.stdin is not None and not app.stdin.closed:
            app.stdin.close()
        try:
            app.wait(ANSWER_WITHIN)
        except subprocess.TimeoutExpired:
            if conn is not None:  # a thread of it waits for an answer that never comes
                abort_connection(conn)
                aborted = True
        _kill(app)
    try:
        unmount(mnt)
    except OSError:
        if conn is not None and not aborted:
            abort_connection(conn)
            aborted = True
        with contextlib.suppress(OSError):
            unmount(mnt, lazy=True)
    for w in workers:
        if w is not None and w.poll() is None:
            try:
                w.wait(3)
            except subprocess.TimeoutExpired:
                pass
        _kill(w)
    if fd >= 0:
        os.close(fd)
    return aborted


@contextlib.contextmanager
def _base() -> Iterator[str]:
    # On the root file system (ext4 here): file handles; /dev/shm's tmpfs has them too.
    base = tempfile.mkdtemp(prefix="memlend-restart-", dir="/var/tmp")
    try:
        yield base
    finally:
        mnt = os.path.join(base, "mnt")
        if os.path.isdir(base) and not is_mountpoint(mnt):  # never remove through a mount
            shutil.rmtree(base, ignore_errors=True)
        elif os.path.isdir(base):
            print(f"restart_probe: {mnt} is still mounted; left {base}", file=sys.stderr)


def report(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        lines.append(f"variant {o.variant}, local tier {o.tier}:")
        for k, v in o.in_flight.items():
            lines.append(f"  in flight, {k}: {v}")
        for k, v in o.times_ms.items():
            lines.append(f"  {k}: {v} ms")
        for k, v in o.checks.items():
            lines.append(f"  {k}: {v}")
        if o.worker2:
            lines.append(f"  worker 2: {json.dumps(o.worker2)}")
        if o.aborted:
            lines.append("  (connection aborted through fusectl to free a hung request)")
    return "\n".join(lines)


def replay_bench(nodes: int, opened: int, base: str) -> dict[str, float]:
    """The new worker's replay at scale, in-process and without a mount: a worker's
    Passthrough looks up `nodes` files and opens `opened` of them (journaling as it
    goes), then a fresh one replays the journal."""
    backing = os.path.join(base, "backing")
    os.mkdir(backing)
    for i in range(nodes):
        with open(os.path.join(backing, f"f{i}"), "wb") as f:
            f.write(b"x")
    journal = os.path.join(base, "journal")
    ctx = Context(0, 0, 0)

    def make() -> JournaledPassthrough:
        stats = MountStats(local_tier="kernel")
        return JournaledPassthrough(backing, NoCache(4096, stats), stats, local_tier="kernel",
                                    journal=Journal(journal), max_inodes=nodes + 1)  # fmt: skip

    stats = MountStats(local_tier="kernel")
    plain = Passthrough(backing, NoCache(4096, stats), stats, local_tier="kernel",
                        max_inodes=nodes + 1)  # fmt: skip
    t = time.perf_counter()
    for i in range(nodes):
        plain.lookup(ctx, wire.ROOT_ID, f"f{i}".encode())
    bare = time.perf_counter() - t
    plain.destroy()
    first = make()
    t = time.perf_counter()
    ids = [first.lookup(ctx, wire.ROOT_ID, f"f{i}".encode())[0] for i in range(nodes)]
    lookups = time.perf_counter() - t
    for nodeid in ids[:opened]:
        first.open(ctx, nodeid, os.O_RDONLY)
    second = make()
    records = read_journal(journal)
    t = time.perf_counter()
    out = second.restore(records)
    replay = time.perf_counter() - t
    first.destroy()
    second.destroy()
    return {"nodes": out["nodes"], "files_reopened": out["files_reopened"],
            "journal_records": len(records), "journal_bytes": os.path.getsize(journal),
            "lookup_us_without_journal": round(bare / nodes * 1e6, 1),
            "lookup_us_with_journal": round(lookups / nodes * 1e6, 1),
            "replay_ms": round(replay * 1000, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memlend.bench.restart_probe",
                                 description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("--variant", default="resend", choices=(*VARIANTS, "all"))
    ap.add_argument("--tier", default="memlend", choices=("memlend", "kernel"),
                    help="the worker's local tier, as memlend mount --local-tier")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1, help="repeat each variant N times")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--replay", nargs=2, type=int, metavar=("NODES", "OPEN"),
                    help="instead: time replaying NODES nodeids and OPEN open files")  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--app", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mnt", help=argparse.SUPPRESS)
    ap.add_argument("--restore", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--backing", help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    ap.add_argument("--block-ino", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--append-ino", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--marker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--keeper", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--kept", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.app:
        return app_main(args)
    if os.geteuid() != 0:
        print("restart_probe: needs root (mount(2), open_by_handle_at)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.replay:
        with _base() as base:
            print(json.dumps(replay_bench(*args.replay, base)))
        return 0
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    outcomes: list[Outcome] = []
    for variant in variants:
        for _ in range(args.rounds):
            with _base() as base:
                outcomes.append(probe(variant, base, args.tier))
    if args.json:
        print(json.dumps([o.__dict__ for o in outcomes], indent=1))
    else:
        print(report(outcomes))
        if args.rounds > 1:
            for variant in variants:
                for key in ("kill to worker 2 ready", "kill to in-flight read answered"):
                    vals = [o.times_ms[key] for o in outcomes
                            if o.variant == variant and key in o.times_ms]  # fmt: skip
                    if key.endswith("answered"):
                        print(f"{variant}: in-flight read answered in {len(vals)} of "
                              f"{args.rounds} rounds")  # fmt: skip
                    if vals:
                        print(f"{variant}: {key}: median {round(statistics.median(vals), 1)} ms "
                              f"(min {min(vals)}, max {max(vals)}, n={len(vals)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
