"""The testbed's cgroup v2 backend, on a fake tree and on a real (controller-less) mount.

This host is cgroup v1, so no v2 group here has memory, io or cpuset. The fake tree
stands in for /sys/fs/cgroup as the kernel's Documentation/admin-guide/cgroup-v2.rst
lays it out (the samples below are in its formats); a fake mkdir creates a group's
interface files as cgroupfs would. The real test mounts the cgroup2 hierarchy (the
controllers of /proc/cgroups with hierarchy 0 live there) in a temporary directory and
exercises what needs no controller: groups, moving a process in, cgroup.kill, rmdir.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memlend.bench import testbed as tb
from memlend.errors import UserError

MiB = 1 << 20
TAG = f"{tb.PREFIX}-999999999"  # above any pid_max: no real run has it

# memory.stat of a v2 group (cgroup-v2.rst, "memory.stat"; Linux 6.x key order)
MEMORY_STAT = """\
anon 52690944
file 148897792
kernel 3346432
kernel_stack 212992
pagetables 520192
sec_pagetables 0
percpu 7200
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 1576960
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 52547584
active_anon 143360
inactive_file 120455168
active_file 28442624
unevictable 0
slab_reclaimable 2104368
slab_unreclaimable 422616
slab 2526984
workingset_refault_anon 0
workingset_refault_file 31
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 0
pgscan 5432
pgsteal 5410
pgscan_kswapd 0
pgscan_direct 5432
pgsteal_kswapd 0
pgsteal_direct 5410
pgfault 39817
pgmajfault 12
pgrefill 0
pgactivate 6961
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
thp_fault_alloc 0
thp_collapse_alloc 0
"""
# memory.events (flat keyed; oom_group_kill since 5.17)
MEMORY_EVENTS = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 2\noom_group_kill 0\n"
# io.stat (nested keyed: one line per device the group issued I/O to)
IO_STAT = (
    "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
    "254:0 rbytes=90177536 wbytes=4096 rios=22016 wios=1 dbytes=0 dios=0\n"
)


def _fake_kernel_mkdir(path: os.PathLike, mode: int = 0o777) -> None:
    """mkdir in cgroupfs: the new group comes with its interface files."""
    os.mkdir(path, mode)
    d = Path(path)
    defaults = {
        "cgroup.controllers": "",
        "cgroup.subtree_control": "",
        "cgroup.procs": "",
        "memory.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.peak": "0\n",
        "memory.current": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.stat": "anon 0\nfile 0\n",
        "io.max": "",
        "io.stat": "",
        "cpuset.cpus": "\n",
        "cpuset.mems": "\n",
    }
    for name, text in defaults.items():
        (d / name).write_text(text)


@pytest.fixture
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[Path]]]:
    """(root, rmdirs): a fake unified /sys/fs/cgroup as CGROOT, and the directories
    removed, in order (rmdir in cgroupfs removes a group with its interface files)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (root / "cgroup.procs").write_text("1\n")
    (root / "cpuset.cpus.effective").write_text("0-1\n")
    (root / "cpuset.mems.effective").write_text("0\n")
    removed: list[Path] = []

    def rmdir(path: os.PathLike) -> None:
        p = Path(path)
        if any(c.is_dir() for c in p.iterdir()):
            raise OSError(16, "Device or resource busy", str(p))  # a child group left
        for f in p.iterdir():
            f.unlink()
        os.rmdir(p)
        removed.append(p)

    monkeypatch.setattr(tb, "CGROOT", root)
    monkeypatch.setattr(tb, "_mkdir", _fake_kernel_mkdir)
    monkeypatch.setattr(tb, "_rmdir", rmdir)
    yield root, removed


def test_version_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "CGROOT", tmp_path)
    assert tb.cgroup_version() == 1  # neither: check_environment says what is missing
    (tmp_path / "unified").mkdir()  # hybrid: v1 controllers, an empty v2 tree beside
    for ctl in tb.V1_CONTROLLERS:
        (tmp_path / ctl).mkdir()
        (tmp_path / ctl / "cgroup.procs").write_text("")
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    assert tb.cgroup_version() == 1
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert tb.cgroup_version() == 1  # v1 controllers mounted: they are the ones used
    (tmp_path / "blkio" / "cgroup.procs").unlink()
    assert tb.cgroup_version() == 2


