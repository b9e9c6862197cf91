"""A small blocking client for one lender (the remote tier's, tests', `memlend stats`).

Every call has a deadline (`timeout`); on a timeout, a refused handshake, a broken
connection or a malformed reply it raises RemoteError and the client is closed:
the caller treats that as "not in the remote tier" and reads the backing store
(invariant 2). Reconnecting is the caller's decision.

Adaptive busy-polling (sockio.SpinSocket): after sending a request the client
spins on a non-blocking receive for up to `busy_poll_us` before sleeping in poll();
the client's caller is blocked anyway.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

from memlend.native import lib as native
from memlend.remote import protocol as p
from memlend.remote.sockio import RemoteAuthError, RemoteError, RemoteTimeout, SpinSocket

__all__ = ["LenderClient", "RemoteAuthError", "RemoteError", "RemoteTimeout", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class LenderClient(SpinSocket):
    def __init__(
        self,
        address: tuple[str, int],
        auth_key: bytes,
        client_id: bytes,
        *,
        timeout: float = 2.0,
        busy_poll_us: int = 200,
    ) -> None:
        super().__init__(address, timeout, busy_poll_us)
        self._conn = p.ClientConnection(auth_key, client_id)
        self._ids = itertools.count(1)
        self._events: list[p.Event] = []
        self.max_value = 0
        self.max_keys = p.MAX_KEYS
        deadline = time.monotonic() + timeout
        try:
            self._connect()
            self._send(self._conn.send_hello())
            self._expect(p.ServerVerified, deadline)
            self._send(self._conn.send_auth())
            ok = self._expect(p.AuthOk, deadline)
        except OSError as e:
            self.close()
            raise RemoteError(f"cannot connect to {address[0]}:{address[1]}: {e}") from e
        except RemoteError:
            self.close()
            raise
        self.max_value, self.max_keys = ok.max_value, max(1, min(ok.max_keys, p.MAX_KEYS))
        # The native get_one receives a whole one-value reply into this.
        self._reply_buf = bytearray(p.HEADER_SIZE + 7 + self.max_value)
        self._reply_view = memoryview(self._reply_buf)

    # ---- plumbing -----------------------------------------------------------------

    def _recv_some(self, deadline: float, spin: bool = False) -> None:
        self._recv_events(self._recv(deadline, spin))

    def _recv_events(self, data: bytes) -> None:
        try:
            self._events += self._conn.receive_data(data)
        except p.AuthError as e:
            raise RemoteAuthError(str(e)) from None
        except p.ProtocolError as e:
            raise RemoteError(f"bad reply from lender: {e}") from None

    def _expect(
        self, kind: type, deadline: float, request_id: int | None = None, spin: bool | None = None
    ):
        if spin is None:  # a reply to a request just sent: spin if the policy says so
            spin = request_id is not None and self._spin()
        events = self._events
        while True:
            if events:
                ev = events.pop(0)
                if type(ev) is kind and (request_id is None or ev.request_id == request_id):
                    return ev
                if isinstance(ev, p.ErrorReply):
                    cls = RemoteAuthError if ev.code == p.ErrorCode.AUTH else RemoteError
                    raise cls(f"lender refused: {ev.message}")
                raise RemoteError(f"unexpected reply {type(ev).__name__}")
            try:
                self._recv_some(deadline, spin)
                spin = False
            except OSError as e:
                raise RemoteError(f"lender connection failed: {e}") from e

    def _call(self, build, kind: type):
        """Send one request and wait for its reply; any failure closes the client."""
        rid = next(self._ids) & 0xFFFFFFFF
        try:
            self._send(build(rid))
            return self._expect(kind, time.monotonic() + self.timeout, rid)
        except OSError as e:
            self.close()
            raise RemoteError(f"lender connection failed: {e}") from e
        except RemoteError:
            self.close()
            raise

    # ---- requests -------------------------------------------------------------------

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored value of each key, or None where the lender has none."""
        # Keys per request such that a full reply fits in one frame.
        per = max(1, min(self.max_keys, p.MAX_PAYLOAD // (self.max_value + 5 or 1)))
        out: list[bytes | None] = []
        for i in range(0, len(keys), per):
            batch = keys[i : i + per]
            reply = self._call(lambda rid, b=batch: self._conn.send_get(b, rid), p.GetReply)
            if len(reply.values) != len(batch):
                self.close()
                raise RemoteError("lender answered a different number of keys")
            out.extend(reply.values)
        return out

    def get_one(
        self, key: bytes, deadline: float, budget: float = 0.0, view: bool = False
    ) -> bytes | memoryview | None:
        """One key's stored value (None: not there), answered by `deadline`, or within
        `budget` seconds of the request's sending if that is later (time this thread
        lost before sending is not the lender's): the remote tier's common call,
        served by the protocol's one-value fast path when the reply comes in one
        piece. Any failure closes the client (RemoteError). `view`: the value may be
        a view of this client's reply buffer, valid until its next call (no copy)."""
        rid = next(self._ids) & 0xFFFFFFFF
        self.late = False
        try:
            if native is not None and type(key) is bytes:
                fast, got, deadline = self._ask_native(key, deadline, budget, rid, view)
            else:
                fast, got, deadline = self._ask(key, deadline, budget, rid)
            if fast:
                return got
            # Not one whole one-value reply: the general decoder judges, reads on.
            self._recv_events(got)
            reply = self._expect(p.GetReply, deadline, rid, spin=False)  # spun already
        except OSError as e:
            self.close()
            raise RemoteError(f"lender connection failed: {e}") from e
        except RemoteError:
            self.close()
            raise
        if len(reply.values) != 1:
            self.close()
            raise RemoteError("lender answered a different number of keys")
        return reply.values[0]

    def call_outside(self) -> tuple[int, int, float]:
        """For a one-block get that C sends and waits for itself (fs/fast_read.py):
        the socket, a request id, and how long the wait may spin (seconds)."""
        return self._require().fileno(), next(self._ids) & 0xFFFFFFFF, self._native_spin()

    def answered_outside(self, caught: bool, spin: float) -> None:
        """That get was answered; `caught`: while its wait was spinning."""
        if spin:
            self._spin_caught(caught)

    def _ask(self, key: bytes, deadline: float, budget: float, rid: int) -> tuple:
        """get_one's send and first receive in Python: (True, value) from the
        protocol's one-value fast path, or (False, bytes received), with the deadline
        to read on by."""
        self._send(self._conn.send_get((key,), rid), deadline)
        if budget:
            deadline = max(deadline, time.monotonic() + budget)
        data = self._recv(deadline, self._spin())
        value = self._conn.receive_value(data, rid)
        if value is not p.NOT_FAST:
            return True, value, deadline
        return False, data, deadline

    def _ask_native(
        self, key: bytes, deadline: float, budget: float, rid: int, view: bool
    ) -> tuple:
        """_ask in C (memlend._native.get_one): the wait releases the GIL and spins
        with sched_yield, so it gives way to any thread that needs this CPU."""
        spin = self._native_spin()
        fd = self._require().fileno()
        buf = self._reply_view if view else self._reply_buf
        status, data, caught, self.late = native.get_one(fd, rid, key, buf, deadline, spin, budget)
        if self._native_done(status, data, caught, spin):
            return True, data, deadline
        # A reply in pieces: the lender's budget counts from now (its first bytes came).
        return False, data, max(deadline, time.monotonic() + budget)

    def _native_spin(self) -> float:
        """Seconds a native wait spins before it sleeps (0: the spin policy says no)."""
        return self.busy_poll_ns / 1e9 if self._spin() else 0.0

    def _native_done(self, status: int, data: object, caught: bool, spin: float) -> bool:
        """After a native wait: True if `data` is the answer; RemoteError for a time-out
        or a closed peer; False: `data` is bytes for the Python decoder to judge."""
        if spin:
            self._spin_caught(caught)
        if status == native.GOT_VALUE or status == native.GOT_NONE:
            return True
        if status == native.TIMED_OUT:
            raise self._timed_out()
        if status == native.CLOSED and not data:
            raise RemoteError(f"{self.what} closed the connection")
        return False

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Store clean blocks; returns how many the lender kept (it may refuse any)."""
        stored = 0
        batch: list[tuple[bytes, bytes]] = []
        size = 2
        for k, v in items:
            if len(v) > self.max_value:
                continue  # the lender would refuse it: do not send it
            item = p.put_payload_size(k, len(v))
            if batch and (len(batch) >= self.max_keys or size + item > p.MAX_PAYLOAD):
                stored += self._put(batch)
                batch, size = [], 2
            batch.append((k, v))
            size += item
        if batch:
            stored += self._put(batch)
        return stored

    def _put(self, batch: list[tuple[bytes, bytes]]) -> int:
        return self._call(lambda rid: self._conn.send_put(batch, rid), p.Ack).count

    def invalidate(self, keys: Sequence[bytes]) -> int:
        n = 0
        for i in range(0, len(keys), p.MAX_KEYS):
            batch = keys[i : i + p.MAX_KEYS]
            n += self._call(lambda rid, b=batch: self._conn.send_invalidate(b, rid), p.Ack).count
        return n

    def invalidate_prefix(self, prefix: bytes) -> int:
        return self._call(lambda rid: self._conn.send_invalidate_prefix(prefix, rid), p.Ack).count

    def invalidate_all(self) -> int:
        return self._call(lambda rid: self._conn.send_invalidate_all(rid), p.Ack).count

    def stats(self) -> dict:
        return self._call(lambda rid: self._conn.send_stats(rid), p.StatsReply).stats

    def ping(self, data: bytes = b"") -> bytes:
        return self._call(lambda rid: self._conn.send_ping(data, rid), p.Pong).data
