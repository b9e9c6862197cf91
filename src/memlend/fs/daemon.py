"""The mount daemon: checks the configuration, mounts, serves, unmounts.

`memlend mount` without --foreground starts this same code in a new session
and waits for one line on a pipe: "ok" once the kernel handshake is done, or
"error <message>" — so the command returns only when the mount is usable,
and every failure reaches the user as one line.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memlend import native
from memlend.errors import UserError
from memlend.fs.cache import BlockCache, NoCache, slots_for
from memlend.fs.passthrough import Passthrough
from memlend.fuse.mount import (
    FUSE_CONF,
    MountError,
    fs_type,
    is_dead_mount,
    is_mountpoint,
    mount,
    unmount,
    user_allow_other,
)
from memlend.fuse.session import Session
from memlend.heap import Trimmer, limit_arenas
from memlend.remote.client import parse_address
from memlend.remote.secret import loose_permissions
from memlend.stats import MountStats

log = logging.getLogger("memlend")

MIN_BLOCK, MAX_BLOCK = 4096, 1 << 20
PUT_QUEUE_BYTES = 16 << 20  # evicted blocks waiting for the lenders, at most
READAHEAD_KB = 512  # the kernel tier's read-ahead window (set_readahead)...
READAHEAD_KB_LENT = 1024  # ...and with lenders, whose multi-gets a stream pays per window
LOCAL_TIERS = ("kernel", "memlend")
EXIT_GRACE = 5  # seconds to wait, after unmount, for workers still inside a request


@dataclass
class MountConfig:
    backing: str
    mountpoint: str
    cache_size: int
    block_size: int
    policy: str
    threads: int = 16
    attr_timeout: float = 1.0
    direct_io: bool = True
    local_tier: str = "memlend"  # or "kernel": the page cache is the first tier
    writeback_cache: bool = False  # the kernel tier: the kernel's writeback cache
    passthrough: bool = True  # the kernel tier, as root: small written files in passthrough
    lenders: list[str] = field(default_factory=list)  # memlend:// or memcached:// URLs
    secret_file: str | None = None  # shared with memlend:// lenders (authentication)
    seal_key_file: str | None = None  # never leaves this host; default: seal_key_path()
    client_name: str | None = None  # our name in the lenders' clients files (our own key)
    nonempty: bool = False  # mount over a directory that has entries (hiding them)
    remote_deadline: float = 0.002
    remote_mode: str = "inclusive"
    lender_streams: str = "auto"  # or "always": streams ask lenders even when the disk is faster
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint


def seal_key_path() -> str:
    """Where the host's sealing key lives when --seal-key-file is not given."""
    if os.geteuid() == 0:
        return "/var/lib/memlend/seal.key"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "memlend", "seal.key")


def load_remote_secrets(cfg: MountConfig) -> tuple[bytes | None, bytes]:
    """(auth secret or None, this mount's seal secret); UserError if unusable.

    The seal secret is derived per mountpoint from a key that stays on this host
    (created at first use), so lenders can neither read nor forge blocks, and each
    mountpoint keeps one namespace on the lenders across restarts."""
    from memlend.remote.secret import hkdf, load_secret, write_secret

    auth = load_secret(cfg.secret_file) if cfg.secret_file else None
    path = cfg.seal_key_file or seal_key_path()
    if cfg.seal_key_file is None and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_secret(path)
    seal = hkdf(load_secret(path), b"memlend seal v1 " + cfg.mountpoint.encode())
    return auth, seal


def backing_fs_type(path: str) -> str:
    """The file-system type of the mount holding `path` (the one of its device)."""
    return fs_type(os.stat(path).st_dev) or "unknown"


def probe_direct_io(backing: str) -> bool | None:
    """Does the backing file system accept O_DIRECT? None if it cannot be told."""
    try:
        fd = os.open(backing, os.O_TMPFILE | os.O_RDWR, 0o600)  # unnamed: leaves no trace
    except OSError:
        return None
    try:
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as e:
        return False if e.errno == errno.EINVAL else None
    finally:
        os.close(fd)


