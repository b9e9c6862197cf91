"""`python -m memlend.bench.manyfiles` at small scale: every phase, the budget, and the
--stopped-lender mode really filling the put queue (issue 9; the big runs are in
docs/benchmarks.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memlend.bench import manyfiles

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts as root")


def test_a_stopped_lender_fills_the_put_queue_within_the_budget(tmp_path: Path) -> None:
    # 64 KiB files, four 16 KiB blocks each: the 16 MiB queue fills after 256 files
    # read while the put thread waits on the stopped lender.
    res = manyfiles.run(1500, 10, 64 * 1024, "64M", None, where=str(tmp_path),
                        stopped_lender=True)  # fmt: skip
    q = res["put_queue"]
    assert res["budget_mib"] == 128.0 and res["local_tier"] == "kernel"
    assert q["disk_read_mib"] >= 1500 * 64 / 1024 * 0.9, q  # every read reached the disk
    assert q["peak_mib"] == q["capacity_mib"] == 16.0, q  # full, and no fuller
    assert q["full_drops"] > 0 and q["dropped_puts"] >= q["full_drops"], q
    assert q["lender_state_after"] in (["active"], ["suspended"], ["down"])
    assert res["inodes_after_rm"] == 1 and res["fds_after_rm"] < 32, res
    assert res["within_budget"], res
    assert not any(tmp_path.iterdir())  # the scratch tree is gone


def test_without_a_lender_no_put_queue(tmp_path: Path) -> None:
    res = manyfiles.run(200, 4, 4096, "16M", None, where=str(tmp_path))
    assert "put_queue" not in res and res["budget_mib"] == 80.0 and res["within_budget"]
    assert {"create_s", "ls_s", "read_s", "rm_s", "daemon_hwm_mib"} <= set(res)
