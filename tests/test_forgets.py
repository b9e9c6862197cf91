"""FORGETs queued in C and served in batches (memlend._native next_request,
fuse/forgets.py), against a SOCK_SEQPACKET pair standing in for /dev/fuse (one
request per read, as the kernel's device).

A FORGET must reach the daemon exactly once, whole, and never as a request: no
reply is ever written for one. Anything else, a malformed batch included, goes to
Python as it came. The mount suites run it for real (every unlink and rm -r there
ends in FORGETs; tests/test_mount_inodes.py checks the inode table empties)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from memlend import native
from memlend.fuse import wire
from memlend.fuse.forgets import WINDOW, ForgetQueue
from memlend.fuse.wire import Op

lib = native.lib
pytestmark = pytest.mark.skipif(lib is None, reason=native.description)
H = wire.IN_HEADER


def forget(nodeid: int, nlookup: int, unique: int = 9) -> bytes:
    body = wire.FORGET_IN.pack(nlookup)
    return H.pack(H.size + len(body), Op.FORGET, unique, nodeid, 0, 0, 0, 0, 0) + body


def batch(pairs: list[tuple[int, int]], count: int | None = None) -> bytes:
    body = wire.BATCH_FORGET_IN.pack(len(pairs) if count is None else count, 0)
    body += b"".join(wire.FORGET_ONE.pack(n, k) for n, k in pairs)
    return H.pack(H.size + len(body), Op.BATCH_FORGET, 10, 0, 0, 0, 0, 0, 0) + body


def getattr_request(nodeid: int) -> bytes:
    body = wire.GETATTR_IN.pack(0, 0, 0)
    return H.pack(H.size + len(body), Op.GETATTR, 11, nodeid, 0, 0, 0, 0, 0) + body


def flat(data: bytes) -> list[int]:
    return list(memoryview(data).cast("Q"))


@contextlib.contextmanager
def fake_fuse() -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """(kernel side, daemon side, eventfd), forgets of the daemon side taken in C."""
    kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        assert lib.forget_setup(daemon.fileno(), efd)
        yield kernel, daemon, efd
    finally:
        lib.forget_setup(daemon.fileno(), -1)
        lib.forgets_take()
        os.close(efd)
        kernel.close()
        daemon.close()


def test_forgets_are_queued_and_the_next_request_returned() -> None:
    with fake_fuse() as (kernel, daemon, efd):
        kernel.send(forget(5, 2))
        kernel.send(batch([(6, 1), (7, 3)]))
        kernel.send(forget(8, 1))
        kernel.send(getattr_request(4))
        buf = bytearray(8192)
        n = lib.next_request(daemon.fileno(), buf)
        assert bytes(buf[:n]) == getattr_request(4)
        assert flat(lib.forgets_take()) == [5, 2, 6, 1, 7, 3, 8, 1]
        assert os.eventfd_read(efd) == 1  # one wake-up for the queue filling, not four
        assert lib.forgets_take() == b""
        kernel.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing was ever answered
            kernel.recv(100)


def test_a_malformed_batch_and_other_mounts_forgets_go_to_python() -> None:
    with fake_fuse() as (kernel, daemon, _):
        buf = bytearray(8192)
        bad = batch([(6, 1)], count=3)  # says 3, carries 1
        kernel.send(bad)
        n = lib.next_request(daemon.fileno(), buf)
        assert bytes(buf[:n]) == bad and lib.forgets_take() == b""
        k2, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with k2, d2:
            assert not lib.forget_setup(d2.fileno(), 99)  # one queue per process
            k2.send(forget(5, 1))
            n = lib.next_request(d2.fileno(), buf)
            assert bytes(buf[:n]) == forget(5, 1) and lib.forgets_take() == b""


def test_next_request_says_unmounted_and_releases_the_gil() -> None:
    with fake_fuse() as (kernel, daemon, _):
        ticks = []
        stop = threading.Event()

        def tick() -> None:
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        t = threading.Thread(target=tick)
        t.start()
        threading.Timer(0.2, kernel.shutdown, (socket.SHUT_RDWR,)).start()
        assert lib.next_request(daemon.fileno(), bytearray(8192)) == -1  # 0 bytes: gone
        stop.set()
        t.join()
        assert len(ticks) > 20  # the other thread ran while next_request waited


def test_the_queue_serves_batches_to_forget_many_and_drains_on_close() -> None:
    kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    got: list[list[int]] = []
    with kernel, daemon:
        q = ForgetQueue(lib, daemon.fileno(), lambda pairs: got.append(list(pairs)))
        assert q.active
        reader = threading.Thread(target=lib.next_request, args=(daemon.fileno(), bytearray(8192)))
        reader.start()
        for i in range(1, 101):
            kernel.send(forget(i, 1))
        deadline = time.monotonic() + 5
        while sum(len(b) for b in got) < 200 and time.monotonic() < deadline:
            time.sleep(WINDOW)
        assert [x for b in got for x in b] == [v for i in range(1, 101) for v in (i, 1)]
        assert len(got) < 100  # batched, not one by one
        kernel.send(getattr_request(1))  # ends the reader
        reader.join()
        q.close()
        assert not q.active and lib.forget_setup(daemon.fileno(), -1) is True