def mount_warnings(cfg: MountConfig) -> list[str]:
    """Things the user should know about this backing store; sets cfg.direct_io."""
    warnings = []
    if cfg.direct_io and probe_direct_io(cfg.backing) is False:
        cfg.direct_io = False
        warnings.append(
            f"{cfg.backing} refuses O_DIRECT: memlend reads it buffered and drops those "
            "pages from the page cache after each read"
        )
    fstype = backing_fs_type(cfg.backing)
    if fstype in ("tmpfs", "ramfs"):
        warnings.append(
            f"{cfg.backing} is in memory already ({fstype}): memlend's cache only duplicates it"
        )
    if cfg.lenders:
        for path in (cfg.secret_file, cfg.seal_key_file):
            loose = loose_permissions(path) if path else None
            if loose:
                warnings.append(loose)
    # (without fusermount3 a non-root user cannot mount at all, and is told that)
    no_others = allow_other_dropped(os.geteuid(), FUSE_CONF)
    if no_others and shutil.which("fusermount3"):
        warnings.append(no_others)
    return warnings


def allow_other_dropped(euid: int, fuse_conf: str) -> str | None:
    """Why other users will not see this mount, if they will not: a non-root mount gets
    allow_other only when fuse.conf has user_allow_other (fusermount3 refuses it else)."""
    if euid == 0 or user_allow_other(fuse_conf):
        return None
    return (
        "other users (root included) cannot use this mount: allow_other needs "
        f"user_allow_other in {fuse_conf} for a mount made by a non-root user"
    )


def check_config(cfg: MountConfig) -> MountConfig:
    """Validate paths and sizes; return the config with absolute paths. UserError if bad."""
    from memlend.policies import POLICIES

    backing = os.path.realpath(cfg.backing)
    mnt = os.path.realpath(cfg.mountpoint)
    if cfg.metrics is not None:
        from memlend.metrics.endpoint import parse_metrics_address

        parse_metrics_address(cfg.metrics)
    if not os.path.exists(backing):
        raise UserError(f"backing directory {cfg.backing} does not exist")
    if not os.path.isdir(backing):
        raise UserError(f"backing path {cfg.backing} is not a directory")
    if is_dead_mount(mnt):  # os.path.exists() says no there
        raise UserError(
            f"mountpoint {cfg.mountpoint} is a dead FUSE mount (its daemon is gone): "
            "unmount it first"
        )
    if not os.path.exists(mnt):
        raise UserError(f"mountpoint {cfg.mountpoint} does not exist (create it first)")
    if not os.path.isdir(mnt):
        raise UserError(f"mountpoint {cfg.mountpoint} is not a directory")
    if mnt == backing or mnt.startswith(backing.rstrip("/") + "/"):
        raise UserError(
            f"mountpoint {cfg.mountpoint} is inside the backing directory {cfg.backing}; "
            "choose a mountpoint outside it"
        )
    if backing.startswith(mnt.rstrip("/") + "/"):
        raise UserError(
            f"backing directory {cfg.backing} is inside the mountpoint {cfg.mountpoint}: "
            "the mount would hide it; choose a backing directory outside it"
        )
    if is_mountpoint(mnt):
        raise UserError(f"mountpoint {cfg.mountpoint} is busy: something is already mounted there")
    if not cfg.nonempty:
        try:
            entries = len(os.listdir(mnt))
        except OSError as e:
            raise UserError(f"cannot list mountpoint {cfg.mountpoint}: {e.strerror}") from None
        if entries:
            raise UserError(
                f"mountpoint {cfg.mountpoint} is not empty ({entries} entries): the mount "
                "would hide them; use an empty directory, or --nonempty to mount over them"
            )
    bs = cfg.block_size
    if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise UserError(f"block size {bs} must be a power of two from 4K to 1M")
    if cfg.local_tier == "memlend" and slots_for(cfg.cache_size, bs, cfg.policy) < 16:
        raise UserError(
            f"cache size {cfg.cache_size} is too small for block size {bs} (needs 16 blocks)"
        )
    if cfg.policy not in POLICIES:
        raise UserError(f"unknown policy {cfg.policy!r} (known: {', '.join(sorted(POLICIES))})")
    if cfg.local_tier not in LOCAL_TIERS:
        raise UserError(f"--local-tier must be one of {', '.join(LOCAL_TIERS)}")
    if cfg.writeback_cache and cfg.local_tier != "kernel":
        raise UserError(
            "--writeback-cache needs --local-tier kernel (memlend's own tier writes through)"
        )
    if cfg.threads < 1:
        raise UserError("--threads must be at least 1")
    for url in cfg.lenders:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("memlend", "memcached"):
            raise UserError(f"lender {url!r} must be memlend://HOST:PORT or memcached://HOST:PORT")
        try:
            parse_address(rest.rstrip("/"))
        except ValueError as e:
            raise UserError(f"lender {url!r}: {e}") from None
        if scheme == "memlend" and not cfg.secret_file:
            raise UserError(f"lender {url} needs --secret-file (the secret it was started with)")
    if cfg.client_name is not None:
        from memlend.lender.clients import valid_client_name

        if not valid_client_name(cfg.client_name):
            raise UserError(f"--client-name {cfg.client_name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if not cfg.secret_file:
            raise UserError("--client-name needs --secret-file (this client's own key)")
    if cfg.lender_streams not in ("auto", "always"):
        raise UserError("--lender-streams must be auto or always")
    if cfg.remote_mode not in ("inclusive", "exclusive"):
        raise UserError("--remote-mode must be inclusive or exclusive")
    if cfg.remote_mode == "exclusive" and cfg.local_tier != "memlend":
        # The page cache drops pages without telling memlend, so a block deleted from
        # the lender on a hit would be lost from both tiers at its eviction.
        raise UserError(
            "--remote-mode exclusive needs --local-tier memlend (the page cache "
            "does not say what it drops, so the lender must keep what it serves)"
        )
    if cfg.remote_deadline <= 0:
        raise UserError("--remote-deadline must be positive")
    cfg.backing, cfg.mountpoint = backing, mnt
    return cfg


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 8))


