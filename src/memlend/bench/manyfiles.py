"""Many small files through a mount: create, list, read once, delete; time each phase.

`python -m memlend.bench.manyfiles N` mounts a fresh backing directory (64 MiB cache
unless --cache-size says otherwise), creates N files of --file-size bytes spread over
--dirs directories, lists them (`ls -l`), reads each once, deletes them all (`rm -r`),
and prints one JSON object: seconds per phase, microseconds per unlink, the daemon's
peak resident memory (VmHWM) and its open descriptors after each phase.
--nofile starts the daemon under that descriptor limit (prlimit), as a host
with a low `ulimit -n` would. Its mount and daemon are undone on exit.
--in-process skips the mount: a Passthrough looks up, reads and then forgets N files,
timing FORGET alone (the daemon's own cost, without FUSE round trips).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memlend.bench.fuse_tools import is_mounted, kill_pid, proc_status

MEMLEND = [sys.executable, "-m", "memlend"]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(n: int, dirs: int, file_size: int, cache_size: str, nofile: int | None) -> dict:
    res: dict = {"files": n, "dirs": dirs, "file_size": file_size, "cache_size": cache_size}
    with tempfile.TemporaryDirectory(prefix="memlend-manyfiles-") as tmp:
        backing, mnt = Path(tmp, "backing"), Path(tmp, "mnt")
        backing.mkdir()
        mnt.mkdir()
        prlimit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
        cmd = [*prlimit, *MEMLEND, "mount", str(backing), str(mnt), "--cache-size", cache_size]
        cmd += ["--block-size", "16K", "--log-file", str(Path(tmp, "mount.log"))]
        pid = 0
        try:
            subprocess.run(cmd, check=True)
            out = subprocess.run([*MEMLEND, "stats", str(mnt), "--json"], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            pid = json.loads(out)["pid"]
            payload = os.urandom(file_size)
            names = [mnt / f"d{i % dirs}" / f"f{i}" for i in range(n)]
            t0 = time.monotonic()
            for d in range(dirs):
                (mnt / f"d{d}").mkdir()
            for p in names:
                p.write_bytes(payload)
            res["create_s"] = round(time.monotonic() - t0, 2)
            res["fds_after_create"] = _fds(pid)
            t0 = time.monotonic()
            subprocess.run(["ls", "-lR", str(mnt)], check=True, stdout=subprocess.DEVNULL)
            res["ls_s"] = round(time.monotonic() - t0, 2)
            t0 = time.monotonic()
            for p in names:
                if p.read_bytes() != payload:
                    raise RuntimeError(f"{p}: wrong contents")
            res["read_s"] = round(time.monotonic() - t0, 2)
            res["fds_after_read"] = _fds(pid)
            t0 = time.monotonic()
            subprocess.run(["rm", "-r", *(str(mnt / f"d{d}") for d in range(dirs))], check=True)
            rm = time.monotonic() - t0
            res["rm_s"] = round(rm, 2)
            res["us_per_unlink"] = round(rm / n * 1e6)
            res["fds_after_rm"] = _fds(pid)
            res["daemon_hwm_mib"] = round(proc_status(pid)["VmHWM"] / 2**20, 1)
        finally:
            if is_mounted(str(mnt)):
                subprocess.run([*MEMLEND, "umount", str(mnt)], check=False)
            if is_mounted(str(mnt)):
                subprocess.run(["umount", "-l", str(mnt)], check=False)
            if pid:
                kill_pid(pid)
    return res


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
    p.add_argument("--in-process", action="store_true", help="time FORGET alone, no mount")
    a = p.parse_args()
    if a.in_process:
        print(json.dumps(in_process(a.files, a.file_size, a.cache_size)))
    else:
        print(json.dumps(run(a.files, a.dirs, a.file_size, a.cache_size, a.nofile)))


if __name__ == "__main__":
    main()
