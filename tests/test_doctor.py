"""`memlend doctor` on this host: a real FUSE handshake, a real lender."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import memlend


def _lines(out: str) -> dict[str, str]:
    """'state  what: detail' lines by `what`."""
    res = {}
    for line in out.splitlines():
        state, rest = line.split(None, 1)
        what, detail = rest.split(": ", 1)
        res[what] = f"{state} {detail}"
    return res


def test_doctor_checks_the_host_and_lenders(lender_factory, secret_file: Path, tmp_path: Path):
    lender = lender_factory()
    other = tmp_path / "other.secret"
    other.write_text(os.urandom(32).hex() + "\n")
    other.chmod(0o600)
    args = ["doctor", "--backing", str(tmp_path), "--lender", lender.url]
    ok = memlend(*args, "--secret-file", str(secret_file))
    lines = _lines(ok.stdout)
    assert lines["fuse"].startswith(("ok protocol 7.", "warn protocol 7.")), lines
    assert {"allow_other", "cgroups", "O_DIRECT"} <= lines.keys()
    assert lines["O_DIRECT"].endswith("accepts O_DIRECT")  # the project needs it on /tmp
    assert lines[f"lender {lender.url}"].startswith("ok reachable and authenticated")
    # the temporary FUSE mount is gone
    with open("/proc/self/mountinfo") as f:
        assert "memlend-doctor-" not in f.read()

    bad = memlend(*args, "--secret-file", str(other), check=False)
    assert bad.returncode == 1
    assert _lines(bad.stdout)[f"lender {lender.url}"].startswith("FAIL reachable, authentication")

    gone = memlend("doctor", "--lender", "memlend://127.0.0.1:1", "--secret-file",
                   str(secret_file), check=False)  # fmt: skip
    assert gone.returncode == 1
    assert _lines(gone.stdout)["lender memlend://127.0.0.1:1"].startswith("FAIL unreachable")
