"""`memlend bench`: the quick matrix end to end, and that the testbed always cleans up."""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memlend.bench import postmark, report_bench, run, testbed, workloads
from memlend.errors import UserError

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the testbed needs root")

# Each test checks that no other testbed exists: under pytest-xdist they must run on one
# worker, one after the other (`--dist loadgroup` in the Makefile).
pytestmark = pytest.mark.xdist_group("testbed")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    run.add_bench_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--disk", "floppy"],
        ["--workload", "nope"],
        ["--config", "nope"],
        ["--client-memory", "12K"],
        ["--client-memory", "lots"],
        ["--config", "cfuse"],  # the reference config needs its binary
        ["--config", "cfuse", "--cfuse", "/nonexistent/passthrough_ll"],
    ],
)
def test_bad_input_is_a_user_error(argv: list[str]) -> None:
    with pytest.raises(UserError):
        run._plan(_args(*argv))


def test_cfuse_is_only_on_request() -> None:
    assert "cfuse" not in run._plan(_args()).configs
    plan = run._plan(_args("--config", "pagecache", "cfuse", "--cfuse", "true"))
    assert plan.configs == ["pagecache", "cfuse"]
    assert plan.cfuse is not None and os.path.isabs(plan.cfuse)


def test_quick_plan_and_cache_size() -> None:
    plan = run._plan(_args("--quick"))
    assert plan.dataset == 4 * plan.client_memory
    assert set(plan.configs) >= {"pagecache", "local", "lender"}
    assert set(plan.workloads) >= {"randread-uniform-qd1", "hotscan"}
    assert run.cache_size(plan.client_memory) < plan.client_memory


def test_disk_of_names_a_whole_disk(tmp_path: Path) -> None:
    try:
        dev = testbed.disk_of(tmp_path)
    except UserError:
        pytest.skip("tmp_path is not on a block device")
    assert Path(f"/sys/dev/block/{dev}").exists()
    assert not Path(f"/sys/dev/block/{dev}/partition").exists()


def test_parse_fio_picks_the_main_job() -> None:
    job = {
        "jobname": "hot",
        "error": 0,
        "read": {
            "iops": 10.0,
            "bw_bytes": 40960,
            "total_ios": 100,
            "clat_ns": {"percentile": {"50.000000": 2000, "99.000000": 9000}},
        },
    }
    other = dict(job, jobname="scan", read=dict(job["read"], iops=1.0))
    out = workloads.parse_fio("noise\n" + json.dumps({"jobs": [job, other]}), "hot")
    assert out["iops"] == 10.0 and out["p50_us"] == 2.0 and out["p99_us"] == 9.0


def test_report_renders_ratios_and_errors(tmp_path: Path) -> None:
    meta = {
        "command": "memlend bench --quick",
        "started": "a",
        "finished": "b",
        "client_memory": 128 << 20,
        "cache_size": 64 << 20,
        "dataset": 512 << 20,
        "seconds_per_cell": 6,
        "backing_disk": "254:0",
        "network": "loopback",
        "pinning": {"client": "cpuset CPU 0", "lenders": "cpuset CPU 1"},
        "machine": {"kernel": "x", "cpus": 2},
        "disks": {"cloud": {"read_iops": 1000, "read_bps": 100_000_000}},
    }

    def row(config: str, iops: float | None, error: str | None = None) -> dict:
        return {
            "config": config,
            "workload": "randread-uniform-qd1",
            "disk": "cloud",
            "iops": iops,
            "mbps": 1.0,
            "p50_us": 1.0,
            "p99_us": 2.0,
            "disk_ios": 5,
            "hit_ratio": {},
            "verified": error is None,
            "error": error,
        }

    res = {
        "meta": meta,
        "rows": [
            row("pagecache", 100.0),
            row("kernel-lender", 1500.0),
            row("kernel", 80.0),
            row("local", None, "boom"),
        ],
    }
    md = report_bench.markdown(res)
    assert "15.00x — goal met" in md and "error: boom" in md
    assert "0.80x — goal not met" in md  # kernel without a lender: 0.9x wanted
    report_bench.write_report(res, tmp_path)
    assert (tmp_path / "testbed-iops-cloud.png").stat().st_size > 1000


@needs_root
@pytest.mark.timeout(900)  # the quick bench itself takes ~4-5 minutes here
def test_quick_bench_runs_verified_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "memlend.bench.run", "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a failure or time-out: let the bench clean up first
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err[-2000:]
    res = json.loads((out / "results.json").read_text())
    cells = {(r["config"], r["workload"]): r for r in res["rows"]}
    for c in run.QUICK_CONFIGS:
        for w in workloads.QUICK_WORKLOADS:
            r = cells[(c, w)]
            assert r["verified"] is True or r["error"], r
            assert r["client_memory"] == res["meta"]["client_memory"]
            assert "pinning" in r and r["pinning"]["client"].startswith("cpuset 0")
    # the core of the matrix must really run, not only report errors
    for c in ("pagecache", "local", "lender", "kernel-lender"):
        for w in workloads.QUICK_WORKLOADS:
            assert cells[(c, w)]["verified"] is True, cells[(c, w)]
            assert cells[(c, w)]["iops"] > 0
            assert cells[(c, w)]["local_tier"] == run.local_tier(c)
    assert cells[("lender", "randread-uniform-qd1")]["hit_ratio"]["remote"] > 0
    assert cells[("kernel-lender", "randread-uniform-qd1")]["hit_ratio"]["remote"] > 0
    # the page cache of the data read inside the client group is charged to it
    pc = cells[("pagecache", "hotscan")]
    assert 0 < pc["client_cache_after_warm"] <= res["meta"]["client_memory"]
    assert (out / "report.md").read_text().startswith("# memlend bench report")
    assert (out / "testbed-iops-cloud.png").exists()
    assert not testbed.leftovers(proc.pid)
    for r in res["rows"]:  # what each row records beyond the numbers
        assert set(r["cpu"]) == {"cpu0", "cpu1"} and r["client_cgroup"]["peak_bytes"] > 0
    assert res["meta"]["network"].startswith("veth")
    print(f"memlend bench --quick took {time.monotonic() - t0:.0f} s")