def mount_device(mountpoint: str) -> str | None:
    """MAJOR:MINOR of the file system mounted at `mountpoint` (from mountinfo: a stat()
    of our own mountpoint would be a request to ourselves)."""
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # mountinfo escapes space, tab, newline and backslash as \ooo
                if len(fields) > 4 and _OCTAL.sub(_unescape, fields[4]) == mountpoint:
                    dev = fields[2]  # the last mount there wins: ours is the newest
    except OSError:
        return None
    return dev


def set_readahead(mountpoint: str, kb: int) -> None:
    """The kernel tier's read-ahead window: a FUSE mount starts at 128 KiB, so a
    sequential reader costs a READ round trip (and a lender multi-get or a disk read)
    per 128 KiB: seqread 0.83x the page cache. 1 MiB gave 1.00x, but a scan beside a
    hot set then took the disk from the hot set's misses (hotscan 0.75x): 512 KiB
    without lenders. With lenders a window is a multi-get, and 1 MiB streams faster
    (seqread 10.4x the page cache against 6.3x; docs/benchmarks.md, seventh session).
    Root only (sysfs); left as it is otherwise."""
    dev = mount_device(mountpoint)
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("read-ahead of %s left at the kernel's default: %s", mountpoint, e)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Notifier:
    """Sends kernel invalidations of pages from a thread of its own, never from a
    handler (dropping pages may wait for a request to be served)."""

    def __init__(self, session: Session) -> None:
        self._q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._session = session
        threading.Thread(target=self._run, name="notify", daemon=True).start()

    def __call__(self, nodeid: int) -> None:
        # Attributes at once, before the open that found the change is answered, or a
        # stat right after it may show the old size. Dropping attributes only touches
        # no page and waits for nothing, so a handler may do it.
        self._session.notify_inval_inode(nodeid, offset=-1)
        self._q.put(nodeid)

    def _run(self) -> None:
        while True:
            self._session.notify_inval_inode(self._q.get())


