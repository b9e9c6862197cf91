"""`memlend doctor`: checks the host, one line per check ("ok", "warn" or "FAIL").

Exit status 1 if any check fails. The FUSE check mounts an empty file system in a
temporary directory for the INIT handshake and unmounts it at once."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

from memlend.fuse import wire

Check = tuple[str, str, str]  # (ok | warn | FAIL, what, detail)

# The INIT flags memlend asks for, and what it does without each.
FLAGS = {
    "ASYNC_READ": (wire.ASYNC_READ, "reads are serialized"),
    "BIG_WRITES": (wire.BIG_WRITES, "writes of one page at a time"),
    "MAX_PAGES": (wire.MAX_PAGES, "requests of at most 128 KiB"),
    "PARALLEL_DIROPS": (wire.PARALLEL_DIROPS, "lookups in one directory serialized"),
    "AUTO_INVAL_DATA": (wire.AUTO_INVAL_DATA, "changes below the mount seen later"),
    "WRITEBACK_CACHE": (wire.WRITEBACK_CACHE, "no --writeback-cache"),
    "DIRECT_IO_ALLOW_MMAP": (wire.DIRECT_IO_ALLOW_MMAP, "no shared mmap with --local-tier memlend"),
    "HANDLE_KILLPRIV_V2": (wire.HANDLE_KILLPRIV_V2, "the kernel clears set-ID bits itself"),
    "PASSTHROUGH": (wire.PASSTHROUGH, "small written files' I/O goes through the daemon"),
}


def check_fuse() -> Check:
    from memlend.fuse.api import Operations
    from memlend.fuse.mount import MountError, mount, unmount
    from memlend.fuse.session import Session

    if not os.path.exists("/dev/fuse"):
        return ("FAIL", "fuse", "/dev/fuse is missing (modprobe fuse; in a container, pass it in)")
    mnt = tempfile.mkdtemp(prefix="memlend-doctor-")
    fd = -1
    try:
        fd = mount(mnt, "memlend:doctor", max_read=1 << 20)
        session = Session(fd, Operations(), threads=1, writeback_cache=True)
        session.handshake()
        session.start()
    except (MountError, OSError) as e:
        return ("FAIL", "fuse", f"cannot mount a FUSE file system: {e}")
    finally:
        if fd >= 0:
            try:
                unmount(mnt)
            except OSError:
                with contextlib.suppress(OSError):
                    unmount(mnt, lazy=True)
            os.close(fd)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
    major, minor = session.kernel_proto
    missing = [f"{n} ({why})" for n, (bit, why) in FLAGS.items() if not session.kernel_flags & bit]
    detail = f"protocol {major}.{minor}; kernel offers {len(FLAGS) - len(missing)}/{len(FLAGS)}"
    detail += " flags memlend asks for" + (f"; lacks {', '.join(missing)}" if missing else "")
    return ("warn" if missing else "ok", "fuse", detail)


def check_allow_other() -> Check:
    from memlend.fuse.mount import user_allow_other

    if os.geteuid() == 0:
        return ("ok", "allow_other", "root: mounts are open to other users")
    if user_allow_other():
        return ("ok", "allow_other", "/etc/fuse.conf has user_allow_other")
    return ("warn", "allow_other", "/etc/fuse.conf lacks user_allow_other: only you see mounts")


def check_cgroups() -> Check:
    root = "/sys/fs/cgroup"
    if os.path.exists(f"{root}/cgroup.controllers"):
        with open(f"{root}/cgroup.controllers") as f:
            controllers = f.read().split()
        state = "ok" if "memory" in controllers else "warn"
        return (state, "cgroups", f"v2 (unified); controllers: {' '.join(controllers) or 'none'}")
    if os.path.isdir(f"{root}/memory"):
        return ("ok", "cgroups", "v1; memory controller at /sys/fs/cgroup/memory")
    return ("warn", "cgroups", "no memory cgroup: the lender watches host memory only")


CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
# Clock sources read in user space (vDSO) without a system call.
FAST_CLOCKSOURCES = ("tsc", "kvm-clock", "arch_sys_counter")
SLOW_CLOCK_NS = 1000


def clock_cost_ns(clock: Callable[[], float], batches: int = 100, per_batch: int = 100) -> float:
    """Nanoseconds per call of `clock`: the median over batches, so a preemption
    or an interrupt in one batch does not count."""
    times = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(per_batch):
            clock()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / per_batch


def check_clock(
    source_file: str = CLOCKSOURCE, clock: Callable[[], float] = time.monotonic
) -> Check:
    try:
        with open(source_file) as f:
            source = f.read().strip()
    except OSError as e:
        source = None
        detail = f"clocksource unknown ({source_file}: {e.strerror})"
    else:
        detail = f"clocksource {source}"
    cost = clock_cost_ns(clock)
    detail += f"; time.monotonic() {cost:.0f} ns per call"
    problems = []
    if source is not None and source not in FAST_CLOCKSOURCES:
        problems.append(f"{source} is not tsc, kvm-clock or arch_sys_counter")
    if cost > SLOW_CLOCK_NS:
        problems.append(f"over {SLOW_CLOCK_NS / 1000:.0f} µs per call")
    if not problems:
        return ("ok", "clock", detail)
    return (
        "warn",
        "clock",
        f"{detail}: {' and '.join(problems)}; memlend times every remote call and "
        "read-ahead decision, so a slow clock costs every remote hit",
    )


def check_direct_io(backing: str) -> Check:
    from memlend.fs.daemon import probe_direct_io

    if not os.path.isdir(backing):
        return ("FAIL", "O_DIRECT", f"{backing} is not a directory")
    ok = probe_direct_io(backing)
    if ok:
        return ("ok", "O_DIRECT", f"{backing} accepts O_DIRECT")
    if ok is False:
        return ("warn", "O_DIRECT", f"{backing} refuses O_DIRECT: memlend reads it buffered")
    return ("warn", "O_DIRECT", f"{backing}: cannot tell (no O_TMPFILE there, or not writable)")


def check_lender(url: str, secret_file: str | None) -> Check:
    import socket

    from memlend.remote.client import LenderClient, parse_address
    from memlend.remote.secret import auth_key, hkdf, load_secret
    from memlend.remote.sockio import RemoteAuthError, RemoteError

    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "memlend", url
    what = f"lender {url}"
    try:
        host, port = parse_address(rest.rstrip("/"))
    except ValueError as e:
        return ("FAIL", what, str(e))
    if scheme == "memcached":
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError as e:
            return ("FAIL", what, f"unreachable: {e.strerror or e}")
        return ("ok", what, "reachable (memcached: no authentication)")
    if secret_file is None:
        return ("FAIL", what, "needs --secret-file to authenticate")
    secret = load_secret(secret_file)
    try:
        with LenderClient((host, port), auth_key(secret), hkdf(secret, b"stats", 16)) as c:
            s = c.stats()
    except RemoteAuthError as e:
        return ("FAIL", what, f"reachable, authentication refused (another secret?): {e}")
    except (RemoteError, OSError) as e:
        return ("FAIL", what, f"unreachable: {e}")
    return ("ok", what, f"reachable and authenticated; holds {s.get('blocks')} blocks")


def run_checks(backing: list[str], lenders: list[str], secret_file: str | None) -> Iterator[Check]:
    yield check_fuse()
    yield check_allow_other()
    yield check_cgroups()
    yield check_clock()
    for b in backing:
        yield check_direct_io(b)
    for url in lenders:
        yield check_lender(url, secret_file)
