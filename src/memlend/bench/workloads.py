"""The benchmark's workloads: fio job lines, the data set, and result parsing.

Every fio workload reads a data set that fio itself wrote with `verify=crc32c` headers
every 4 KiB, and reads it back with the same verify options: fio checks the checksum and
the offset recorded in each 4 KiB of everything it reads (a block served from the wrong
place or corrupted makes the job fail), which is what `verified` means in the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

VERIFY = ["--verify=crc32c", "--verify_interval=4096", "--verify_fatal=1"]
# never drop the page cache before a job (fio does by default): the warm-up is the point
KEEP = ["--invalidate=0"]
DATA = "data"
# hotscan's hot set, in % of the client memory: more than the half of its file pages
# the kernel keeps on its active list (mm/vmscan.c, inactive_is_low: below 1 GiB the
# active list may not outgrow the inactive one), so the scan can push hot pages out of
# the page cache; a scan-resistant cache that holds 60% of the memory keeps them.
HOT_SHARE = 60
# ...at an application's steady rate, not a benchmark loop's: each hot page is then read
# again only after tens of seconds, long after a scan at disk speed has pushed it down the
# kernel's inactive list, while LIRS keeps blocks by reuse, not recency.
HOT_IOPS = 2000


def fill_cmd(path: str, size: int) -> list[str]:
    """fio writing the data set with 4 KiB verify headers."""
    return [
        "fio",
        "--name=fill",
        f"--filename={path}",
        "--rw=write",
        "--bs=1M",
        f"--size={size}",
        "--do_verify=0",
        "--verify_state_save=0",  # else fio leaves a *-verify.state file in the cwd
        "--end_fsync=1",
        "--output-format=json",
        *VERIFY,
    ]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    args: tuple[str, ...]  # fio job options (beyond filename/size/runtime/verify)
    main_job: str = ""  # report only this job's numbers (others are background)
    warm_bs: str = "16k"
    hot_warm: bool = False  # read the hot set once, unthrottled, just before the run

    def hot_bytes(self, client_memory: int) -> int:
        return max(4096 * 256, client_memory * HOT_SHARE // 100) // 4096 * 4096

    def warm_cmd(self, path: str, client_memory: int) -> list[str]:
        """The hot set's warm-up: every 16 KiB of it once, in random order, verified."""
        return [
            "fio",
            "--name=hotwarm",
            f"--filename={path}",
            "--rw=randread",
            "--bs=16k",
            "--offset=0",
            f"--size={self.hot_bytes(client_memory)}",
            "--ioengine=psync",
            "--randrepeat=0",
            "--output-format=json",
            *KEEP,
            *VERIFY,
        ]

    def cmd(self, path: str, dataset: int, client_memory: int, seconds: float) -> list[str]:
        base = [
            "fio",
            f"--filename={path}",
            f"--size={dataset}",
            "--ioengine=psync",
            "--time_based",
            f"--runtime={seconds}",
            "--output-format=json",
            # a new offset sequence every run: with fio's default (randrepeat=1) a cell
            # repeated the previous cell's offsets, which that cell had just cached
            # (the hdd cells after the cloud ones: 0.83 page-cache hits on a data set
            # four times the memory)
            "--randrepeat=0",
            *KEEP,
            *VERIFY,
        ]
        hot = self.hot_bytes(client_memory)
        return base + [a.format(hot=hot) for a in self.args]


def _rand(name: str, extra: list[str], desc: str) -> Workload:
    return Workload(name, desc, ("--name=" + name, "--rw=randread", "--bs=4k", *extra))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _rand("randread-uniform-qd1", [], "random 4 KiB reads, uniform, 1 job"),
        _rand(
            "randread-zipf-qd1",
            ["--random_distribution=zipf:1.1"],
            "random 4 KiB reads, zipf theta 1.1, 1 job",
        ),
        _rand(
            "randread-uniform-qd16",
            ["--numjobs=16", "--group_reporting"],
            "random 4 KiB reads, uniform, 16 jobs (qd16 with psync)",
        ),
        Workload(
            "seqread",
            "sequential 1 MiB reads",
            ("--name=seqread", "--rw=read", "--bs=1M"),
        ),
        Workload(
            "hotscan",
            f"an application reading a hot set ({HOT_SHARE}% of the client memory, read once "
            f"just before) at random, 4 KiB at a time, at up to {HOT_IOPS:,} reads/s, while a "
            "second job scans the whole data set as fast as the disk allows; numbers are "
            "the hot job's",
            (
                "--name=hot",
                "--rw=randread",
                "--bs=4k",
                f"--rate_iops={HOT_IOPS}",
                "--offset=0",
                "--size={hot}",
                "--name=scan",
                "--rw=read",
                "--bs=1M",
            ),
            main_job="hot",
            hot_warm=True,
        ),
    )
}
# lender-spike: the random qd1 reads, while a process in the (first) lender's memory
# cgroup allocates most of the lender's memory a third of the way in (16 MiB every
# 150 ms, about 100 MB/s: the lender promises to give memory back within a second)
SPIKE = Workload(
    "lender-spike",
    "random 4 KiB reads, uniform, 1 job; a third of the way in, a process in the lender's "
    "cgroup allocates 80% of what the lender lends (the lender must give memory back)",
    ("--name=lender-spike", "--rw=randread", "--bs=4k"),
)

