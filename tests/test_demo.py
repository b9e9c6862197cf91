"""`memlend demo` (the README's first command) runs, prints its table, and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memlend.bench.testbed import leftovers

# a testbed: one at a time with the bench tests (`--dist loadgroup` in the Makefile)
pytestmark = [
    pytest.mark.xdist_group("testbed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo builds a testbed: root"),
]


def test_demo_prints_the_three_configurations_and_leaves_nothing() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "memlend", "demo", "--client-memory", "64M", "--seconds", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    for label in ("pagecache:", "kernel:", "kernel-lender:", "speed-up", "1.00x"):
        assert label in out, out
    assert "NO" not in out and "Traceback" not in err
    assert leftovers(proc.pid) == []


def test_demo_refuses_bad_input_in_one_line() -> None:
    for argv in (["--client-memory", "12XB"], ["--disk", "floppy"], ["--seconds", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "memlend", "demo", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 2, argv
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