@needs_root
def test_interrupted_bench_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memlend.bench.run",
            "--quick",
            "--config",
            "lender",
            "--out",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # wait until the testbed is fully up: lender group and the mount exist
        end = time.monotonic() + 120
        while time.monotonic() < end:
            with open("/proc/mounts") as f:
                mounted = any("memlend-bench" in line for line in f)
            if mounted and glob.glob("/sys/fs/cgroup/memory/memlend-bench*lender*"):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the testbed did not come up")
        time.sleep(1.0)  # mid warm-up
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert not testbed.leftovers(proc.pid)


def test_sqlite_workload_checks_every_row(tmp_path: Path) -> None:
    db = str(tmp_path / "db.sqlite")
    rows = workloads.make_db(db, 4 << 20)
    out = subprocess.run(
        workloads.sqlite_cmd(sys.executable, db, 0.3, rows), capture_output=True, text=True
    )
    res = workloads.parse_sqlite(out.stdout)
    assert res["ios"] > 0 and res["fio_error"] == 0 and res["bad_rows"] == 0
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("UPDATE t SET v = zeroblob(4000)")
    con.commit()
    con.close()
    out = subprocess.run(
        workloads.sqlite_cmd(sys.executable, db, 0.2, rows), capture_output=True, text=True
    )
    assert workloads.parse_sqlite(out.stdout)["fio_error"] != 0


def test_postmark_runs_with_every_read_checked(tmp_path: Path) -> None:
    shim = postmark.build_shim(tmp_path)
    where = tmp_path / "fs"
    where.mkdir()
    out = subprocess.run(
        postmark.cmd(sys.executable, str(where), str(where), 200, 1000, shim),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    res = postmark.parse(out.stdout)
    pm = res["postmark"]
    assert pm["checked_reads"] > 0 and pm["bad_reads"] == 0 and res["fio_error"] == 0
    assert res["iops"] > 0 and not list(where.iterdir())  # Postmark's files are gone


def test_read_checker_catches_a_wrong_byte(tmp_path: Path) -> None:
    shim = postmark.build_shim(tmp_path)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "mnt" / "f").write_bytes(b"x" * 10000)
    (tmp_path / "ref" / "f").write_bytes(b"x" * 9999 + b"y")
    code = f"open({str(tmp_path / 'mnt' / 'f')!r}, 'rb', buffering=0).read()"

    def checked(ref: str) -> list[int]:
        env = dict(
            os.environ,
            LD_PRELOAD=str(shim),
            MEMLEND_CHECK_MNT=str(tmp_path / "mnt"),
            MEMLEND_CHECK_REF=str(tmp_path / ref),
            MEMLEND_CHECK_OUT=str(tmp_path / "out"),
        )
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        return [int(x) for x in (tmp_path / "out").read_text().split()]

    reads, nbytes, bad, apart = checked("ref")
    assert reads >= 1 and nbytes == 10000 and bad == 1 and apart == 0
    assert checked("mnt")[2] == 0


@needs_root
@pytest.mark.skipif(
    testbed.cgroup_version() != 1, reason="the checker reads apart on cgroup v1 only"
)
def test_read_checker_reads_the_reference_apart(tmp_path: Path) -> None:
    """With MEMLEND_CHECK_TASKS the shim reads the reference files from a thread of
    its own in that blkio group: the group counts their disk reads (none of the
    checked program's), and a child forked after the first check reads apart too."""
    shim = postmark.build_shim(tmp_path)
    bed = testbed.Testbed(tmp_path / "bed").open()
    try:
        g = bed.io_group("check")
        (tmp_path / "mnt").mkdir()
        (tmp_path / "ref").mkdir()
        data = os.urandom(300_000)
        for d in ("mnt", "ref"):
            (tmp_path / d / "f").write_bytes(data)
        with open(tmp_path / "ref" / "f", "rb") as f:  # the reference from the disk
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        code = (
            "import os\n"
            f"p = {str(tmp_path / 'mnt' / 'f')!r}\n"
            "open(p, 'rb', buffering=0).read()\n"
            "if os.fork() == 0:\n"
            "    open(p, 'rb', buffering=0).read(5000)\n"
            "    os._exit(0)\n"
            "assert os.wait()[1] == 0\n"
        )
        env = dict(
            os.environ,
            LD_PRELOAD=str(shim),
            MEMLEND_CHECK_MNT=str(tmp_path / "mnt"),
            MEMLEND_CHECK_REF=str(tmp_path / "ref"),
            MEMLEND_CHECK_OUT=str(tmp_path / "out"),
            MEMLEND_CHECK_TASKS=str(g.path("blkio") / "tasks"),
        )
        before = g.io_serviced(bed.disk)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
        reads, nbytes, bad, apart = (int(x) for x in (tmp_path / "out").read_text().split())
        assert nbytes == len(data) and bad == 0 and apart == 1 and reads >= 1
        ios, read_bytes = (a - b for a, b in zip(g.io_serviced(bed.disk), before, strict=True))
        assert ios >= 1 and read_bytes >= 4096  # the reference's pages came from the disk here
    finally:
        bed.close()
    assert not testbed.leftovers(os.getpid())
