"""pjdfstest on a mount, in each local tier (DESIGN invariant 8: pjdfstest is the judge).

Opt-in: pjdfstest is not part of this repository (nor a Debian package). Point
PJDFSTEST at a directory holding a built `pjdfstest` and its `tests/` (how one was
reconstructed and built here: docs/reliability.md, "pjdfstest"), then, as root:

    PJDFSTEST=/var/tmp/pjdfstest .venv/bin/python -m pytest -q tests/test_mount_pjdfstest.py

Each tier takes about three minutes on the 2-CPU test machine. Without PJDFSTEST the
test is skipped, so `make test` does not depend on it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Mount

SUITE = os.environ.get("PJDFSTEST", "")

pytestmark = [
    pytest.mark.skipif(not SUITE, reason="set PJDFSTEST to a built pjdfstest directory"),
    pytest.mark.skipif(os.geteuid() != 0, reason="pjdfstest changes owners: needs root"),
    pytest.mark.skipif(shutil.which("prove") is None, reason="needs prove (perl)"),
]


@pytest.mark.parametrize("options", [(), ("--no-passthrough",)], ids=["default", "nopt"])
def test_pjdfstest_passes(
    mount_factory: Callable[..., Mount], local_tier: str, options: tuple[str, ...]
) -> None:
    if options and local_tier != "kernel":
        pytest.skip("--no-passthrough is a kernel-tier option")
    suite = Path(SUITE)
    assert (suite / "pjdfstest").is_file() and (suite / "tests").is_dir(), SUITE
    m = mount_factory(*options)
    # pjdfstest runs from inside the file system under test, and so do we.
    proc = subprocess.run(
        ["prove", "-r", str(suite / "tests")],
        cwd=m.mnt,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    summary = proc.stdout[proc.stdout.rfind("Test Summary Report") :]
    assert proc.returncode == 0, summary or proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Result: PASS" in proc.stdout