SPIKE_CODE = (
    "import sys, time\n"
    "n = int(sys.argv[1]); step = 16 << 20; held = []\n"
    "while sum(map(len, held)) < n:\n"
    "    b = bytearray(step); b[::4096] = b'x' * len(range(0, step, 4096)); held.append(b)\n"
    "    time.sleep(0.15)\n"
    "print('allocated', n, flush=True)\n"
    "time.sleep(3600)\n"
)

QUICK_WORKLOADS = ("randread-uniform-qd1", "hotscan")


def parse_fio(stdout: str, main_job: str = "") -> dict:
    """iops, MB/s, p50/p99 µs, ios and fio's error from fio's JSON (text before it skipped)."""
    start = stdout.find("{")
    if start < 0:
        raise RuntimeError(f"fio printed no JSON: {stdout[-300:]!r}")
    jobs = json.loads(stdout[start:])["jobs"]
    if main_job:
        jobs = [j for j in jobs if j["jobname"] == main_job] or jobs
    iops = sum(j["read"]["iops"] for j in jobs)
    bw = sum(j["read"]["bw_bytes"] for j in jobs)
    ios = sum(j["read"]["total_ios"] for j in jobs)
    pct = jobs[0]["read"]["clat_ns"].get("percentile", {})
    err = max(j["error"] for j in jobs)
    return {
        "iops": round(iops, 1),
        "mbps": round(bw / 1e6, 2),
        "p50_us": round(pct.get("50.000000", 0) / 1000, 1),
        "p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "ios": ios,
        "fio_error": err,
    }


# ---- SQLite: point queries on a database larger than the client's memory --------------

DB = "db.sqlite"
ROW_BYTES = 4000
SQLITE = Workload(
    "sqlite",
    "SQLite point queries (SELECT by random primary key, one connection) on a database "
    "the size of the data set; every row's value is checked against its key's digest",
    (),
)
WORKLOADS[SQLITE.name] = SQLITE
# Postmark (memlend.bench.postmark): small files created, read whole, appended and
# deleted on the mount; every read checked against the backing file by readcheck.so
POSTMARK = Workload(
    "postmark",
    "Postmark: files of 4-64 KiB totalling about the data set, then read-whole-file/append "
    "and create/delete transactions; iops = transactions/s; every read checked",
    (),
)
WORKLOADS[POSTMARK.name] = POSTMARK
# last: a lender killed by the spike would spoil the cells after it
WORKLOADS[SPIKE.name] = SPIKE


def row_value(i: int) -> bytes:
    import hashlib

    return hashlib.sha256(i.to_bytes(8, "little")).digest() * (ROW_BYTES // 32)


def make_db(path: str, size: int) -> int:
    """A table of `size` // 4 KiB rows (id, 4000-byte value); returns the row count."""
    import sqlite3

    rows = max(1000, size // 4096)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        con.executemany("INSERT INTO t VALUES (?, ?)", ((i, row_value(i)) for i in range(rows)))
        con.commit()
    finally:
        con.close()
    return rows


SQLITE_CODE = """
import hashlib, json, random, sqlite3, sys, time
path, seconds, rows = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
con.execute("PRAGMA cache_size=-2000")
rnd = random.Random(2)
lat, bad = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    i = rnd.randrange(rows)
    t0 = time.perf_counter_ns()
    (v,) = con.execute("SELECT v FROM t WHERE id=?", (i,)).fetchone()
    lat.append(time.perf_counter_ns() - t0)
    if v != hashlib.sha256(i.to_bytes(8, "little")).digest() * (len(v) // 32):
        bad += 1
lat.sort()
n = len(lat)
print(json.dumps({"ios": n, "iops": n / seconds, "bad": bad,
                  "p50_us": lat[n // 2] / 1000, "p99_us": lat[n * 99 // 100] / 1000}))
"""


def sqlite_cmd(python: str, path: str, seconds: float, rows: int) -> list[str]:
    return [python, "-c", SQLITE_CODE, path, str(seconds), str(rows), "memlend-bench-sqlite"]


def parse_sqlite(stdout: str) -> dict:
    j = json.loads(stdout.strip().splitlines()[-1])
    return {
        "iops": round(j["iops"], 1),
        "mbps": round(j["iops"] * 4096 / 1e6, 2),
        "p50_us": round(j["p50_us"], 1),
        "p99_us": round(j["p99_us"], 1),
        "ios": j["ios"],
        "fio_error": 0 if j["bad"] == 0 else 84,
        "bad_rows": j["bad"],
    }
