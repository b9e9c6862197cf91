"""Many small files through a mount: create, list, read once, delete; time each phase.

`python -m memlend.bench.manyfiles N` mounts a fresh backing directory (64 MiB cache
unless --cache-size says otherwise), creates N files of --file-size bytes spread over
--dirs directories, lists them (`ls -l`), reads each once, deletes them all (`rm -r`),
and prints one JSON object: seconds per phase, microseconds per unlink, the daemon's
peak resident memory (VmHWM) against its budget (--cache-size plus 64 MiB, DESIGN.md
invariant 7; `within_budget`), its resident memory and open descriptors after each
phase, and the inodes it knew. --dir puts the scratch tree elsewhere than $TMPDIR.
--nofile starts the daemon under that descriptor limit (prlimit), as a host
with a low `ulimit -n` would. Its mount and daemon are undone on exit.
--stopped-lender: the mount lends to a `memlend lend` on loopback that is SIGSTOPped
for the whole read phase, so every block read from the disk is queued for a lender
that takes nothing: the put queue fills up to its bound and stays full (issue 9). The
mount then runs with --no-passthrough (small files written through the mount are
otherwise read by the kernel on the backing file, and never lent) and
--lender-streams always (a whole small file is read as a stream). The JSON says how
full the queue got (sampled from `memlend stats --json` every 0.2 s) and how many
puts were dropped; the lender is continued (SIGCONT) after the phase.
--in-process skips the mount: a Passthrough looks up, reads and then forgets N files,
timing FORGET alone (the daemon's own cost, without FUSE round trips).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memlend.bench.fuse_tools import is_mounted, kill_pid, proc_status
from memlend.fuse import forgets
from memlend.sizes import parse_size

MEMLEND = [sys.executable, "-m", "memlend"]
MiB = 1 << 20
OVERHEAD = 64 * MiB  # what the daemon may use beyond --cache-size (issue 9, README)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int, most: float = 3.0) -> int:
    """The daemon's descriptors once their count stops falling (at most `most` s): the
    phase's last FORGETs are served in a batch, WINDOW after they came."""
    n, end = _fds(pid), time.monotonic() + most
    while time.monotonic() < end:
        time.sleep(10 * forgets.WINDOW)
        m = _fds(pid)
        if m >= n:
            return m
        n = m
    return n


