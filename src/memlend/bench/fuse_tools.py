"""Plumbing for the mount benchmarks: C tools built at run time, mounts, pinning, cleanup.

Everything started here is registered, and cleanup() unmounts every mount and
kills every process this module started, whatever happened before; callers
run it in a finally block.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20

# The reader: N random preads (clock_gettime around each) or sequential passes.
# One small C program for every target, so its own cost is tiny and identical.
READER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t rng = 88172645463325252ULL;
static uint64_t xorshift(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static int64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b; return (x > y) - (x < y);
}
static void die(const char *what) {
    fprintf(stderr, "reader: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Read [0, size) sequentially in `req` chunks; return bytes read. */
static long long seq_pass(int fd, char *buf, size_t req) {
    long long pos = 0;
    for (;;) {
        ssize_t n = pread(fd, buf, req, pos);
        if (n < 0) die("pread");
        if (n == 0) return pos;
        pos += n;
    }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: reader rand|seq PATH [options]\n"); return 2; }
    const char *mode = argv[1], *path = argv[2];
    long n = 10000, warm_rand = 0, passes = 1, bs = 4096, req = 1 << 20;
    int direct = 0, warm_seq = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--direct")) direct = 1;
        else if (!strcmp(argv[i], "--warm-seq")) warm_seq = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--n")) n = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--bs")) bs = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--req")) req = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--passes")) passes = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--warm-rand")) warm_rand = atol(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--seed")) rng = strtoull(argv[++i], 0, 10) | 1;
        else { fprintf(stderr, "reader: bad option %s\n", argv[i]); return 2; }
    }
    int fd = open(path, O_RDONLY | (direct ? O_DIRECT : 0));
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st)) die("fstat");
    size_t bufsize = (size_t)(req > bs ? req : bs);
    if (bufsize < (1 << 20)) bufsize = 1 << 20;
    char *buf;
    if (posix_memalign((void **)&buf, 4096, bufsize)) die("posix_memalign");
    memset(buf, 0, bufsize);
    if (!strcmp(mode, "seq")) {
        printf("{\"mode\": \"seq\", \"req\": %ld, \"direct\": %d, \"passes\": [", req, direct);
        for (long p = 0; p < passes; p++) {
            int64_t t0 = now_ns();
            long long got = seq_pass(fd, buf, (size_t)req);
            int64_t dt = now_ns() - t0;
            printf("%s{\"bytes\": %lld, \"ns\": %lld}", p ? ", " : "", got, (long long)dt);
        }
        printf("]}\n");
        return 0;
    }
    long blocks = (long)(st.st_size / bs);
    if (blocks < 1) { fprintf(stderr, "reader: file smaller than one read\n"); return 1; }
    if (warm_seq) seq_pass(fd, buf, 1 << 20);
    for (long i = 0; i < warm_rand; i++)
        if (pread(fd, buf, (size_t)bs, (off_t)(xorshift() % blocks) * bs) != bs)
            die("warm-up pread");
    off_t *offs = malloc(sizeof(off_t) * (size_t)n);
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)n);
    if (!offs || !lat) die("malloc");
    for (long i = 0; i < n; i++) offs[i] = (off_t)(xorshift() % blocks) * bs;
    int64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t a = now_ns();
        ssize_t got = pread(fd, buf, (size_t)bs, offs[i]);
        int64_t b = now_ns();
        if (got != bs) {
            if (got < 0) die("pread");
            fprintf(stderr, "reader: short read\n");
            return 1;
        }
        lat[i] = b - a;
    }
    int64_t wall = now_ns() - t0;
    double sum = 0;
    for (long i = 0; i < n; i++) sum += (double)lat[i];
    qsort(lat, (size_t)n, sizeof(int64_t), cmp64);
    printf("{\"mode\": \"rand\", \"n\": %ld, \"bs\": %ld, \"direct\": %d, \"median_ns\": %lld, "
           "\"p90_ns\": %lld, \"p99_ns\": %lld, \"p999_ns\": %lld, \"min_ns\": %lld, "
           "\"max_ns\": %lld, \"mean_ns\": %.1f, \"wall_ns\": %lld}\n",
           n, bs, direct, (long long)lat[n / 2], (long long)lat[n * 90 / 100],
           (long long)lat[n * 99 / 100], (long long)lat[n * 999 / 1000], (long long)lat[0],
           (long long)lat[n - 1], sum / (double)n, (long long)wall);
    return 0;
}
"""


