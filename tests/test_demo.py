"""`memlend demo` (the README's first command) runs and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys


def _demo_mounts() -> list[str]:
    # Only the demo's own (in its temporary directory): other tests mount meanwhile.
    with open("/proc/mounts") as f:
        return [line for line in f if "memlend-demo-" in line]


def test_demo_runs_small_and_leaves_nothing_behind() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memlend", "demo", "--dataset", "16M", "--cache-size", "8M",
         "--reads", "2000"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for label in ("LRU", "LIRS (the", "LIRS + a"):
        assert label in proc.stdout
    assert "Traceback" not in proc.stderr
    assert _demo_mounts() == []
    lenders = subprocess.run(
        ["pgrep", "-f", "memlend lend --listen 127.0.0.1"], capture_output=True
    )
    assert lenders.stdout == b""
