"""`memlend demo` (the README's first command) runs and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys


def _memlend_mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if "fuse.memlend" in line]


def test_demo_runs_small_and_leaves_nothing_behind() -> None:
    before = _memlend_mounts()
    proc = subprocess.run(
        [sys.executable, "-m", "memlend", "demo", "--dataset", "16M", "--cache-size", "8M",
         "--reads", "2000"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for label in ("LRU", "LIRS (the", "LIRS + a"):
        assert label in proc.stdout
    assert "Traceback" not in proc.stderr
    assert _memlend_mounts() == before
    lenders = subprocess.run(
        ["pgrep", "-f", "memlend lend --listen 127.0.0.1"], capture_output=True
    )
    assert lenders.stdout == b""