def _prune_later(session: Session) -> Callable[[list[int]], None]:
    """Asks the kernel to forget inodes from a thread of its own, as _Notifier does:
    the kernel evicts them meanwhile, which must not wait for the asking worker."""

    def prune(nodeids: list[int]) -> None:
        threading.Thread(target=session.notify_prune, args=(nodeids,), name="prune",
                         daemon=True).start()  # fmt: skip

    return prune


def serve(cfg: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted. Calls ready(None) once usable, ready(msg) on failure."""
    try:
        cfg = check_config(cfg)
    except UserError as e:
        ready(str(e))
        return 2
    for warning in mount_warnings(cfg):
        log.warning("%s", warning)
    os.umask(0)  # the kernel applied the caller's umask already
    # A worker woken by the kernel must not wait the default 5 ms for the GIL while
    # a read-ahead thread fills the cache: hand the GIL over at 200 us instead.
    sys.setswitchinterval(0.0002)
    limit_arenas()  # before any thread starts: two malloc arenas, not one each (heap.py)
    _raise_fd_limit()
    stats = MountStats(
        pid=os.getpid(),
        backing=cfg.backing,
        mountpoint=cfg.mountpoint,
        cache_size=cfg.cache_size,
        block_size=cfg.block_size,
        policy=cfg.policy,
        direct_io=cfg.direct_io,
        local_tier=cfg.local_tier,
        started=time.time(),
        hot_path=native.description,
    )
    kernel_tier = cfg.local_tier == "kernel"
    if kernel_tier:  # the kernel's page cache holds the pages: no arena
        cache: BlockCache | NoCache = NoCache(cfg.block_size, stats)
    else:
        cache = BlockCache(cfg.cache_size, cfg.block_size, cfg.policy, stats)
    fs = Passthrough(cfg.backing, cache, stats, direct_io=cfg.direct_io, local_tier=cfg.local_tier)
    tier = None
    if cfg.lenders:
        from memlend.remote.tier import RemoteTier

        try:
            auth, seal = load_remote_secrets(cfg)
        except UserError as e:
            ready(str(e))
            return 2
        # The put queue is memory too: it comes out of the daemon's fixed 64 MiB allowance.
        tier = RemoteTier(
            cfg.lenders, auth, seal, deadline=cfg.remote_deadline, mode=cfg.remote_mode,
            stats=stats, queue_bytes=PUT_QUEUE_BYTES, client_name=cfg.client_name,
            epoch=fs.reader.epoch,
        )  # fmt: skip
        tier.clear_namespace()  # blocks of an earlier run of this mount are unreachable
        for lender in tier.snapshot()["lenders"]:
            if lender["state"] != "active":
                log.warning("lender %s is %s; retrying in the background", lender["url"],
                            lender["state"])  # fmt: skip
        fs.attach_remote(tier)
        fs.reader.gate.always = cfg.lender_streams == "always"
    endpoint = None
    if cfg.metrics is not None:
        from memlend.metrics.endpoint import MetricsEndpoint
        from memlend.metrics.mount_collector import MountCollector

        try:
            endpoint = MetricsEndpoint(cfg.metrics)  # binds now: a port in use is one line
        except UserError as e:
            ready(str(e))
            if tier is not None:
                tier.close()
            return 2
        endpoint.start(MountCollector(fs.stats_snapshot))
        stats.metrics = endpoint.address
        log.info("metrics on http://%s/metrics", endpoint.address)
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("signal %d: unmounting %s", signum, cfg.mountpoint)
        threading.Thread(target=_unmount_quietly, args=(cfg.mountpoint,), daemon=True).start()

    # Handlers before mount(2): a signal during the handshake must unmount, not kill us
    # and leave a dead mount behind (the handshake then ends with ENODEV).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        fd = mount(cfg.mountpoint, f"memlend:{cfg.backing}", max_read=1 << 20)
    except MountError as e:
        ready(str(e))
        if endpoint is not None:
            endpoint.close()
        return 1
    # No AUTO_INVAL_DATA in the kernel tier: with it the kernel drops a file's whole
    # page cache whenever a fresh GETATTR shows a new mtime, and every write through
    # the mount makes one, so readers of a file being written re-read it through the
    # daemon at each attribute refresh (measured: 40k reads/s against 520k-1M without,
    # and torn pages, docs/design-choices.md). Outside changes are seen at open and
    # when the daemon notices them (fs.on_outside_change sends the invalidation).
    passthrough = kernel_tier and cfg.passthrough and os.geteuid() == 0  # the ioctl needs root
    session = Session(fd, fs, threads=cfg.threads, attr_timeout=cfg.attr_timeout,
                      entry_timeout=cfg.attr_timeout, writeback_cache=cfg.writeback_cache,
                      auto_inval_data=not kernel_tier, passthrough=passthrough)  # fmt: skip
    heap = Trimmer()  # what bursts of reads and puts freed goes back to the VM
    try:
        session.handshake()
        # Page-cache mounts map files as any file system does; direct I/O ones need
        # the kernel's DIRECT_IO_ALLOW_MMAP.
        stats.mmap_allowed = kernel_tier or session.mmap_allowed
        fs.writeback = stats.writeback_cache = session.writeback_cache
        if session.passthrough:
            fs.use_passthrough(session)
            stats.passthrough = True
        fs.on_outside_change = _Notifier(session)
        fs.on_too_many = _prune_later(session)
        session.start()
        heap.start()
        if kernel_tier:
            set_readahead(cfg.mountpoint, READAHEAD_KB_LENT if tier is not None else READAHEAD_KB)
            extra = ", writeback cache" if session.writeback_cache else ""
            extra += ", written files in passthrough" if session.passthrough else ""
            log.info("mounted %s on %s: the kernel page cache is the local tier%s",
                     cfg.backing, cfg.mountpoint, extra)  # fmt: skip
        else:
            log.info(
                "mounted %s on %s: cache %d blocks of %d bytes, policy %s%s",
                cfg.backing, cfg.mountpoint, cache.slots, cfg.block_size, cfg.policy,
                "" if session.mmap_allowed
                else " (kernel lacks DIRECT_IO_ALLOW_MMAP: no shared mmap)",
            )  # fmt: skip
        ready(None)
        closed_at = None
        while not session.wait(timeout=0.5):
            if session.closed.is_set():
                closed_at = closed_at or time.monotonic()
                if time.monotonic() - closed_at > EXIT_GRACE:
                    # Unmounted, but a worker is still inside a request: the kernel no
                    # longer waits for it, so neither do we (it is a daemon thread).
                    log.warning("%d workers still busy %d s after unmount; exiting",
                                session.busy_workers(), EXIT_GRACE)  # fmt: skip
                    break
    except BaseException as e:
        ready(f"mount {cfg.mountpoint}: {e}")
        _unmount_quietly(cfg.mountpoint)
        raise
    finally:
        heap.stop()
        if endpoint is not None:
            endpoint.close()
        fs.destroy()
        os.close(fd)
        if tier is not None:
            t0 = time.monotonic()
            tier.close()
            if time.monotonic() - t0 > 2:
                log.warning("closing the remote tier took %.1f s", time.monotonic() - t0)
        cache.close()
    log.info("unmounted %s", cfg.mountpoint)
    return 0


def _unmount_quietly(mountpoint: str) -> None:
    try:
        unmount(mountpoint)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return  # not mounted any more
        # Files still open: detach now, the kernel finishes when they are closed.
        try:
            unmount(mountpoint, lazy=True)
        except OSError as e2:
            log.error("cannot unmount %s: %s", mountpoint, e2)