def test_check_environment_names_the_missing_v2_controller(
    fake_v2: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = fake_v2
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (root / "cgroup.controllers").write_text("cpuset cpu memory pids\n")  # no io
    with pytest.raises(UserError) as e:
        tb.check_environment("memlend bench")
    msg = str(e.value)
    assert msg == f"memlend bench needs the io controller in {root}/cgroup.controllers"
    assert "\n" not in msg


def test_check_environment_names_the_missing_v1_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tb, "CGROOT", tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cgroup.procs").write_text("")
    with pytest.raises(UserError, match=r"needs the cgroup v1 blkio controller at .*/blkio"):
        tb.check_environment()


def test_groups_limits_and_throttle_written_as_v2_wants(
    fake_v2: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, _ = fake_v2
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=TAG)
    assert bed.cgroup == 2
    client = bed.group("client", memory=192 * MiB, cpu=tb.CLIENT_CPU, blkio=True)
    lender = bed.group("lender0", memory=None, cpu=tb.LENDER_CPU, blkio=False)
    parent = root / TAG
    assert isinstance(client, tb.Group2)
    assert client.dir == parent / f"{TAG}-client-1"
    assert client.controllers == {"memory", "io", "cpuset"}
    # only what the root did not enable yet, then all three for the run's groups
    assert (root / "cgroup.subtree_control").read_text() == "+io +cpuset"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +io +cpuset"
    assert (client.dir / "cpuset.cpus").read_text() == "0"
    assert (client.dir / "cpuset.mems").read_text() == "0"
    assert (client.dir / "memory.max").read_text() == str(192 * MiB)
    assert (client.dir / "memory.oom.group").read_text() == "0\n"  # untouched
    assert (lender.dir / "cpuset.cpus").read_text() == "1"
    assert (lender.dir / "memory.max").read_text() == "max\n"  # no limit: untouched
    bed.throttle(client, 1000, 100_000_000)
    assert (client.dir / "io.max").read_text() == "254:0 riops=1000 rbps=100000000"
    bed.throttle(client, None, None)
    assert (client.dir / "io.max").read_text() == "254:0 riops=max rbps=max"
    (client.dir / "io.max").unlink()  # a kernel without CONFIG_BLK_DEV_THROTTLING
    with pytest.raises(UserError, match="io throttling"):
        bed.throttle(client, 1000, None)


def test_controllers_the_root_lacks_are_skipped(
    fake_v2: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, _ = fake_v2
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=TAG)
    g = bed.group("client", memory=64 * MiB, cpu=0, blkio=True)
    assert isinstance(g, tb.Group2) and g.controllers == {"memory"}
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory pids\n"  # no write
    assert (g.dir / "cpuset.cpus").read_text() == "\n"
    assert (g.dir / "memory.max").read_text() == str(64 * MiB)
    bed.throttle(g, 1000, None)
    assert (g.dir / "io.max").read_text() == ""


def test_counters_parsed_from_v2_files(fake_v2: tuple[Path, list[Path]], tmp_path: Path) -> None:
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=TAG)
    g = bed.group("client", memory=192 * MiB, cpu=0, blkio=True)
    assert isinstance(g, tb.Group2)
    (g.dir / "io.stat").write_text(IO_STAT)
    (g.dir / "memory.events").write_text(MEMORY_EVENTS)
    (g.dir / "memory.stat").write_text(MEMORY_STAT)
    (g.dir / "memory.current").write_text("205103104\n")
    assert g.io_serviced("254:0") == (22016, 90177536)
    assert g.io_serviced("8:16") == (192, 1459200)
    assert g.io_serviced("8:0") == (0, 0)  # no I/O to that disk yet: no line
    assert g.oom_kills() == 2
    assert g.memory_stat()["inactive_file"] == 120455168
    assert g.cache_bytes() == 148897792  # v2 `file` is v1's `cache`
    assert g.rss_bytes() == 52690944  # v2 `anon` is v1's `rss`
    assert g.usage() == 205103104
    assert g.limit() == 192 * MiB
    (g.dir / "memory.max").write_text("max\n")
    assert g.limit() is None


def test_peak_is_reset_and_read_through_one_fd(
    fake_v2: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=TAG)
    g = bed.group("client", memory=192 * MiB, cpu=0, blkio=True)
    assert isinstance(g, tb.Group2)
    (g.dir / "memory.peak").write_text("999999999\n")
    assert g.peak() == 999999999  # never reset: the group's lifetime peak
    g.reset_peak()
    assert (g.dir / "memory.peak").read_text().startswith("reset")
    with open(g.dir / "memory.peak", "r+") as f:  # the kernel's per-fd peak, same inode
        f.write("123456789\n")
    assert g.peak() == 123456789
    (g.dir / "memory.peak").unlink()  # before Linux 5.19
    g._close_peak()
    assert g.peak() is None
    bed.close()


