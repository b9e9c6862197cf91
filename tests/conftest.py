"""Shared fixtures: real memlend mounts, always unmounted in teardown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MEMLEND = [sys.executable, "-m", "memlend"]


def memlend(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the memlend command line; capture its output."""
    proc = subprocess.run(
        [*MEMLEND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"memlend {' '.join(args)} failed: {proc.stderr}")
    return proc


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def force_unmount(path: Path) -> None:
    """Unmount whatever is at `path`, by every means, ignoring errors."""
    for cmd in (["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True, check=False)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@dataclass
class Mount:
    backing: Path
    mnt: Path
    pid: int

    def stats(self) -> dict:
        return json.loads(memlend("stats", str(self.mnt), "--json").stdout)


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a mount runs in both local tiers, unless marked
    @pytest.mark.tiers("memlend") (or "kernel"): what it checks exists in one only."""
    own = [m.args[0] for m in metafunc.definition.iter_markers("parametrize")]
    if any("local_tier" in (a.split(",") if isinstance(a, str) else a) for a in own):
        return  # the test pairs tiers with its own parameters
    if "local_tier" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("tiers")
        metafunc.parametrize("local_tier", marker.args if marker else ("kernel", "memlend"))


@pytest.fixture
def mount_factory(tmp_path: Path, local_tier: str) -> Iterator[Callable[..., Mount]]:
    """mount_factory(*options, backing=None) -> Mount; every mount is undone at teardown.
    Mounts get --local-tier `local_tier` unless `options` name one."""
    made: list[Mount] = []

    def make(*options: str, backing: Path | None = None) -> Mount:
        if "--local-tier" not in options:
            options = ("--local-tier", local_tier, *options)
        n = len(made)
        b = backing or tmp_path / f"backing{n}"
        b.mkdir(exist_ok=True)
        m = tmp_path / f"mnt{n}"
        m.mkdir()
        # The daemon's log in tmp_path: tests must not litter /run/memlend.
        if "--log-file" not in options:
            options = (*options, "--log-file", str(tmp_path / f"mount{n}.log"))
        memlend("mount", str(b), str(m), *options)
        pid = json.loads(memlend("stats", str(m), "--json").stdout)["pid"]
        made.append(Mount(b, m, pid))
        return made[-1]

    try:
        yield make
    finally:
        for mt in made:
            try:
                subprocess.run(
                    [*MEMLEND, "umount", str(mt.mnt)], capture_output=True, check=False, timeout=30
                )
            except subprocess.TimeoutExpired:
                pass  # a daemon slow to exit must not stop the clean-up below
            force_unmount(mt.mnt)
            if not _wait_gone(mt.pid):
                os.kill(mt.pid, 9)


@pytest.fixture
def mount(mount_factory: Callable[..., Mount]) -> Mount:
    """One mount with a small cache (1 MiB blocks would hide block-boundary bugs)."""
    return mount_factory("--cache-size", "8M", "--block-size", "4K")


# ---- lenders: `memlend lend` daemons and memcached, killed in every path ---------------


def free_port() -> int:
    """A loopback port free right now (another process may take it before we do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A fresh secret (memlend genkey format, mode 0600) shared by lenders and mounts."""
    path = tmp_path / "lender.secret"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def seal_key_file(tmp_path: Path) -> Path:
    """A sealing key for mounts, so tests never create /var/lib/memlend/seal.key."""
    path = tmp_path / "seal.key"
    path.write_text(os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Lender:
    proc: subprocess.Popen
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"memlend://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def lender_factory(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., Lender]]:
    """lender_factory(*options, port=0, secret=None, memory="64M", block_size="16K")
    -> Lender: a foreground `memlend lend` on 127.0.0.1 (its log in tmp_path);
    every one is killed at teardown."""
    started: list[Lender] = []

    def start(
        *options: str,
        port: int = 0,
        secret: Path | None = None,
        memory: str = "64M",
        block_size: str = "16K",
    ) -> Lender:
        cmd = [*MEMLEND, "lend", "--listen", f"127.0.0.1:{port}", "--memory", memory]
        cmd += ["--block-size", block_size, "--reserve", "64M", "--foreground"]
        if "--clients" not in options:  # a lender takes one or the other
            cmd += ["--secret-file", str(secret or secret_file)]
        cmd += options
        log = tmp_path / f"lender{len(started)}.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        lender = Lender(proc, 0)
        started.append(lender)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, f"lender did not start: {line!r} {log.read_text()}"
        lender.port = int(line.rsplit(":", 1)[1])
        return lender

    try:
        yield start
    finally:
        kill_all(lender.proc for lender in started)


def kill_all(procs: Iterable[subprocess.Popen]) -> None:
    """Kill each process still running, reap it, close its stdout pipe."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def memcached_port() -> Iterator[int]:
    """A real memcached on an ephemeral loopback port; killed at teardown."""
    exe = shutil.which("memcached")
    if exe is None:
        pytest.skip("memcached is not installed")
    proc = None
    try:
        for _ in range(5):
            port = free_port()
            cmd = [exe, "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-m", "64"]
            if os.geteuid() == 0:
                cmd += ["-u", "root"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            end = time.monotonic() + 5
            while proc.poll() is None and time.monotonic() < end:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)
            if proc.poll() is None:
                break
            proc.wait()  # port taken meanwhile: try another
        assert proc is not None and proc.poll() is None, "memcached did not start"
        yield port
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
