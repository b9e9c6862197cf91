"""Shared fixtures: real memlend mounts, always unmounted in teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """mount_factory(*options, backing=None) -> Mount; every mount is undone at teardown."""
    made: list[Mount] = []

    def make(*options: str, backing: Path | None = None) -> Mount:
        n = len(made)
        b = backing or tmp_path / f"backing{n}"
        b.mkdir(exist_ok=True)
        m = tmp_path / f"mnt{n}"
        m.mkdir()
        memlend("mount", str(b), str(m), *options)
        pid = json.loads(memlend("stats", str(m), "--json").stdout)["pid"]
        made.append(Mount(b, m, pid))
        return made[-1]

    try:
        yield make
    finally:
        for mt in made:
            subprocess.run(
                [*MEMLEND, "umount", str(mt.mnt)], capture_output=True, check=False, timeout=30
            )
            force_unmount(mt.mnt)
            if not _wait_gone(mt.pid):
                os.kill(mt.pid, 9)


@pytest.fixture
def mount(mount_factory: Callable[..., Mount]) -> Mount:
    """One mount with a small cache (1 MiB blocks would hide block-boundary bugs)."""
    return mount_factory("--cache-size", "8M", "--block-size", "4K")
