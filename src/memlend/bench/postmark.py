"""The testbed's Postmark workload, with every read checked.

    python -m memlend.bench.postmark DIR REF FILES TRANSACTIONS SHIM [CHECK_TASKS]

runs Postmark (the Debian package, NetApp's small-file benchmark: create FILES files of
4-64 KiB, then TRANSACTIONS of read-whole-file/append and create/delete, then delete
all) in DIR/memlend-bench-postmark with unbuffered 4 KiB reads and writes, and prints
one JSON line. Postmark never checks what it reads, so it runs under readcheck.so
(SHIM, built by `build_shim`), which compares every read(2) under DIR with the same
bytes of the same file under REF, the mount's backing directory (the mount writes
through, so the backing file is the truth at each read). Postmark times in whole
seconds, so the transaction phase is timed here from its progress output instead.
CHECK_TASKS, a cgroup v1 blkio group's tasks file, places the shim's reads of REF in
that group (readcheck.c): the testbed gives it one without a throttle, so the check's
own disk reads are not charged to the client it measures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBDIR = "memlend-bench-postmark"
# Postmark keeps paths in 80-byte buffers: it runs in its directory, with location "."
CONFIG = """set location .
set number {files}
set transactions {transactions}
set size 4096 65536
set read 4096
set write 4096
set buffering false
set seed 42
run
quit
"""
AVG_FILE = (4096 + 65536) // 2


def build_shim(workdir: Path) -> Path:
    """Compile readcheck.c into workdir; RuntimeError saying why if it cannot."""
    out = workdir / "readcheck.so"
    src = Path(__file__).with_name("readcheck.c")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("postmark needs a C compiler for its read checker (apt-get install gcc)")
    r = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(out), str(src), "-ldl"],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(f"building the read checker failed: {r.stderr.strip()[-300:]}")
    return out


def files_for(dataset: int) -> int:
    """Postmark's file count for a data set: about its size in 4-64 KiB files."""
    return max(500, min(40000, dataset // AVG_FILE))


def cmd(
    python: str,
    where: str,
    ref: str,
    files: int,
    transactions: int,
    shim: Path,
    check_tasks: str | None = None,
) -> list[str]:
    out = [python, "-m", "memlend.bench.postmark", where, ref, str(files), str(transactions)]
    return out + [str(shim)] + ([check_tasks] if check_tasks else [])


def _timed_postmark(
    conf: str, location: str, env: dict, tmp: str
) -> tuple[int, bytes, float | None, float | None]:
    """Run Postmark; its status, output, and when its transaction phase began and ended.

    stdbuf: Postmark's progress ("Performing transactions....Done") arrives as
    printed, so the transaction phase is timed to the millisecond."""
    # stderr to a file: a full pipe nobody reads would block Postmark
    with open(os.path.join(tmp, "stderr"), "w") as err:
        p = subprocess.Popen(
            ["stdbuf", "-o0", "postmark", conf],
            stdin=subprocess.DEVNULL,  # after its file, Postmark reads commands from stdin
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=location,
        )
        assert p.stdout is not None
        text, t_start, t_end = b"", None, None
        while chunk := p.stdout.read1(4096):
            text += chunk
            now = time.monotonic()
            if t_start is None and b"Performing transactions" in text:
                t_start = now
            if t_start is not None and t_end is None and b"Deleting files" in text:
                t_end = now
        return p.wait(), text, t_start, t_end


def _run(
    where: str, ref: str, files: int, transactions: int, shim: str, check_tasks: str = ""
) -> dict:
    location = os.path.join(where, SUBDIR)
    shutil.rmtree(location, ignore_errors=True)
    os.mkdir(location)
    # beside the shim: in the testbed's work directory, removed with it whatever happens
    tmp = tempfile.mkdtemp(prefix="postmark-", dir=os.path.dirname(shim))
    try:
        conf = os.path.join(tmp, "postmark.cfg")
        with open(conf, "w") as f:
            f.write(CONFIG.format(files=files, transactions=transactions))
        check_out = os.path.join(tmp, "checked")
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=shim,
            MEMLEND_CHECK_MNT=location,
            MEMLEND_CHECK_REF=os.path.join(ref, SUBDIR),
            MEMLEND_CHECK_OUT=check_out,
            MEMLEND_CHECK_TASKS=check_tasks,
        )
        status, text, t_start, t_end = _timed_postmark(conf, location, env, tmp)
        with open(os.path.join(tmp, "stderr")) as f:
            err = f.read()[-2000:]
        out = text.decode(errors="replace")
        try:
            with open(check_out) as f:
                reads, nbytes, bad, moved = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            reads, nbytes, bad, moved = 0, 0, -1, 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(location, ignore_errors=True)
    if status or t_start is None or t_end is None:
        raise SystemExit(f"postmark failed (status {status}): {(err or out).strip()[-300:]}")
    seconds = max(t_end - t_start, 1e-6)
    m = re.search(r"(\d+) read \(", out)
    return {
        "iops": transactions / seconds,  # transactions per second
        "mbps": nbytes / 1e6 / seconds,
        "seconds": seconds,
        "files_read": int(m.group(1)) if m else None,
        "checked_reads": reads,
        "checked_bytes": nbytes,
        "bad_reads": bad,
        # the shim's reads of REF were made outside the client's blkio group
        "check_reads_apart": bool(moved),
    }


def parse(stdout: str) -> dict:
    j = json.loads(stdout.strip().splitlines()[-1])
    ok = j["bad_reads"] == 0 and j["checked_reads"] > 0
    return {
        "iops": round(j["iops"], 1),
        "mbps": round(j["mbps"], 2),
        "p50_us": None,  # Postmark reports no latencies
        "p99_us": None,
        "ios": j["checked_reads"],
        "fio_error": 0 if ok else 84,
        "postmark": j,
    }


def main(argv: list[str] | None = None) -> int:
    where, ref, files, transactions, shim, *tasks = argv or sys.argv[1:]
    print(json.dumps(_run(where, ref, int(files), int(transactions), shim, *tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
