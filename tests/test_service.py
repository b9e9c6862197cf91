"""systemd integration: readiness on a fake $NOTIFY_SOCKET, journal and rotating logs,
and the unit files in systemd/ (their own ExecStart lines run for real)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _wait_gone, force_unmount, free_port, is_mounted, memlend
from memlend import service
from memlend.remote.client import LenderClient
from memlend.remote.secret import auth_key, load_secret

UNITS = Path(__file__).resolve().parent.parent / "systemd"
VENV_MEMLEND = str(Path(sys.executable).parent / "memlend")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A unix datagram socket standing in for systemd's; its path in $NOTIFY_SOCKET."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(30)
    try:
        yield s
    finally:
        s.close()


def env_for(sock: socket.socket, **extra: str) -> dict[str, str]:
    return {**os.environ, "NOTIFY_SOCKET": sock.getsockname(), **extra}


def unit_exec_start(name: str) -> list[str]:
    """The unit's ExecStart, with the venv's memlend for /usr/local/bin/memlend."""
    for line in (UNITS / name).read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
            assert argv[0] == "/usr/local/bin/memlend"
            return [VENV_MEMLEND, *argv[1:]]
    raise AssertionError(f"{name} has no ExecStart")


def test_notify_sends_one_datagram(notify_socket: socket.socket, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    assert service.notify("READY=1\nSTATUS=up")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_abstract_socket_and_absent(monkeypatch) -> None:
    name = f"memlend-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not service.notify("READY=1")  # not run by systemd: nothing to do
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    assert not service.notify("READY=1")  # a broken variable is not fatal


def test_mount_unit_exec_start_notifies_once_mounted(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """The example unit's ExecStart (foreground): READY=1 comes once the mount serves;
    SIGTERM (systemctl stop) unmounts and ends it."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "f").write_text("ready\n")
    argv = [
        str(backing) if a == "/srv/data" else str(mnt) if a == "/mnt/data" else a
        for a in unit_exec_start("memlend-mount-example.service")
    ]
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, env=env_for(notify_socket), stderr=err)
    try:
        assert notify_socket.recv(4096) == b"READY=1"
        assert is_mounted(mnt)  # already up when READY=1 arrived
        assert (mnt / "f").read_text() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_background_mount_hands_systemd_the_daemon_pid(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Without --foreground the command returns once mounted; it tells systemd the
    daemon's pid (MAINPID) with READY=1."""
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    cmd = [VENV_MEMLEND, "mount", str(backing), str(mnt), "--log-file", str(tmp_path / "log")]
    pid = None
    try:
        subprocess.run(cmd, env=env_for(notify_socket), check=True, timeout=60)
        pid = json.loads(memlend("stats", str(mnt), "--json").stdout)["pid"]
        assert notify_socket.recv(4096) == f"READY=1\nMAINPID={pid}".encode()
        memlend("umount", str(mnt))
    finally:
        force_unmount(mnt)
        if pid is not None and not _wait_gone(pid):
            os.kill(pid, 9)


def test_lender_unit_notifies_when_listening_and_logs_to_the_journal(
    tmp_path: Path, notify_socket: socket.socket, secret_file: Path
) -> None:
    """memlend-lend@PORT's ExecStart with a config file for the rest: READY=1 once it
    listens (a client authenticates at once), and stderr in journald's format when
    stderr is the journal ($JOURNAL_STREAM names it)."""
    port = free_port()
    cfg = tmp_path / "memlend.toml"
    cfg.write_text(f'[lend]\nmemory = "32M"\nreserve = "64M"\nsecret_file = "{secret_file}"\n')
    argv = [a.replace("%i", str(port)) for a in unit_exec_start("memlend-lend@.service")] + [
        "--config",
        str(cfg),
    ]
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        st = os.fstat(err.fileno())
        env = env_for(notify_socket, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen(argv, env=env, stderr=err, stdout=subprocess.DEVNULL)
    try:
        assert notify_socket.recv(4096) == b"READY=1"
        secret = load_secret(str(secret_file))
        with LenderClient(("127.0.0.1", port), auth_key(secret), b"t" * 16) as c:
            assert c.stats()["memory_cap"] == 32 << 20
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.read_text().splitlines()
    assert lines and all(line.startswith("<") for line in lines), lines
    assert any(line.startswith("<6>memlend.lender: lending 32 MiB") for line in lines), lines


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    names = {"memlend-lend@.service": "memlend-lend@7070.service"}
    paths = []
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text().replace("/usr/local/bin/memlend", VENV_MEMLEND)
        path = tmp_path / names.get(unit.name, unit.name)
        path.write_text(text)
        paths.append(str(path))
    assert len(paths) == 3
    proc = subprocess.run([exe, "verify", "--man=no", *paths], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_log_file_rotates_and_stays_private(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    log_file = tmp_path / "memlend.log"
    old_umask = os.umask(0)  # as in the mount daemon
    try:
        handler = service.setup_logging(str(log_file), False, max_bytes=2000)
        for i in range(100):
            logging.getLogger("memlend.test").info("line %d %s", i, "x" * 50)
        handler.close()
    finally:
        os.umask(old_umask)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["memlend.log", "memlend.log.1", "memlend.log.2", "memlend.log.3"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2000
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert "line 99" in log_file.read_text()


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path, monkeypatch) -> None:
    """systemd may hand JOURNAL_STREAM down to a child whose stderr is elsewhere."""
    other = tmp_path / "other"
    other.write_text("")
    st = other.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert not service.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not service.stderr_is_journal()
