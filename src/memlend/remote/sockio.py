"""The socket plumbing both remote clients share (memlend lenders, memcached).

A non-blocking TCP connection with deadlines on every wait, and adaptive
busy-polling: after sending a request the client spins on poll(0) for up to
`busy_poll_us` before sleeping in poll(), which removes the cross-CPU wake-up
that dominates a round trip here (DESIGN.md: 134 µs blocking against 16 µs
spinning). Spins that rarely catch a reply are paused for 256 calls: they only
burn CPU, or delay a peer on the same CPU. Only a thread that waits alone spins
(see _waiting).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Self


class RemoteError(Exception):
    """The remote could not answer (network, timeout, protocol); treat as a miss."""


class RemoteAuthError(RemoteError):
    """The handshake failed: the lender and this client have different secrets."""


class RemoteTimeout(RemoteError):
    """The remote did not answer before the deadline."""


# Seconds past a deadline that a poll() timer does not overshoot by itself (its slack
# is 50 µs): a wait that ends later than this was not running (memlend._native too).
CLIENT_LATE = 0.001

# recv(n) allocates n bytes first: above glibc's mmap threshold (128 KiB) every call
# maps and unmaps a fresh buffer. Measured on loopback TCP, a 48-byte recv cost 24 µs
# with n = 1 MiB and 4 µs with n = 64 KiB (docs/benchmarks.md).
RECV_SIZE = 64 << 10

# Threads of this process waiting for a reply right now. Only a lone waiter spins: a
# spinning thread takes the GIL back after every poll(0), and a second thread whose
# reply has come can then wait up to the interpreter's switch interval (5 ms) for it,
# past the remote deadline. Measured: 16 readers with every waiter spinning timed out
# 228 times in 8 s and sent half their reads to the disk (docs/benchmarks.md).
_waiting = [0]
_waiting_lock = threading.Lock()


class SpinSocket:
    what = "lender"  # in messages: "lender 10.0.0.2:7070 timed out"

    def __init__(self, address: tuple[str, int], timeout: float, busy_poll_us: int) -> None:
        self.address = address
        self.timeout = timeout
        self.busy_poll_ns = busy_poll_us * 1000
        self._spin_score = 1.0  # moving average of "reply arrived while spinning"
        self._spin_pause = 0  # calls left without spinning
        self._sock: socket.socket | None = None
        # The last wait ended more than CLIENT_LATE past its deadline: this thread was
        # descheduled (RemoteTier counts it as remote_client_delays).
        self.late = False

    def _connect(self) -> None:
        """Connect (blocking, within `timeout`), then switch to non-blocking; OSError."""
        self._sock = socket.create_connection(self.address, timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setblocking(False)
        # One poll object per connection: spinning on poll(0) costs 0.4 µs a look,
        # a recv() that raises BlockingIOError 1.2 µs.
        self._poll_in = select.poll()
        self._poll_in.register(self._sock, select.POLLIN)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise RemoteError("connection closed")
        return self._sock

    def _timed_out(self) -> RemoteTimeout:
        return RemoteTimeout(f"{self.what} {self.address[0]}:{self.address[1]} timed out")

    def _send(self, data: bytes, deadline: float | None = None) -> None:
        sock = self._require()
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):  # the send buffer is full: wait for room, within the deadline
            self._send_rest(sock, memoryview(data)[n:], deadline)

    def _send_rest(self, sock: socket.socket, view: memoryview, deadline: float | None) -> None:
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out()
            poller.poll(left * 1000)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass

    def _spin(self) -> bool:
        """Should the next wait for a reply spin first?"""
        if not self.busy_poll_ns:
            return False
        if self._spin_pause:
            self._spin_pause -= 1
            return False
        return True

    def _spin_caught(self, caught: bool) -> None:
        self._spin_score = 0.9 * self._spin_score + (0.1 if caught else 0.0)
        if self._spin_score < 0.3:
            # Spins that rarely catch a reply only burn CPU: pause them.
            self._spin_pause, self._spin_score = 256, 0.6

    def _recv(self, deadline: float, spin: bool) -> bytes:
        """Whatever arrives next (spinning first if asked); RemoteError at EOF."""
        sock = self._require()
        if spin:  # a reply cannot be there yet: a failed recv() would cost 1.2 µs
            with _waiting_lock:
                _waiting[0] += 1
            try:
                data = self._recv_wait(sock, deadline, spin)
            finally:
                with _waiting_lock:
                    _waiting[0] -= 1
        else:
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = self._recv_wait(sock, deadline, spin)
        if not data:
            raise RemoteError(f"{self.what} closed the connection")
        return data

    def _recv_wait(self, sock: socket.socket, deadline: float, spin: bool) -> bytes:
        poll = self._poll_in.poll
        caught = False
        if spin and _waiting[0] == 1:
            until = time.perf_counter_ns() + self.busy_poll_ns
            clock = time.perf_counter_ns
            crowd = False
            while not poll(0):
                if clock() >= until:
                    break
                if _waiting[0] > 1:  # see _waiting: sleep, leave the GIL to the others
                    crowd = True
                    break
            else:
                caught = True
            if not crowd:
                self._spin_caught(caught)
        while True:
            try:
                data = sock.recv(RECV_SIZE)
                self.late = time.monotonic() - deadline > CLIENT_LATE
                return data
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                self.late = -left > CLIENT_LATE
                raise self._timed_out()
            poll(left * 1000)