def test_leftovers_and_removal_children_first(
    fake_v2: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, removed = fake_v2
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=TAG)
    client = bed.group("client", memory=192 * MiB, cpu=0, blkio=True)
    bed.group("lender0", memory=256 * MiB, cpu=1, blkio=False)
    (root / f"{tb.PREFIX}-9999999990").mkdir()  # another run's: not this one's
    pid = int(TAG.rsplit("-", 1)[1])
    found = tb.leftovers(pid)
    assert str(root / TAG) in found and str(client.dirs()[0]) in found
    assert not any("9999999990" in x for x in found)
    names = [g.name for g in tb.leftover_groups(TAG)]
    assert sorted(names[:2]) == [f"{TAG}-client-1", f"{TAG}-lender0-2"] and names[2:] == [TAG]
    bed.drop_group(client)
    assert removed == [client.dirs()[0]]
    bed.close()  # the lender's group, then the parent
    assert [p.name for p in removed] == [f"{TAG}-client-1", f"{TAG}-lender0-2", TAG]
    assert tb.leftover_groups(TAG) == [] and tb.leftovers(pid) == []
    assert (root / f"{tb.PREFIX}-9999999990").exists()


# ---- a real cgroup2 hierarchy, without memory/io/cpuset -----------------------------


@pytest.fixture
def real_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The cgroup2 hierarchy mounted at a temporary directory, as CGROOT; unmounted
    and removed afterwards, with any group of this test still there."""
    if os.geteuid() != 0:
        pytest.skip("mounting cgroup2 needs root")
    mnt = tmp_path / "cg2"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], capture_output=True)
    if r.returncode:
        mnt.rmdir()
        pytest.skip(f"cannot mount cgroup2: {r.stderr.decode().strip()}")
    try:
        monkeypatch.setattr(tb, "CGROOT", mnt)
        yield mnt
    finally:
        mine = f"{tb.PREFIX}-{os.getpid()}"
        for parent in mnt.glob(f"{mine}*"):  # only if the test failed half-way
            for child in parent.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        (child / "cgroup.kill").write_text("1")
                    time.sleep(0.2)
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def test_real_cgroup2_groups_processes_kill_and_rmdir(real_v2: Path, tmp_path: Path) -> None:
    tag = f"{tb.PREFIX}-{os.getpid()}"
    assert tb.cgroup_version() == 2
    have = set((real_v2 / "cgroup.controllers").read_text().split())
    bed = tb.Testbed(tmp_path / "work", disk="254:0", tag=tag)
    (tmp_path / "work").mkdir()
    try:
        g = bed.group("client", memory=64 * MiB, cpu=0, blkio=True)
        assert isinstance(g, tb.Group2)
        assert g.controllers == have & {"memory", "io", "cpuset"}
        if g.controllers:
            pytest.skip(f"this host's cgroup2 has {sorted(g.controllers)}: not this test")
        assert g.dir.is_dir() and (g.dir / "cgroup.procs").exists()
        bed.throttle(g, 1000, None)  # io absent: nothing to write
        log = tmp_path / "work" / "p.log"
        sleeper = bed.spawn(["sleep", "60"], g, log=log)
        # ignores SIGTERM (SIG_IGN survives exec): only cgroup.kill's SIGKILL ends it
        stubborn = bed.spawn(["sh", "-c", "trap '' TERM; exec sleep 60"], g, log=log)
        assert g.pids() == {sleeper.pid, stubborn.pid}
        end = time.monotonic() + 10
        while Path(f"/proc/{stubborn.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < end, "sh did not exec sleep"  # the trap is set
            time.sleep(0.01)
        cg_line = Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines()
        assert f"0::/{tag}/{tag}-client-1" in cg_line
        g.kill_all(timeout=0.5)
        assert g.pids() == set()
        assert sleeper.wait(5) == -15 and stubborn.wait(5) == -9
        assert str(g.dir) in tb.leftovers(os.getpid())
    finally:
        bed.close()
    assert not (real_v2 / tag).exists()
    assert tb.leftover_groups(tag) == [] and tb.leftovers(os.getpid()) == []
