"""cgroup v2 and PSI in the lender's memory watcher, on file trees and fake event sources.

This host is cgroup v1 with PSI off, so nothing here has met a v2 kernel: the trees in
tests/fixtures/cgroup/ are written in the formats of the kernel's
Documentation/admin-guide/cgroup-v2.rst and accounting/psi.rst (memory.max "max" for
no limit, flat-keyed memory.stat and memory.events, "some/full avg10=... total=..."
pressure lines), and the epoll wake-up is driven by an eventfd standing in for the
kernel's POLLPRI. The real v1 path is tests/test_lender_cgroup.py.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from memlend.lender import cgroup
from memlend.lender.server import LenderServer, ServerConfig
from memlend.lender.store import META_PER_SLOT, Store
from memlend.lender.watcher import Watcher

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
V2_DIR = "system.slice/memlend-lend@7070.service"
MiB = 1 << 20


@pytest.fixture
def tree(tmp_path: Path):
    """tree(name) -> (proc_self_cgroup, sys/fs/cgroup root) of a private copy."""

    def copy(name: str) -> tuple[str, str]:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return str(dst / "proc_self_cgroup"), str(dst / "sys/fs/cgroup")

    return copy


def test_v2_cgroup_found_and_read(tree) -> None:
    proc, root = tree("v2")
    cg = cgroup.find(proc, root)
    assert cg == cgroup.MemoryCgroup(2, f"{root}/{V2_DIR}")
    assert cg.limit() == 2048 * MiB
    assert cg.usage() == 1792 * MiB
    assert cg.inactive_file() == 128 * MiB
    assert cg.available() == (2048 - 1792 + 128) * MiB
    assert cg.events() == {"low": 0, "high": 0, "max": 3, "oom": 1, "oom_kill": 1,
                           "oom_group_kill": 0}  # fmt: skip
    psi = cg.pressure()
    assert psi is not None
    assert psi["some"] == {"avg10": 1.53, "avg60": 0.42, "avg300": 0.09, "total": 2739120}
    assert psi["full"]["total"] == 1611325


def test_v2_without_a_limit(tree) -> None:
    cg = cgroup.find(*tree("v2-nolimit"))
    assert cg is not None and cg.version == 2
    assert cg.limit() is None and cg.available() is None


def test_hybrid_host_uses_the_v1_memory_controller(tree) -> None:
    proc, root = tree("hybrid")
    cg = cgroup.find(proc, root)
    assert cg == cgroup.MemoryCgroup(1, f"{root}/memory/lender")
    assert cg.available() == (384 - 256 + 16) * MiB  # total_inactive_file, not inactive_file
    assert cg.events() == {} and cg.pressure() is None


def test_root_cgroup_or_no_memory_controller_is_none(tree, tmp_path: Path) -> None:
    proc, root = tree("v2")
    Path(proc).write_text("0::/\n")
    assert cgroup.find(proc, root) is None
    Path(proc).write_text("0::/elsewhere.slice\n")  # no memory.max there: controller off
    assert cgroup.find(proc, root) is None
    assert cgroup.find(str(tmp_path / "missing"), root) is None


def test_pressure_events_on_a_v2_tree(tree) -> None:
    """memory.events is opened for POLLPRI; the PSI trigger is written to the cgroup's
    memory.pressure in the kernel's format ("some STALL WINDOW", NUL-terminated)."""
    proc, root = tree("v2")
    pressure = Path(root, V2_DIR, "memory.pressure")
    pressure.write_text("")
    ev = cgroup.pressure_events(64 * MiB, proc_cgroup=proc, root=root, proc_psi="/nonexistent")
    try:
        assert ev.names() == ["cgroup v2 memory.events",
                              "PSI trigger on the cgroup's memory.pressure"]  # fmt: skip
        assert all(mask & select.EPOLLPRI for _, mask in ev.fds())
        assert pressure.read_bytes() == b"some 100000 1000000\0"
        for fd, _ in ev.fds():
            ev.consume(fd)  # re-reads memory.events; nothing for PSI; never raises
    finally:
        ev.close()
    assert ev.fds() == []


