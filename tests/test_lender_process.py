"""The lender as a real process: `python -m memlend.lender`, killed in every path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memlend.remote.client import LenderClient
from memlend.remote.secret import auth_key, load_secret, write_secret

MiB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    write_secret(str(path))
    return path


LENDER = [sys.executable, "-m", "memlend.lender"]


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], tuple[subprocess.Popen, int]]]:
    """Start a lender in the foreground from a whole command; its port."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str]) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read()
        return proc, int(line.rsplit(":", 1)[1])

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()


@pytest.fixture
def start_lender(spawn, secret: Path) -> Callable[..., tuple[subprocess.Popen, int]]:
    def start(*options: str) -> tuple[subprocess.Popen, int]:
        return spawn([*LENDER, "--listen", "127.0.0.1:0", "--secret-file", str(secret),
                      "--foreground", *options])  # fmt: skip

    return start


def connect(port: int, secret: Path, cid: bytes = b"t") -> LenderClient:
    return LenderClient(("127.0.0.1", port), auth_key(load_secret(str(secret))), cid, timeout=5)


def test_round_trip_and_clean_stop(start_lender, secret) -> None:
    proc, port = start_lender("--memory", "16M")
    with connect(port, secret) as c:
        assert c.put_many([(b"k", b"v" * 1000)]) == 1
        assert c.multi_get([b"k"]) == [b"v" * 1000]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.parametrize("block", ["64K", "4K"])
def test_rss_stays_within_memory_plus_64m(start_lender, secret, block) -> None:
    memory = 96 * MiB
    proc, port = start_lender("--memory", "96M", "--block-size", block, "--busy-poll-us", "0")
    bs = int(block[:-1]) * 1024
    value = os.urandom(bs + 29)  # a sealed block: the slot plus the seal overhead
    n = 2 * memory // bs
    with connect(port, secret) as c:
        for i in range(0, n, 256):
            c.put_many([(b"blk-%08d" % j, value) for j in range(i, min(n, i + 256))])
        s = c.stats()
    peak = rss(proc.pid)
    assert s["bytes_used"] >= 0.99 * s["slots"] * bs, s  # it did fill every slot
    assert s["evictions"] > 0
    print(f"block {block}: RSS {peak / MiB:.1f} MiB for --memory 96M, {s['blocks']} blocks")
    assert peak <= memory + 64 * MiB, f"RSS {peak / MiB:.0f} MiB"


def test_memory_is_given_back_when_the_host_is_short(start_lender, secret, tmp_path) -> None:
    avail = tmp_path / "available"
    avail.write_text(str(8 << 30))
    proc, port = start_lender(
        "--memory",
        "64M",
        "--reserve",
        "1G",
        "--memory-source-file",
        str(avail),
        "--watch-interval",
        "0.1",
        "--block-size",
        "64K",
    )
    with connect(port, secret) as c:
        c.put_many([(b"%06d" % i, os.urandom(64 * 1024 + 29)) for i in range(900)])
        full = rss(proc.pid)
        assert c.stats()["bytes_used"] > 48 * MiB
        avail.write_text(str((1 << 30) - 40 * MiB))  # 40 MiB short
        t = time.monotonic()
        while c.stats()["given_back_bytes"] < 40 * MiB:
            assert time.monotonic() - t < 1.0, "memory not given back within a second"
            time.sleep(0.05)
        assert rss(proc.pid) < full - 36 * MiB  # the pages really went back to the kernel


def test_the_config_file_applies_as_to_memlend_lend(spawn, secret, tmp_path) -> None:
    path = tmp_path / "memlend.toml"
    path.write_text(
        f'[lend]\nlisten = "127.0.0.1:0"\nmemory = "24M"\nblock_size = "8K"\n'
        f'policy = "lru"\nsecret_file = "{secret}"\n'
    )
    for cmd in ([*LENDER], [sys.executable, "-m", "memlend", "lend"]):
        proc, port = spawn([*cmd, "--config", str(path), "--foreground"])
        with connect(port, secret) as c:
            s = c.stats()
        assert (s["memory_cap"], s["slot_size"]) == (24 * MiB, 8 << 10), (cmd, s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "policy lru" in proc.stderr.read(), cmd


def run_lend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LENDER, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bad_input_is_one_line_and_exit_2(secret, tmp_path) -> None:
    short = tmp_path / "short"
    short.write_text("abcd\n")
    base = ["--listen", "127.0.0.1:0", "--foreground"]
    cases = [
        [*base, "--memory", "16M", "--secret-file", str(short)],
        [*base, "--memory", "lots", "--secret-file", str(secret)],
        [*base, "--memory", "1K", "--secret-file", str(secret)],
        ["--listen", "nowhere", "--memory", "16M", "--secret-file", str(secret)],
        [*base, "--memory", "16M", "--secret-file", str(secret), "--block-size", "3K"],
        [*base, "--memory", "16M", "--secret-file", str(secret), "--policy", "nope"],
    ]
    for args in cases:
        r = run_lend(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("memlend: "), r.stderr
    # usage errors name the command as it was run, as `memlend lend` names itself
    r = run_lend("--listen", "127.0.0.1:0", "--secret-file", str(secret))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("python -m memlend.lender: the following arguments are required")


def test_daemon_mode_detaches(secret, tmp_path) -> None:
    log = tmp_path / "lend.log"
    r = run_lend(
        "--listen",
        "127.0.0.1:0",
        "--memory",
        "16M",
        "--secret-file",
        str(secret),
        "--log-file",
        str(log),
    )
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split("(pid ")[1].split(",")[0])
    try:
        port = int(r.stdout.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        with connect(port, secret) as c:
            assert c.ping(b"x") == b"x"
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    assert "lending 16 MiB" in log.read_text()
