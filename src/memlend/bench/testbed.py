"""The benchmark testbed: "VMs" on one machine, and their guaranteed tear-down.

A client VM is a cgroup named memlend-bench-<pid>-client-<n>: memory (its RAM, page
cache included), the backing disk's read IOPS/bandwidth cap and cpuset (CPU 0). A lender
VM is memlend-bench-<pid>-lender<i>: memory and cpuset (CPU 1). On cgroup v1 (Group)
that is one group per controller (memory, blkio, cpuset) under /sys/fs/cgroup/<ctl>/;
on cgroup v2 (Group2, when /sys/fs/cgroup is the unified hierarchy) one directory under
/sys/fs/cgroup/memlend-bench-<pid>/ with memory, io and cpuset enabled (memory.max,
io.max, cpuset.cpus). The v1 code runs on this project's test host; the v2 code has run
only against a fake tree and a real cgroup2 mount without those three controllers
(tests/test_bench_cgroup2.py), never on a v2 host that has them.

Every process the testbed starts is placed in its groups before it execs, and every one
has "memlend-bench" in its command line. `Testbed.close()` (called from a finally block)
kills whatever is left in the groups, unmounts, removes the groups and the network
namespaces, and the work directory.

Network namespaces: with lenders, the client VM gets a namespace of its own
(memlend-bench-<pid>-c<n>: the mount daemon and the workload run in it, entered with
nsenter, which leaves the mount namespace alone so the FUSE mount stays visible), and
each lender one more (memlend-bench-<pid>-l<i>), reached from the client's over a veth
pair: separate hosts on a link. `Testbed.netns` is False when `ip netns` is not usable.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from memlend.bench import fuse_tools as ft
from memlend.errors import UserError

PREFIX = "memlend-bench"
CGROOT = Path("/sys/fs/cgroup")  # a module constant: tests point it at a fake or private tree
V1_CONTROLLERS = ("memory", "blkio", "cpuset")
V2_CONTROLLERS = ("memory", "io", "cpuset")
CLIENT_CPU = 0
LENDER_CPU = 1
MiB = 1 << 20


def cgroup_version() -> int:
    """1 when the v1 controllers the testbed uses are mounted under CGROOT (also on a
    hybrid host, whose v2 hierarchy then has none of them), 2 when CGROOT is a unified
    hierarchy, 1 when it is neither (check_environment then names the missing piece)."""
    if all((CGROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return 1
    return 2 if (CGROOT / "cgroup.controllers").exists() else 1


def check_environment(who: str = "memlend bench") -> None:
    """Refuse, in one line naming the missing piece, when the testbed cannot be built."""
    if os.geteuid() != 0:
        raise UserError(f"{who} needs root (cgroups, blkio throttling, mounts)")
    if cgroup_version() == 2:
        have = (CGROOT / "cgroup.controllers").read_text().split()
        for ctl in V2_CONTROLLERS:
            if ctl not in have:
                raise UserError(
                    f"{who} needs the {ctl} controller in {CGROOT / 'cgroup.controllers'}"
                )
    else:
        for ctl in V1_CONTROLLERS:
            if not (CGROOT / ctl / "cgroup.procs").exists():
                raise UserError(
                    f"{who} needs the cgroup v1 {ctl} controller at {CGROOT / ctl} "
                    f"(or cgroup v2 at {CGROOT})"
                )
        if not (CGROOT / "blkio" / "blkio.throttle.read_iops_device").exists():
            raise UserError(f"{who} needs blkio throttling (CONFIG_BLK_DEV_THROTTLING)")
    if not os.path.exists("/dev/fuse"):
        raise UserError(f"{who} needs /dev/fuse (the fuse kernel module)")
    for tool in ("fio", "taskset"):
        if shutil.which(tool) is None:
            raise UserError(f"{who} needs {tool} (not found in PATH)")
    if (os.cpu_count() or 1) < 2:
        raise UserError(f"{who} needs 2 CPUs (client on CPU 0, lenders on CPU 1)")


def leftovers(pid: int | None = None) -> list[str]:
    """Anything of a testbed still present: cgroups, namespaces, mounts, processes, work
    directories; only those of the run in process `pid` if given."""
    mine = re.compile(PREFIX if pid is None else rf"{PREFIX}-{pid}(?!\d)")
    # v1: CGROOT/CONTROLLER/group; v2: CGROOT/parent and CGROOT/parent/group
    found = glob.glob(f"{CGROOT}/*/{PREFIX}*") + glob.glob(f"{CGROOT}/{PREFIX}*")
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += ns.splitlines()
    with open("/proc/mounts") as f:
        found += list(f)
    pg = subprocess.run(["pgrep", "-af", PREFIX], capture_output=True, text=True)
    found += [line for line in pg.stdout.splitlines() if "pgrep" not in line]
    found += glob.glob(f"/var/tmp/{PREFIX}-*")
    return [x for x in found if mine.search(x)]


def disk_of(path: Path) -> str:
    """MAJ:MIN of the whole disk holding `path` (blkio throttles whole disks only)."""
    st = os.stat(path)
    maj, mnr = os.major(st.st_dev), os.minor(st.st_dev)
    sysdev = Path(f"/sys/dev/block/{maj}:{mnr}")
    if not sysdev.exists():
        raise UserError(f"{path} is not on a block device ({maj}:{mnr}); blkio cannot cap it")
    if (sysdev / "partition").exists():
        return (sysdev.resolve().parent / "dev").read_text().strip()
    return f"{maj}:{mnr}"


# cgroupfs directories are made and removed through these (tests emulate the kernel)
_mkdir = os.mkdir
_rmdir = os.rmdir


def _flat_keyed(text: str) -> dict[str, int]:
    """memory.stat, memory.events, memory.oom_control: 'key value' lines."""
    out = {}
    for line in text.splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


class BaseGroup:
    """A "VM"'s cgroup, v1 (Group) or v2 (Group2): what the testbed sets and reads."""

    name: str

    def dirs(self) -> list[Path]:
        raise NotImplementedError

    def pids(self) -> set[int]:
        raise NotImplementedError

    def enter(self) -> None:
        """Move the calling process in (used in preexec_fn, before exec)."""
        raise NotImplementedError

    # set and read by the testbed and run.py; each kind of group has its own files
    def setup(self, *, cpu: int, memory: int | None) -> None:
        """Pin to `cpu`; cap memory (page cache included) at `memory` bytes if given."""
        raise NotImplementedError

    def throttle(self, dev: str, iops: int | None, bps: int | None) -> None:
        """Cap (None: uncap) reads of disk `dev` (MAJ:MIN) by the group's processes."""
        raise NotImplementedError

    def io_serviced(self, dev: str) -> tuple[int, int]:
        """(read I/Os, read bytes) the group issued to `dev`."""
        raise NotImplementedError

    def memory_stat(self) -> dict[str, int]:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        """Page cache charged to the group."""
        raise NotImplementedError

    def rss_bytes(self) -> int:
        """Anonymous memory of the group's processes."""
        raise NotImplementedError

    def usage(self) -> int:
        raise NotImplementedError

    def limit(self) -> int | None:
        raise NotImplementedError

    def reset_peak(self) -> None:
        """Start a new peak for peak() (OSError where the kernel cannot)."""
        raise NotImplementedError

    def peak(self) -> int | None:
        raise NotImplementedError

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in the group so far."""
        raise NotImplementedError

    def create(self) -> None:
        for d in self.dirs():
            if not d.exists():
                _mkdir(d)

    def _signal(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill_all(self, timeout: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal(sig)
            end = time.monotonic() + timeout
            while self.pids() and time.monotonic() < end:
                time.sleep(0.05)
            if not self.pids():
                return

    def remove(self) -> None:
        self.kill_all()
        for p in self.dirs():
            for _ in range(50):
                if not p.exists():
                    break
                try:
                    _rmdir(p)
                except OSError:
                    time.sleep(0.1)


@dataclass
class Group(BaseGroup):
    """One cgroup v1 group across several controllers (CGROOT/controller/name)."""

    name: str
    controllers: tuple[str, ...]

    def path(self, ctl: str) -> Path:
        return CGROOT / ctl / self.name

    def dirs(self) -> list[Path]:
        return [self.path(ctl) for ctl in self.controllers]

    def write(self, ctl: str, knob: str, value: str) -> None:
        (self.path(ctl) / knob).write_text(value)

    def read(self, ctl: str, knob: str) -> str:
        return (self.path(ctl) / knob).read_text()

    def pids(self) -> set[int]:
        out: set[int] = set()
        for ctl in self.controllers:
            with contextlib.suppress(OSError):
                out |= {int(x) for x in self.read(ctl, "cgroup.procs").split()}
        return out

    def enter(self) -> None:
        pid = str(os.getpid())
        for ctl in self.controllers:
            (self.path(ctl) / "cgroup.procs").write_text(pid)

    def setup(self, *, cpu: int, memory: int | None) -> None:
        mems = (CGROOT / "cpuset" / "cpuset.mems").read_text().strip()
        self.write("cpuset", "cpuset.mems", mems)  # v1 refuses tasks until it is set
        self.write("cpuset", "cpuset.cpus", str(cpu))
        if memory is not None:
            self.write("memory", "memory.limit_in_bytes", str(memory))
        with contextlib.suppress(OSError):  # 0: the OOM killer stays on (no hang at the limit)
            self.write("memory", "memory.oom_control", "0")

    def throttle(self, dev: str, iops: int | None, bps: int | None) -> None:
        self.write("blkio", "blkio.throttle.read_iops_device", f"{dev} {iops or 0}")
        self.write("blkio", "blkio.throttle.read_bps_device", f"{dev} {bps or 0}")

    def io_serviced(self, dev: str) -> tuple[int, int]:
        # the throttle layer's counters
        res = []
        for knob in ("blkio.throttle.io_serviced", "blkio.throttle.io_service_bytes"):
            val = 0
            for line in self.read("blkio", knob).splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == dev and parts[1] == "Read":
                    val = int(parts[2])
            res.append(val)
        return res[0], res[1]

    def memory_stat(self) -> dict[str, int]:
        return _flat_keyed(self.read("memory", "memory.stat"))

    def cache_bytes(self) -> int:
        st = self.memory_stat()  # total_*: the group and its children (none here)
        return st.get("total_cache", st.get("cache", 0))

    def rss_bytes(self) -> int:
        st = self.memory_stat()
        return st.get("total_rss", st.get("rss", 0))

    def usage(self) -> int:
        return int(self.read("memory", "memory.usage_in_bytes"))

    def limit(self) -> int | None:
        return int(self.read("memory", "memory.limit_in_bytes"))

    def reset_peak(self) -> None:
        self.write("memory", "memory.max_usage_in_bytes", "0")

    def peak(self) -> int | None:
        return int(self.read("memory", "memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        return _flat_keyed(self.read("memory", "memory.oom_control")).get("oom_kill", 0)


@dataclass
class Group2(BaseGroup):
    """One cgroup v2 group: the directory `parent`/name, with `controllers` enabled by
    the parent's cgroup.subtree_control; knobs of the others are skipped (absent)."""

    name: str
    parent: Path
    controllers: frozenset[str] = frozenset()
    _peak_fd: int | None = field(default=None, repr=False, compare=False)

    @property
    def dir(self) -> Path:
        return self.parent / self.name

    def dirs(self) -> list[Path]:
        return [self.dir]

    def read(self, knob: str) -> str:
        return (self.dir / knob).read_text()

    def _set(self, ctl: str, knob: str, value: str) -> None:
        if ctl in self.controllers:
            (self.dir / knob).write_text(value)

    def pids(self) -> set[int]:
        with contextlib.suppress(OSError):
            return {int(x) for x in self.read("cgroup.procs").split()}
        return set()

    def enter(self) -> None:
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def setup(self, *, cpu: int, memory: int | None) -> None:
        # an empty cpuset.mems would inherit the parent's nodes; written as v1 does
        mems = CGROOT / "cpuset.mems.effective"
        if mems.exists():
            self._set("cpuset", "cpuset.mems", mems.read_text().strip())
        self._set("cpuset", "cpuset.cpus", str(cpu))
        if memory is not None:
            self._set("memory", "memory.max", str(memory))
        # v2 cannot turn the OOM killer off (v1's oom_control "0" only keeps it on), so
        # nothing to write; memory.oom.group stays 0 so that, as on v1, an OOM kills one
        # process and the cell reports it, not the whole VM at once.

    def throttle(self, dev: str, iops: int | None, bps: int | None) -> None:
        if "io" in self.controllers and not (self.dir / "io.max").exists():
            raise UserError("the testbed needs io throttling (CONFIG_BLK_DEV_THROTTLING)")
        self._set("io", "io.max", f"{dev} riops={iops or 'max'} rbps={bps or 'max'}")

    def io_serviced(self, dev: str) -> tuple[int, int]:
        """(read I/Os, read bytes) the group issued to `dev` (io.stat: 'MAJ:MIN rbytes=..
        wbytes=.. rios=.. wios=.. dbytes=.. dios=..', one line per device)."""
        for line in self.read("io.stat").splitlines():
            d, *fields = line.split()
            if d == dev:
                kv = dict(f.split("=", 1) for f in fields)
                return int(kv.get("rios", 0)), int(kv.get("rbytes", 0))
        return 0, 0

    def memory_stat(self) -> dict[str, int]:
        return _flat_keyed(self.read("memory.stat"))

    def cache_bytes(self) -> int:
        """v2 `file` (page cache, tmpfs included), v1's `cache`."""
        return self.memory_stat().get("file", 0)

    def rss_bytes(self) -> int:
        """v2 `anon`, v1's `rss`."""
        return self.memory_stat().get("anon", 0)

    def usage(self) -> int:
        return int(self.read("memory.current"))

    def limit(self) -> int | None:
        text = self.read("memory.max").strip()
        return None if text == "max" else int(text)

    def reset_peak(self) -> None:
        """Since Linux 6.12 a write to memory.peak resets the peak seen through that
        file descriptor only, so the fd is kept for peak(). Before 6.12 the write
        fails (OSError, as on v1 without max_usage_in_bytes) and peak() gives the
        peak since the group was made."""
        self._close_peak()
        fd = os.open(self.dir / "memory.peak", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.write(fd, b"reset\n")
        except OSError:
            os.close(fd)
            raise
        self._peak_fd = fd

    def peak(self) -> int | None:
        """Peak memory use (None before Linux 5.19, which has no memory.peak)."""
        if self._peak_fd is not None:
            os.lseek(self._peak_fd, 0, os.SEEK_SET)
            return int(os.read(self._peak_fd, 64))
        try:
            return int(self.read("memory.peak"))
        except FileNotFoundError:
            return None

    def _close_peak(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None

    def oom_kills(self) -> int:
        return _flat_keyed(self.read("memory.events")).get("oom_kill", 0)

    def _signal(self, sig: int) -> None:
        # cgroup.kill (Linux 5.14) also catches a process forked while we signal
        kill = self.dir / "cgroup.kill"
        if sig == signal.SIGKILL and kill.exists():
            kill.write_text("1")
        else:
            super()._signal(sig)

    def remove(self) -> None:
        self._close_peak()
        super().remove()


def v2_parent(tag: str) -> Group2:
    """CGROOT/tag, the parent of a run's v2 groups, with memory, io and cpuset enabled
    for its children (and at the root, for it) as far as the root offers them. The
    root's cgroup.subtree_control is left as it is after the run: other groups may rely
    on what it enables, and enabling moves no process."""
    have = (CGROOT / "cgroup.controllers").read_text().split()
    want = [c for c in V2_CONTROLLERS if c in have]
    parent = Group2(tag, CGROOT, frozenset(want))
    _enable(CGROOT, want)
    parent.create()
    _enable(parent.dir, want)
    return parent


def _enable(d: Path, controllers: list[str]) -> None:
    knob = d / "cgroup.subtree_control"
    on = knob.read_text().split() if knob.exists() else []
    missing = [c for c in controllers if c not in on]
    if missing:
        knob.write_text(" ".join(f"+{c}" for c in missing))


def cpu_times() -> dict[str, list[int]]:
    """/proc/stat's per-CPU jiffies: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                out[name] = [int(v) for v in vals[:8]]
    return out


def cpu_usage(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict]:
    """Per CPU between two cpu_times(): busy and steal as shares of the interval. Steal
    is time the hypervisor gave this VM's CPU to someone else: a benchmark number taken
    while it is high measured the host's neighbours too."""
    out = {}
    for cpu, b in before.items():
        d = [y - x for x, y in zip(b, after.get(cpu, b), strict=True)]
        total = sum(d) or 1
        busy = total - d[3] - d[4] - d[7]  # not idle, not waiting for I/O, not stolen
        out[cpu] = {"busy": round(busy / total, 3), "steal": round(d[7] / total, 3)}
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Testbed:
    """Everything one `memlend bench` run sets up; `close()` removes all of it."""

    work: Path
    disk: str = ""
    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}")
    groups: list[BaseGroup] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    daemons: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    netns: bool = False
    client_ns: str | None = None
    keep_logs: Path | None = None  # close() copies the *.log files of `work` here
    cgroup: int = field(default_factory=lambda: cgroup_version())  # 1 or 2
    _parent: Group2 | None = None  # v2: CGROOT/tag, made with the first group
    _n: int = 0

    # ---- set-up ---------------------------------------------------------------

    def open(self) -> Testbed:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "backing").mkdir(exist_ok=True)
        (self.work / "mnt").mkdir(exist_ok=True)
        self.disk = disk_of(self.work / "backing")
        self.netns = self._netns_usable()
        return self

    def _netns_usable(self) -> bool:
        if shutil.which("ip") is None or shutil.which("nsenter") is None:
            return False
        probe = f"{self.tag}-probe"
        ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ok

    def group(self, role: str, *, memory: int | None, cpu: int, blkio: bool) -> BaseGroup:
        """A VM's group: memory (limit `memory`, page cache included), cpuset (`cpu`)
        and, with `blkio`, the disk cap (v2: every group has io; only the client's
        is capped)."""
        self._n += 1
        name = f"{self.tag}-{role}-{self._n}"
        g: BaseGroup
        if self.cgroup == 1:
            g = Group(name, ("memory", "cpuset") + (("blkio",) if blkio else ()))
        else:
            if self._parent is None:
                self._parent = v2_parent(self.tag)
            g = Group2(name, self._parent.dir, self._parent.controllers)
        self.groups.append(g)
        g.create()
        g.setup(cpu=cpu, memory=memory)
        return g

    def io_group(self, role: str) -> Group:
        """cgroup v1: a blkio group only (no memory or cpuset), never throttled, for
        threads moved there from a process in another group: their disk reads are
        then counted apart from that group's (io_serviced) and not throttled."""
        assert self.cgroup == 1
        self._n += 1
        g = Group(f"{self.tag}-{role}-{self._n}", ("blkio",))
        self.groups.append(g)
        g.create()
        return g

    def throttle(self, g: BaseGroup, iops: int | None, bps: int | None) -> None:
        """Cap (or uncap with None) reads of the backing disk by the group's processes."""
        g.throttle(self.disk, iops, bps)

    def drop_group(self, g: BaseGroup) -> None:
        g.remove()
        with contextlib.suppress(ValueError):
            self.groups.remove(g)

    def client_netns(self) -> str:
        """The client VM's network namespace, created on first use (loopback only)."""
        if self.client_ns is None:
            ns = f"{self.tag}-c{self._n}"
            self.namespaces.append(ns)
            for c in (["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"]):
                _ip(c)
            self.client_ns = ns
        return self.client_ns

    def add_netns(self, i: int) -> tuple[str, str]:
        """A lender's namespace, linked to the client's by a veth pair: returns
        (namespace, lender address)."""
        client = self.client_netns()
        ns = f"{self.tag}-l{i}"
        host_if, ns_if = f"mlb{os.getpid() % 10000}h{i}", f"mlb{os.getpid() % 10000}n{i}"
        sub = f"10.{200 + i}.{os.getpid() % 250}"
        self.namespaces.append(ns)
        for c in (
            ["ip", "netns", "add", ns],
            ["ip", "-n", client, "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "-n", client, "link", "set", ns_if, "netns", ns],
            ["ip", "-n", client, "addr", "add", f"{sub}.1/24", "dev", host_if],
            ["ip", "-n", client, "link", "set", host_if, "up"],
            ["ip", "-n", ns, "addr", "add", f"{sub}.2/24", "dev", ns_if],
            ["ip", "-n", ns, "link", "set", ns_if, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ):
            _ip(c)
        return ns, f"{sub}.2"

    def spawn(
        self, cmd: list[str], g: BaseGroup, *, log: Path, netns: str | None = None
    ) -> subprocess.Popen:
        """Start `cmd` inside group `g` (and namespace `netns`), own session (no ^C)."""
        cmd = self._in_netns(cmd, netns)
        with open(log, "ab") as f:
            p = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=f,
                stdin=subprocess.DEVNULL,
                preexec_fn=g.enter,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def _in_netns(self, cmd: list[str], netns: str | None) -> list[str]:
        # nsenter --net switches the network namespace only (`ip netns exec` would also
        # give the process a mount namespace of its own, hiding a FUSE mount it makes).
        return ["nsenter", f"--net=/run/netns/{netns}", *cmd] if netns else cmd

    def run(
        self, cmd: list[str], g: BaseGroup, *, timeout: float, netns: str | None = None
    ) -> subprocess.CompletedProcess:
        p = subprocess.Popen(
            self._in_netns(cmd, netns),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=g.enter,
            start_new_session=True,
        )
        self.procs.append(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_stuck(p)
            raise RuntimeError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
        except BaseException:
            self._kill_stuck(p)
            raise
        finally:
            self.procs.remove(p)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    def _kill_stuck(self, p: subprocess.Popen) -> None:
        """SIGKILL `p`. A process waiting for an answer from a FUSE daemon that will
        not give one outlives SIGKILL; killing the mount daemons aborts their
        connections, which frees it (the mount then fails the cells after this one)."""
        p.kill()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            for pid in list(self.daemons):
                ft.kill_pid(pid)
            p.wait(30)

    def wait_port(self, host: str, port: int, proc: subprocess.Popen, what: str) -> None:
        """Wait until `proc` accepts connections at host:port, as seen from the client VM
        (its namespace when it has one)."""
        end = time.monotonic() + 20
        while time.monotonic() < end and proc.poll() is None:
            try:
                connect_in(self.client_ns, host, port).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{what} at {host}:{port} did not start (status {proc.poll()})")

    def memlend_cli(
        self, *args: str, g: BaseGroup | None = None, timeout: float = 60, netns: str | None = None
    ) -> str:
        cmd = [sys.executable, "-m", "memlend", *args]
        if g is None:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        else:
            r = self.run(cmd, g, timeout=timeout, netns=netns)
        if r.returncode:
            raise RuntimeError(f"memlend {' '.join(args[:2])} failed: {r.stderr.strip()[-300:]}")
        return r.stdout

    def mount(self, g: BaseGroup, cache: int, extra: list[str]) -> tuple[str, int]:
        """`memlend mount` started inside the client group (its daemon stays there)."""
        mnt = str(self.work / "mnt")
        self.mounts.append(mnt)
        args = ["mount", str(self.work / "backing"), mnt, "--cache-size", str(cache)]
        args += ["--log-file", str(self.work / "mount.log"), *extra]
        self.memlend_cli(*args, g=g, netns=self.client_ns)  # the daemon stays in both
        pid = int(self.stats(mnt)["pid"])
        self.daemons.append(pid)
        return mnt, pid

    def stats(self, mnt: str) -> dict:
        return json.loads(self.memlend_cli("stats", mnt, "--json"))

    def umount(self, mnt: str) -> None:
        with contextlib.suppress(Exception):
            self.memlend_cli("umount", mnt, timeout=30)
        if ft.is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for pid in list(self.daemons):
            ft.kill_pid(pid)
            self.daemons.remove(pid)
        with contextlib.suppress(ValueError):
            self.mounts.remove(mnt)

    def stop(self, p: subprocess.Popen) -> None:
        ft.stop(p)
        with contextlib.suppress(ValueError):
            self.procs.remove(p)

    # ---- tear-down ------------------------------------------------------------

    def close(self) -> None:
        """Remove everything; safe to call twice and after any failure."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for mnt in list(self.mounts):
                self.umount(mnt)
            for p in list(self.procs):
                self.stop(p)
            for pid in self.daemons:
                ft.kill_pid(pid)
            for g in list(self.groups):
                g.remove()
            for ns in self.namespaces:
                for pid in _netns_pids(ns):
                    ft.kill_pid(pid)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            for g in leftover_groups(self.tag):  # v2: the parent last
                g.remove()
            self.groups.clear()
            self._parent = None
            self.namespaces.clear()
            self.client_ns = None
            self.daemons.clear()
            if self.keep_logs is not None and self.work.is_dir():
                self.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in self.work.glob("*.log"):
                    shutil.copy(log, self.keep_logs / log.name)
            shutil.rmtree(self.work, ignore_errors=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _ip(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def connect_in(netns: str | None, host: str, port: int, timeout: float = 1.0) -> socket.socket:
    """A TCP connection made from inside network namespace `netns` (None: ours). A
    socket belongs to the namespace it was created in, so a short-lived thread enters
    the namespace (setns applies to the calling thread), creates it, and hands it over."""
    if netns is None:
        return socket.create_connection((host, port), timeout=timeout)
    out: list[socket.socket | BaseException] = []

    def inside() -> None:
        try:
            with open(f"/run/netns/{netns}") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            out.append(socket.create_connection((host, port), timeout=timeout))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=inside, daemon=True)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def _is_tag(name: str, tag: str) -> bool:
    """`name` is `tag` or one of its groups (memlend-bench-12 is not memlend-bench-123)."""
    return name == tag or name.startswith(f"{tag}-")


def leftover_groups(tag: str = PREFIX) -> list[BaseGroup]:
    """Groups named `tag`* (for tear-down and the tests): v1, under every controller;
    v2, the children of each CGROOT/`tag`* parent, then the parents (rmdir order)."""
    if cgroup_version() == 2:
        children: list[BaseGroup] = []
        parents: list[BaseGroup] = []
        with contextlib.suppress(OSError):
            for d in CGROOT.iterdir():
                if d.is_dir() and _is_tag(d.name, tag):
                    children += [Group2(c.name, d) for c in d.iterdir() if c.is_dir()]
                    parents.append(Group2(d.name, CGROOT))
        return children + parents
    names: dict[str, list[str]] = {}
    for ctl in V1_CONTROLLERS:
        with contextlib.suppress(OSError):
            for d in (CGROOT / ctl).iterdir():
                if d.is_dir() and _is_tag(d.name, tag):
                    names.setdefault(d.name, []).append(ctl)
    return [Group(n, tuple(c)) for n, c in names.items()]
