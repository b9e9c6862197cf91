"""fstab lines of type fuse.memlend, through the real mount.fuse3 helper and mount(8).

mount(8) runs `mount.fuse SRC MNT -o OPTS -t fuse.memlend`, which runs
`memlend SRC MNT -o OPTS` through /bin/sh. mount(8) clears PATH for its helpers, so
the mount(8) test runs in a private mount namespace (unshare -m) where the venv's bin
is bind-mounted over /usr/local/bin: the host's /usr is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MEMLEND, Lender, _wait_gone, force_unmount, is_mounted, memlend

VENV_BIN = str(Path(sys.executable).parent)
MOUNT_FUSE = shutil.which("mount.fuse3") or "/sbin/mount.fuse3"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root"),
    pytest.mark.skipif(not os.path.exists(MOUNT_FUSE), reason="mount.fuse3 is not installed"),
]


def test_mount_fuse3_with_an_fstab_line_mounts_and_serves_reads(
    tmp_path: Path,
    lender_factory: Callable[..., Lender],
    secret_file: Path,
    seal_key_file: Path,
    local_tier: str,
) -> None:
    """The issue's fstab options (a lender, a secret file, _netdev) plus what mount(8),
    mount.fuse3 and systemd add; the mount reads through the lender."""
    lender = lender_factory()
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    data = os.urandom(3 << 20)
    (backing / "f").write_bytes(data)
    opts = [
        "rw", f"local_tier={local_tier}", "cache_size=4M", "block-size=16K",
        f"lender={lender.url}", "lender=memcached://127.0.0.1:9", f"secret_file={secret_file}",
        f"seal_key_file={seal_key_file}", f"log_file={tmp_path / 'mount.log'}",
        "_netdev", "nofail", "defaults", "x-systemd.requires=network-online.target",
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    cmd = [MOUNT_FUSE, str(backing), str(mnt), "-t", "fuse.memlend", "-o", ",".join(opts)]
    pid = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(mnt)
        stats = json.loads(memlend("stats", str(mnt), "--json").stdout)
        pid = stats["pid"]
        assert stats["local_tier"] == local_tier
        assert stats["block_size"] == 16 << 10
        urls = {ld["url"]: ld["state"] for ld in stats["lenders"]}
        assert list(urls) == [lender.url, "memcached://127.0.0.1:9"]
        assert urls[lender.url] == "active"  # reached and authenticated with secret_file
        assert (mnt / "f").read_bytes() == data
        memlend("umount", str(mnt))
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
        if pid is not None and not _wait_gone(pid):
            os.kill(pid, 9)


def test_mount_t_fuse_memlend_from_a_temporary_fstab(tmp_path: Path) -> None:
    """`mount -T FSTAB MNT` (util-linux picks mount.fuse for fuse.memlend) in a private
    mount namespace; reads the file, reports the daemon's pid, unmounts."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "f").write_text("from fstab\n")
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{backing} {mnt} fuse.memlend cache_size=4M,log_file={tmp_path / 'm.log'},"
        "_netdev,nofail,x-systemd.automount 0 0\n"
    )
    script = (
        f"trap 'umount -l {mnt} 2>/dev/null' EXIT; "  # whatever fails, nothing stays mounted
        f"mount --bind {VENV_BIN} /usr/local/bin && mount -T {fstab} {mnt} && "
        f"cat {mnt}/f && memlend stats {mnt} --json && umount {mnt}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, _, rest = proc.stdout.partition("\n")
    assert first == "from fstab"
    pid = json.loads(rest)["pid"]
    # The namespace is gone with its last process: the daemon ends at the unmount.
    if not _wait_gone(pid):
        os.kill(pid, 9)
        pytest.fail("the daemon outlived its unmount")
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("cache_size=12XB", ("--cache-size", "12XB")),
        ("cache_sise=4G", ("unknown mount option", "cache_sise")),
        ("ro", ("read-only",)),
        ("lender", ("lender needs a value",)),
        ("writeback_cache=maybe", ("yes/no",)),
    ],
)
def test_bad_mount_options_are_one_line(tmp_path: Path, options: str, words: tuple) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    proc = subprocess.run(
        [*MEMLEND, str(backing), str(mnt), "-o", options],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert proc.returncode == 2
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        for w in words:
            assert w in proc.stderr
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_every_mount_flag_has_an_o_form() -> None:
    """Each visible `memlend mount` flag, spelt with _ and with -, becomes that flag."""
    import argparse

    from memlend.cli import _parse, _subcommands, build_parser
    from memlend.mount_options import expand

    mount = _subcommands(build_parser())["mount"]
    flags = [a for a in mount._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    flags = [a for a in flags if any(s.startswith("--") for s in a.option_strings)]
    assert len(flags) >= 16
    for action in flags:
        flag = next(s for s in action.option_strings if s.startswith("--"))
        for name in (flag[2:], flag[2:].replace("-", "_")):
            if action.nargs == 0:
                assert expand(name, mount) == [flag]
            else:
                assert expand(f"{name}=v", mount) == [flag, "v"]
    opts = (
        "cache-size=2M,lender=memlend://h:1,lender=memcached://g:2,writeback_cache,"
        "foreground=no,remote_deadline=3,local-tier=memlend,"
        "rw,dev,suid,defaults,_netdev,nofail,noauto,x-systemd.idle-timeout=1"
    )
    args = _parse(["/b", "/m", "-o", opts])
    assert args.command == "mount" and (args.backing, args.mountpoint) == ("/b", "/m")
    assert args.cache_size == 2 << 20 and args.local_tier == "memlend"
    assert args.lender == ["memlend://h:1", "memcached://g:2"]
    assert args.writeback_cache and not args.foreground and args.remote_deadline == 3.0
    # -o after `memlend mount` too, and -oOPTS glued
    args = _parse(["mount", "/b", "/m", "-opolicy=lru", "--threads", "3"])
    assert (args.policy, args.threads) == ("lru", 3)