@dataclass
class Tools:
    reader: str
    minimal: str
    cc: str  # compiler version line, for the record


def build_tools(workdir: Path) -> Tools:
    """Compile the reader and the minimal libfuse server into `workdir` with gcc -O2."""
    src = workdir / "reader.c"
    src.write_text(READER_C)
    reader = workdir / "reader"
    minimal = workdir / "minimal_fuse"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(reader), str(src)], check=True)
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], check=True, capture_output=True, text=True
    ).stdout.split()
    c_file = Path(__file__).with_name("minimal_fuse.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(minimal), str(c_file), *flags], check=True)
    cc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    return Tools(str(reader), str(minimal), cc.splitlines()[0] if cc else "gcc")


# ---- files and the page cache ------------------------------------------------


def make_file(path: Path, size: int, seed: int) -> None:
    """`size` bytes of seeded pseudo-random data, written back and dropped from the page cache."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rnd.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    drop_cache(path)


def drop_cache(path: Path | str) -> None:
    """posix_fadvise(DONTNEED) on one file: its clean pages leave the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path: Path | str) -> tuple[int, int]:
    """(resident pages, total pages) of `path` in the page cache, via mincore."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if not size:
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = ctypes.create_string_buffer(pages)
        try:
            if libc.mincore(addr, size, vec) != 0:
                return -1, pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw), pages


# ---- processes, mounts, cleanup ------------------------------------------------

_mounts: list[str] = []
_procs: list[subprocess.Popen] = []
_pids: list[int] = []  # memlend daemons (not our children: `memlend mount` detaches them)


def alive(pid: int) -> bool:
    """Is `pid` running (a zombie is not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4].decode("unicode_escape") == real for line in f)


def _umount(path: str) -> None:
    if not is_mounted(path):
        return
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a child, kill it after `timeout`, reap it."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cleanup() -> None:
    """Unmount every mount and kill every process started through this module."""
    for m in reversed(_mounts):
        _umount(m)
    for p in _procs:
        stop(p)
    for pid in _pids:
        kill_pid(pid)
    _mounts.clear()
    _procs.clear()
    _pids.clear()


