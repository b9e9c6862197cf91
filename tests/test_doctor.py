"""`memlend doctor` on this host: a real FUSE handshake, a real lender."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import memlend
from memlend.doctor import check_clock


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
    assert {"allow_other", "cgroups", "clock", "O_DIRECT"} <= lines.keys()
    assert "clocksource " in lines["clock"] and " ns per call" in lines["clock"]
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


def _slow_clock() -> float:
    """A clock that takes 2 µs a call, as one read through a system call might."""
    end = time.perf_counter_ns() + 2000
    while time.perf_counter_ns() < end:
        pass
    return 0.0


def test_clock_check_warns_on_a_slow_clock_or_clocksource(tmp_path: Path) -> None:
    source = tmp_path / "current_clocksource"
    source.write_text("tsc\n")
    state, what, detail = check_clock(str(source))
    assert (state, what) == ("ok", "clock"), detail
    assert detail.startswith("clocksource tsc; time.monotonic() ")

    state, _, detail = check_clock(str(source), clock=_slow_clock)
    assert state == "warn" and "over 1 µs per call" in detail, detail
    assert "a slow clock costs every remote hit" in detail

    source.write_text("hpet\n")
    state, _, detail = check_clock(str(source))
    assert state == "warn", detail
    assert detail.startswith("clocksource hpet;") and "hpet is not tsc" in detail
    assert "over 1 µs" not in detail
