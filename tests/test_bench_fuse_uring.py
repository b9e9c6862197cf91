"""The FUSE-over-io_uring benchmark's pieces that need neither root nor a mount."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from memlend.bench import fuse_uring, uring_fuse_py


def test_python_server_structs_have_the_kernel_sizes() -> None:
    assert uring_fuse_py.IN_HDR.size == 40  # struct fuse_in_header
    assert uring_fuse_py.OUT_HDR.size == 16  # struct fuse_out_header
    assert uring_fuse_py.ATTR.size == 88  # struct fuse_attr
    assert uring_fuse_py.ENTRY_HEAD.size + uring_fuse_py.ATTR.size == 128  # fuse_entry_out
    assert uring_fuse_py.ATTR_OUT_HEAD.size + uring_fuse_py.ATTR.size == 104  # fuse_attr_out
    assert uring_fuse_py.INIT_OUT.size == 64  # struct fuse_init_out
    assert uring_fuse_py.PARAMS.size == 120  # struct io_uring_params


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_c_server_compiles_without_warnings(tmp_path: Path) -> None:
    src = Path(fuse_uring.__file__).with_name("uring_fuse.c")
    out = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(tmp_path / "u"), src],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def _run(mode: str, cpu: int, rnd: int, p50: int) -> dict:
    return {
        "mode": mode,
        "server_cpu": cpu,
        "round": rnd,
        "median_ns": p50,
        "p99_ns": 2 * p50,
        "mean_ns": p50,
        "server_cpu_ns_per_read": 1000,
        "reader_cpu_ns_per_read": 1000,
    }


def test_summary_compares_servers_round_by_round() -> None:
    modes = ["classic", "uring", "uring-defer", "py-classic", "py-uring"]
    res = {"rounds": 2, "runs": [], "command": "x", "started": "y"}
    for rnd in range(2):
        for cpu in fuse_uring.SERVER_CPUS:
            for mode in modes:
                p50 = {"classic": 4000, "uring": 5000, "py-uring": 8000}.get(mode, 4000)
                res["runs"].append(_run(mode, cpu, rnd, p50))
    res["summary"] = fuse_uring.summarize(res, modes)
    ratios = res["summary"]["ratios"]
    assert ratios["classic / uring/0"]["p50"]["median"] == pytest.approx(0.8)
    assert ratios["classic / uring-defer/1"]["p50"]["median"] == pytest.approx(1.0)
    assert ratios["py-classic / py-uring/0"]["p99"]["rounds"] == [0.5, 0.5]
    text = fuse_uring.markdown(res)
    assert "| classic / uring | 0 | 0.80x |" in text
    assert "| py-uring | 1 | 8.0 | 16.0 |" in text