def _stats(mnt: Path) -> dict:
    out = subprocess.run([*MEMLEND, "stats", str(mnt), "--json"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out)


def _mib(n: int) -> float:
    return round(n / MiB, 1)


def _start_lender(tmp: str) -> tuple[subprocess.Popen, int, list[str]]:
    """A `memlend lend` on loopback with a fresh secret: (process, port, mount options)."""
    secret, seal = Path(tmp, "secret"), Path(tmp, "seal.key")
    for key in (secret, seal):
        subprocess.run([*MEMLEND, "genkey", str(key)], check=True, capture_output=True)
    cmd = [*MEMLEND, "lend", "--listen", "127.0.0.1:0", "--memory", "256M", "--reserve", "64M",
           "--block-size", "16K", "--foreground", "--secret-file", str(secret)]  # fmt: skip
    with open(Path(tmp, "lender.log"), "ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the lender did not start: {line!r}")
    port = int(line.rsplit(":", 1)[1])
    opts = ["--lender", f"memlend://127.0.0.1:{port}", "--secret-file", str(secret)]
    opts += ["--seal-key-file", str(seal), "--no-passthrough", "--lender-streams", "always"]
    return proc, port, opts


def run(
    n: int,
    dirs: int,
    file_size: int,
    cache_size: str,
    nofile: int | None,
    where: str | None = None,
    stopped_lender: bool = False,
) -> dict:
    res: dict = {"files": n, "dirs": dirs, "file_size": file_size, "cache_size": cache_size}
    budget = parse_size(cache_size) + OVERHEAD
    res["budget_mib"] = _mib(budget)
    with tempfile.TemporaryDirectory(prefix="memlend-manyfiles-", dir=where) as tmp:
        backing, mnt = Path(tmp, "backing"), Path(tmp, "mnt")
        backing.mkdir()
        mnt.mkdir()
        prlimit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
        cmd = [*prlimit, *MEMLEND, "mount", str(backing), str(mnt), "--cache-size", cache_size]
        cmd += ["--block-size", "16K", "--log-file", str(Path(tmp, "mount.log"))]
        pid = 0
        lender: subprocess.Popen | None = None
        try:
            if stopped_lender:
                lender, _, opts = _start_lender(tmp)
                cmd += opts
            subprocess.run(cmd, check=True)
            first = _stats(mnt)
            pid = first["pid"]
            res["local_tier"] = first.get("local_tier")
            payload = os.urandom(file_size)
            names = [mnt / f"d{i % dirs}" / f"f{i}" for i in range(n)]
            t0 = time.monotonic()
            for d in range(dirs):
                (mnt / f"d{d}").mkdir()
            for p in names:
                p.write_bytes(payload)
            res["create_s"] = round(time.monotonic() - t0, 2)
            after(res, "create", pid, mnt)
            t0 = time.monotonic()
            subprocess.run(["ls", "-lR", str(mnt)], check=True, stdout=subprocess.DEVNULL)
            res["ls_s"] = round(time.monotonic() - t0, 2)
            after(res, "ls", pid, mnt)
            s0 = _stats(mnt)
            t0 = time.monotonic()
            if lender is not None:
                os.kill(lender.pid, signal.SIGSTOP)
            try:
                for p in names:
                    if read(p, drop=lender is not None) != payload:
                        raise RuntimeError(f"{p}: wrong contents")
            finally:
                if lender is not None:
                    os.kill(lender.pid, signal.SIGCONT)
            res["read_s"] = round(time.monotonic() - t0, 2)
            s1 = _stats(mnt)
            after(res, "read", pid, mnt)
            if lender is not None:
                res["put_queue"] = put_queue(s0, s1)
            t0 = time.monotonic()
            subprocess.run(["rm", "-r", *(str(mnt / f"d{d}") for d in range(dirs))], check=True)
            rm = time.monotonic() - t0
            res["rm_s"] = round(rm, 2)
            res["us_per_unlink"] = round(rm / n * 1e6)
            after(res, "rm", pid, mnt)
            hwm = proc_status(pid)["VmHWM"]
            res["daemon_hwm_mib"] = _mib(hwm)
            res["within_budget"] = hwm <= budget
        finally:
            if lender is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(lender.pid, signal.SIGCONT)
            if is_mounted(str(mnt)):
                subprocess.run([*MEMLEND, "umount", str(mnt)], check=False)
            if is_mounted(str(mnt)):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
            if pid:
                kill_pid(pid)
            if lender is not None:
                lender.kill()
                lender.wait()
                assert lender.stdout is not None
                lender.stdout.close()
    return res


def read(path: Path, drop: bool) -> bytes:
    """The whole file; `drop`: its pages in the mount's page cache dropped first, so
    the read reaches the daemon, which reads the disk and lends what it read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = []
        while chunk := os.read(fd, 1 << 20):
            out.append(chunk)
        return b"".join(out)
    finally:
        os.close(fd)


def put_queue(s0: dict, s1: dict) -> dict:
    """What the read phase did to the put queue (`memlend stats --json` before, after)."""
    d = lambda k: s1[k] - s0[k]  # noqa: E731
    return {
        "capacity_blocks": s1["remote_queue_capacity_blocks"],
        "capacity_mib": _mib(s1["remote_queue_capacity_bytes"]),
        "peak_blocks": s1["remote_queue_peak_blocks"],  # the most it held, since the mount
        "peak_mib": _mib(s1["remote_queue_peak_bytes"]),
        "full_drops": d("remote_queue_full_drops"),  # puts refused: the queue was full
        "dropped_puts": d("remote_dropped_puts"),  # those, and those a stopped lender cost
        "put_blocks": d("remote_put_blocks"),
        "timeouts": d("remote_timeouts"),
        "disk_read_mib": _mib(d("disk_read_bytes")),
        "lender_state_after": [ld["state"] for ld in s1.get("lenders", [])],
    }


def after(res: dict, phase: str, pid: int, mnt: Path) -> None:
    """The daemon's descriptors, resident memory and known inodes after `phase`."""
    res[f"fds_after_{phase}"] = _settled_fds(pid)
    res[f"rss_after_{phase}_mib"] = _mib(proc_status(pid)["VmRSS"])
    res[f"inodes_after_{phase}"] = _stats(mnt).get("inodes")


def in_process(n: int, file_size: int, cache_size: str) -> dict:
    from memlend.fs.cache import BlockCache
    from memlend.fs.passthrough import Passthrough
    from memlend.fuse.api import Context
    from memlend.sizes import parse_size
    from memlend.stats import MountStats

    with tempfile.TemporaryDirectory(prefix="memlend-manyfiles-") as tmp:
        payload = os.urandom(file_size)
        for i in range(n):
            Path(tmp, f"f{i}").write_bytes(payload)
        cache = BlockCache(parse_size(cache_size), 16384, "lirs", MountStats())
        fs = Passthrough(tmp, cache, MountStats())
        ctx, nodes = Context(0, 0, 0), []
        for i in range(n):
            node = fs.lookup(ctx, 1, b"f%d" % i)[0]
            fh, _ = fs.open(ctx, node, os.O_RDONLY)
            fs.read(node, fh, 0, file_size)
            fs.release(node, fh)
            nodes.append(node)
        t0 = time.perf_counter()
        for node in nodes:
            fs.forget(node, 1)
        dt = time.perf_counter() - t0
        cache.close()
    return {"files": n, "slots": cache.slots, "us_per_forget": round(dt / n * 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=int)
    p.add_argument("--dirs", type=int, default=10)
    p.add_argument("--file-size", type=int, default=4096)
    p.add_argument("--cache-size", default="64M")
    p.add_argument("--nofile", type=int, help="the daemon's descriptor limit (default: ours)")
    p.add_argument("--dir", help="where the scratch tree goes (default: $TMPDIR or /tmp)")
    what = "lend to a lender SIGSTOPped during the read phase (a full put queue)"
    p.add_argument("--stopped-lender", action="store_true", help=what)
    p.add_argument("--in-process", action="store_true", help="time FORGET alone, no mount")
    a = p.parse_args()
    if a.in_process:
        print(json.dumps(in_process(a.files, a.file_size, a.cache_size)))
    else:
        res = run(a.files, a.dirs, a.file_size, a.cache_size, a.nofile, a.dir, a.stopped_lender)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
