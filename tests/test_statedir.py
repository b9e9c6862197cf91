"""The per-user log directory: made safely, never a link or someone else's directory.

The end-to-end case (two users mounting with the default directory, a planted
symlink refused) is in test_mount_nonroot.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memlend import statedir
from memlend.errors import UserError


def test_created_private(tmp_path: Path) -> None:
    d = statedir.private_dir(tmp_path / "memlend")
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


def test_own_open_directory_is_closed(tmp_path: Path) -> None:
    d = tmp_path / "memlend"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    statedir.private_dir(d)
    assert (d.stat().st_mode & 0o777) == 0o700


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "memlend").symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link"):
        statedir.private_dir(tmp_path / "memlend")


def test_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "memlend").write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        statedir.private_dir(tmp_path / "memlend")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_someone_elses_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "memlend"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UserError, match="belongs to uid 65534"):
        statedir.private_dir(d)


def test_where_each_user_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = 4242
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert statedir._candidates() == [Path(f"/tmp/memlend-{uid}")]
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    # Not ours (tmp_path is root's, or the tester's): skipped, never written into.
    assert statedir._candidates() == [Path(f"/tmp/memlend-{uid}")]
    monkeypatch.setattr(statedir, "_owned_dir", lambda p: p == str(state))
    assert statedir._candidates()[0] == state / "memlend"
    monkeypatch.setattr(statedir, "_owned_dir", lambda p: True)
    assert statedir._candidates()[0] == run / "memlend"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert statedir._candidates() == [Path("/run/memlend")]