def test_pressure_events_without_a_cgroup_use_system_psi(tree, tmp_path: Path) -> None:
    proc, root = tree("v2")
    Path(proc).write_text("0::/\n")
    psi = tmp_path / "pressure_memory"
    psi.write_text("")
    ev = cgroup.pressure_events(64 * MiB, proc_cgroup=proc, root=root, proc_psi=str(psi))
    try:
        assert ev.names() == [f"PSI trigger on {psi}"]
        assert psi.read_bytes() == b"some 100000 1000000\0"
    finally:
        ev.close()
    # PSI off (psi=0): the file cannot be opened; no source, no error.
    none = cgroup.pressure_events(64 * MiB, proc_cgroup=proc, root=root, proc_psi="/nonexistent")
    assert none.fds() == []


def test_real_host_psi_is_parsed_and_a_refused_trigger_is_quiet() -> None:
    """This host (psi=1 on its command line) reads /proc/pressure/memory, but its kernel
    answers EINVAL to every trigger written there: psi_trigger then gives None, no error.
    Where PSI is off, reading fails with EOPNOTSUPP."""
    try:
        with open(cgroup.PROC_PSI) as f:
            text = f.read()
    except OSError:
        pytest.skip("PSI is off or absent here")
    psi = cgroup.parse_pressure(text)
    assert set(psi) == {"some", "full"} and psi["some"]["total"] >= 0
    fd = cgroup.psi_trigger(cgroup.PROC_PSI)
    if fd is not None:
        os.close(fd)


def test_watcher_gives_back_when_the_v2_cgroup_fills(tree) -> None:
    proc, root = tree("v2")
    cg = cgroup.find(proc, root)
    assert cg is not None
    slot = 4096
    store = Store(64 * (slot + META_PER_SLOT), slot)
    try:
        reserve = 256 * MiB
        w = Watcher(store, lambda: cg.available() or 0, reserve)
        assert w.check() == 0 and store.allowed == store.slots  # 384 MiB available
        # A neighbour grows: 2000 of 2048 MiB in use, 128 MiB reclaimable -> 176 MiB free.
        Path(cg.path, "memory.current").write_text(f"{2000 * MiB}\n")
        w.check()
        assert w.last_available == 176 * MiB
        assert store.allowed < store.slots
    finally:
        store.close()


def test_server_acts_on_a_pressure_event_at_once(tree) -> None:
    """With a 30 s polling interval, the watcher still looks within a second of an
    event: an eventfd plays the kernel's POLLPRI on memory.pressure."""
    proc, root = tree("v2")
    cg = cgroup.find(proc, root)
    assert cg is not None
    slot = 4096
    store = Store(64 * (slot + META_PER_SLOT), slot)
    watcher = Watcher(store, lambda: cg.available() or 0, 256 * MiB)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    events = cgroup.PressureEvents([(efd, select.EPOLLIN, os.eventfd_read, "fake PSI")])
    sock = socket.create_server(("127.0.0.1", 0))
    srv = LenderServer(sock, store, b"k" * 32, ServerConfig(watch_interval=30.0), watcher,
                       watcher_events=events)  # fmt: skip
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while watcher.last_available is None:  # the first look, at start
            assert time.monotonic() < deadline
            time.sleep(0.01)
        Path(cg.path, "memory.current").write_text(f"{2000 * MiB}\n")
        time.sleep(0.3)
        assert store.allowed == store.slots  # no event yet: the next poll is 30 s away
        os.eventfd_write(efd, 1)
        deadline = time.monotonic() + 1.0
        while store.allowed == store.slots:
            assert time.monotonic() < deadline, "the event did not wake the watcher"
            time.sleep(0.01)
        assert watcher.last_available == 176 * MiB
    finally:
        srv.stop()
        t.join(5)
        store.close()
