"""Every FUSE request gets exactly one answer (DESIGN invariant 6), whatever the file
system raises: a request left unanswered blocks its caller for good, not even SIGKILL
frees it. A real mount of tests/fault_fs.py (memlend's protocol layer, operations that
fail on purpose); each read runs in a thread given a few seconds to be answered."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import force_unmount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2))")

HERE = Path(__file__).parent
ANSWER_WITHIN = 5.0  # seconds; an answered request takes milliseconds


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = tmp_path / "data"
    data.write_bytes(b"0123456789" * 1000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    with open(tmp_path / "faultfs.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fault_fs.py"), str(mnt), str(data)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "ready\n", (line, (tmp_path / "faultfs.log").read_text())
        yield mnt, proc
    finally:
        # Killing the server aborts the connection: a caller still waiting is freed.
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        force_unmount(mnt)


def read_in_thread(path: Path, proc: subprocess.Popen) -> int | bytes:
    """The errno of reading `path`, or the bytes read. Fails the test if the read is
    not answered in time (after killing the server, so that the thread is freed)."""
    result: list[int | bytes] = []

    def reader() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            result.append(e.errno or 0)
            return
        try:
            result.append(os.pread(fd, 4096, 0))
        except OSError as e:
            result.append(e.errno or 0)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # ENOTCONN (FLUSH) once a hung request made the test kill the server

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(ANSWER_WITHIN)
    if t.is_alive():
        proc.send_signal(signal.SIGKILL)
        t.join(10)
        pytest.fail(f"{path.name}: request not answered within {ANSWER_WITHIN} s")
    return result[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # ENOENT and ENODEV from the read itself: once mistaken for "the kernel gave up".
        ("read-ENOENT", errno.ENOENT),
        ("read-ENODEV", errno.ENODEV),
        ("read-EIO", errno.EIO),
        ("read-ENOSPC", errno.ENOSPC),
        ("read-RuntimeError", errno.EIO),
        # An errno the kernel refuses in a reply (>= 512) must become EIO, not silence.
        ("read-600", errno.EIO),
        ("open-600", errno.EIO),
        ("open-ENOENT", errno.ENOENT),
    ],
)
def test_a_failing_operation_is_answered(
    faultfs: tuple[Path, subprocess.Popen], name: str, expected: int
) -> None:
    mnt, proc = faultfs
    assert read_in_thread(mnt / name, proc) == expected
    # The server is still serving: a good read afterwards works.
    assert read_in_thread(mnt / "ok", proc) == b"0123456789" * 409 + b"012345"