def taskset(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def run_reader(tools: Tools, cpu: int | None, path: str, mode: str, *args: str) -> dict:
    """Run the C reader pinned on `cpu`; return its JSON result (plus the cpu)."""
    cmd = [*taskset(cpu), tools.reader, mode, path, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    res = json.loads(out.stdout)
    res["reader_cpu"] = cpu
    return res


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, ... of `pid` in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") or key.startswith("Rss"):
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    return out


def thread_cpus(pid: int) -> list[str]:
    """Cpus_allowed_list of every thread of `pid`."""
    res = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    res.append(line.split(":", 1)[1].strip())
    return res


def pin_all_threads(pid: int, cpu: int) -> list[str]:
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True
    )
    cpus = thread_cpus(pid)
    if any(c != str(cpu) for c in cpus):
        raise RuntimeError(f"pinning {pid} to CPU {cpu} failed: {cpus}")
    return cpus


class Memlend:
    """A memlend mount started with `memlend mount` (the daemon detaches)."""

    def __init__(
        self,
        backing: Path,
        mountpoint: Path,
        *,
        cache_size: str,
        block_size: str,
        threads: int | None = None,  # None: the mount's own defaults
        policy: str | None = None,
        log_file: Path | None = None,
        local_tier: str | None = None,  # None: the mount's default (kernel)
    ) -> None:
        self.local_tier = local_tier
        self.backing, self.mountpoint = str(backing), str(mountpoint)
        self.cache_size, self.block_size = cache_size, block_size
        self.threads, self.policy = threads, policy
        self.log_file = log_file
        self.pid = 0

    def _cli(self, *args: str, timeout: float = 60) -> str:
        cmd = [sys.executable, "-m", "memlend", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
        return res.stdout

    def __enter__(self) -> Memlend:
        args = ["mount", self.backing, self.mountpoint, "--cache-size", self.cache_size]
        args += ["--block-size", self.block_size]
        args += ["--policy", self.policy] if self.policy else []
        args += ["--local-tier", self.local_tier] if self.local_tier else []
        args += ["--threads", str(self.threads)] if self.threads else []
        if self.log_file:
            args += ["--log-file", str(self.log_file)]
        _mounts.append(self.mountpoint)
        self._cli(*args)
        self.pid = int(self.stats()["pid"])
        _pids.append(self.pid)
        return self

    def stats(self) -> dict:
        return json.loads(self._cli("stats", self.mountpoint, "--json"))

    def pin(self, cpu: int) -> list[str]:
        return pin_all_threads(self.pid, cpu)

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def __exit__(self, *exc: object) -> None:
        try:
            if is_mounted(self.mountpoint):
                self._cli("umount", self.mountpoint)
        except Exception:
            _umount(self.mountpoint)
        kill_pid(self.pid)


class MinimalServer:
    """The C baseline: minimal_fuse serving `src` (loaded into memory) as MOUNTPOINT/data."""

    def __init__(self, tools: Tools, src: Path, mountpoint: Path, cpu: int, log: Path) -> None:
        self.tools, self.src, self.mountpoint = tools, str(src), str(mountpoint)
        self.cpu, self.log = cpu, log
        self.proc: subprocess.Popen | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.mountpoint, "data")

    def __enter__(self) -> MinimalServer:
        cmd = [*taskset(self.cpu), self.tools.minimal, self.src, self.mountpoint]
        cmd += ["-o", "max_read=1048576,fsname=minimal_fuse"]
        _mounts.append(self.mountpoint)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        _procs.append(self.proc)
        deadline = time.monotonic() + 30
        while not (is_mounted(self.mountpoint) and os.path.exists(self.path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"minimal_fuse exited ({self.proc.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError("minimal_fuse did not mount within 30 s")
            time.sleep(0.02)
        return self

    def threads_cpus(self) -> list[str]:
        assert self.proc is not None
        return thread_cpus(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        _umount(self.mountpoint)
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {"nproc": os.cpu_count(), "kernel": os.uname().release}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        info["mem_total_kib"] = int(f.readline().split()[1])
    info["python"] = sys.version.split()[0]
    info["fuse3"] = subprocess.run(
        ["pkg-config", "--modversion", "fuse3"], capture_output=True, text=True
    ).stdout.strip()
    info["taskset"] = shutil.which("taskset") is not None
    return info


class ForeignLoad:
    """CPU time burnt by processes that are not ours while a benchmark runs.

    Samples /proc every `interval` seconds; a process counts as ours if it
    descends from this process or from a registered memlend daemon. The
    machine is shared, so other work disturbs the numbers: this says how much.
    """

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.ticks: dict[str, int] = {}  # command -> clock ticks of foreign CPU time
        self._last: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _snapshot() -> dict[int, tuple[int, str, int]]:
        snap = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            comm = data[data.index("(") + 1 : data.rindex(")")]
            fields = data[data.rindex(")") + 2 :].split()
            snap[int(name)] = (int(fields[1]), comm, int(fields[11]) + int(fields[12]))
        return snap

    def _ours(self, snap: dict[int, tuple[int, str, int]]) -> set[int]:
        roots = {os.getpid(), *_pids}
        ours = set()
        for pid in snap:
            p, seen = pid, 0
            while p > 1 and seen < 64:
                if p in roots:
                    ours.add(pid)
                    break
                p = snap[p][0] if p in snap else 0
                seen += 1
        return ours

    def _sample(self) -> None:
        snap = self._snapshot()
        ours = self._ours(snap)
        for pid, (_, comm, t) in snap.items():
            if pid in ours or comm.startswith("kworker"):
                continue
            prev = self._last.get(pid)
            if prev is not None and prev[0] == comm and t > prev[1]:
                self.ticks[comm] = self.ticks.get(comm, 0) + t - prev[1]
        self._last = {pid: (comm, t) for pid, (_, comm, t) in snap.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ForeignLoad:
        self._sample()
        self._thread.start()
        return self

    def take(self) -> dict[str, object]:
        """Foreign CPU seconds since the last take(), and the top consumers; resets."""
        self._sample()
        top = sorted(self.ticks.items(), key=lambda kv: -kv[1])[:5]
        out = {
            "cpu_seconds": round(sum(self.ticks.values()) / self._hz, 2),
            "top": {k: round(v / self._hz, 2) for k, v in top},
        }
        self.ticks = {}
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
