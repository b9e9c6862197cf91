"""`python -m memlend.bench.restart_probe` (issue 10, item 5): a worker killed with
requests in its hands, a new one on the same /dev/fuse descriptor. Its findings, kept
true: with the descriptor held, the journal replayed and FUSE_NOTIFY_RESEND, files open
before the kill keep working and the requests in flight are answered (a non-idempotent
one twice done); a file unlinked while open survives only if the kernel (passthrough)
or the supervisor (keep-fds) holds its inode; without the held descriptor the mount
dies (docs/reliability.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import is_mounted
from memlend.bench import restart_probe
from memlend.fs.passthrough import NO_FLUSH_FS
from memlend.fuse.mount import fs_type

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts as root")


@pytest.mark.parametrize("tier", ["memlend", "kernel"])
def test_a_new_worker_on_the_held_descriptor_serves_the_files_open_before(
    tmp_path: Path, tier: str
) -> None:
    out = restart_probe.probe("standby", str(tmp_path), tier)
    assert not is_mounted(tmp_path / "mnt")
    assert not out.aborted  # nothing was left hanging
    assert out.in_flight["read"] == "answered", out
    # Done by the dead worker, done again after the resend: the append twice, the
    # mkdir answered EEXIST. Only idempotent requests survive a crash unharmed.
    assert out.in_flight["write"].startswith("answered; the backing file grew by 200"), out
    assert out.in_flight["mkdir"] == "error EEXIST", out
    assert len(out.worker2["replies with bit 63 (not counting READ)"]) == 2, out
    assert out.times_ms["kill to in-flight read answered"] < 5000, out
    failed = {k for k, v in out.checks.items() if v != "ok"}
    if tier == "memlend":
        # The unlinked file's inode died with the worker's descriptor of it. Its close
        # fails too (ESTALE from the FLUSH), unless the backing file system has no
        # flush operation: then the handle was opened FOPEN_NOFLUSH and close sends none.
        lost = {"read, unlinked file opened before"}
        if fs_type(os.stat(tmp_path).st_dev) not in NO_FLUSH_FS:
            lost.add("close u (FLUSH, RELEASE)")
        assert failed == lost, out
        assert out.worker2["files_reopened"] == 4, out
        assert out.worker2["handles_lost_errors"] == ["ESTALE"], out
    else:
        # Opened in passthrough, the unlinked file is held by the kernel itself (its
        # backing id lives in the connection): it survives, and so does its handle.
        assert not failed, out
        assert out.worker2["files_reopened"] == 5 and out.worker2["passthrough_handles"] == 2


def test_descriptors_kept_by_the_supervisor_save_a_file_unlinked_while_open(
    tmp_path: Path,
) -> None:
    out = restart_probe.probe("keep-fds", str(tmp_path))
    assert not is_mounted(tmp_path / "mnt")
    assert out.in_flight["read"] == "answered", out
    assert all(v == "ok" for v in out.checks.values()), out.checks
    assert out.worker2["files_kept"] == 5 and out.worker2["handles_lost"] == 0, out


def test_without_the_held_descriptor_the_mount_dies_with_its_worker(tmp_path: Path) -> None:
    out = restart_probe.probe("no-hold", str(tmp_path))
    assert not is_mounted(tmp_path / "mnt")
    assert set(out.in_flight.values()) >= {"error ECONNABORTED"}, out
    assert out.checks["read, file opened before (fh reopened)"] == "error ENOTCONN", out
