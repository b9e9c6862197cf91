"""The lender's network loop: one thread, epoll, non-blocking sockets.

Chosen by measurement (docs/remote.md, `python -m memlend.bench.lender_iobench`): a
single-threaded loop is as fast as thread-per-connection for a 4 KiB GET and
needs no locks around the store, and its memory does not grow with a thread stack
per client. After serving a request it keeps polling without sleeping for a short
while (busy_poll_us): a cross-CPU wake-up costs far more than the request itself,
and the spin is bounded, so an idle lender burns no CPU.

Every connection must authenticate first (protocol.ServerConnection); anything
malformed closes that connection only. Idle connections, unfinished handshakes
and frames that trickle in too slowly are closed by a periodic sweep.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from memlend import native
from memlend.errors import UserError
from memlend.lender.cgroup import PressureEvents, pressure_events
from memlend.lender.clients import AllowedClient, load_clients
from memlend.lender.store import Namespace, Store
from memlend.lender.watcher import Watcher
from memlend.remote import protocol as p

log = logging.getLogger("memlend.lender")

_RID = struct.Struct(">I")  # a frame's request id, at offset 6
RECV_SIZE = 64 << 10  # below glibc's mmap threshold: see memlend.remote.sockio
MAX_OUTPUT = 8 << 20  # stop reading from a client that does not read its replies


def py_recv_put(
    sock: socket.socket, buf: bytearray, got: int, size: int
) -> tuple[int, list[tuple[bytes, bytes | memoryview]] | None]:
    """The receiving of one big PUT frame (_read_put), defined here and done in C when
    built (memlend.native; tests/test_native.py holds the two to the same results).
    buf[:got] holds the frame's first bytes, header included; the frame is `size`
    bytes. One recv straight into buf[got:size] -- never past the frame, so what
    follows it stays in the socket for receive_data -- and, once the frame is whole,
    its items (protocol's PUT decoder: the values are views of buf, valid until buf is
    written again). `got` is -1 at end of file; ProtocolError for a malformed payload."""
    if not p.HEADER_SIZE <= size <= len(buf) or not 0 <= got <= size:
        raise ValueError("recv_put needs 0 <= got <= size <= len(buf)")
    view = memoryview(buf)
    if got < size:
        try:
            n = sock.recv_into(view[got:size])
        except BlockingIOError:
            n = None
        if n == 0:
            return -1, None
        got += n or 0
    if got < size:
        return got, None
    return got, p.py_decode_put(view[p.HEADER_SIZE : size])


@dataclass
class ServerConfig:
    idle_timeout: float = 300.0
    auth_timeout: float = 5.0
    frame_timeout: float = 10.0  # a started frame must complete within this
    max_connections: int = 64
    busy_poll_us: int = 200  # see --busy-poll-us
    # Answer whole GET chunks in C (memlend.native) when it is built. The C path
    # reads the store's index itself, so a Store whose get_parts differs opts out.
    native_gets: bool = True
    watch_interval: float = 0.1
    clients_file: str | None = None  # --clients: read again on request_reload() (SIGHUP)


@dataclass
class _Client:
    sock: socket.socket
    peer: str
    conn: p.ServerConnection
    opened: float
    last_active: float
    partial_since: float | None = None
    ns: Namespace | None = None
    out: deque = field(default_factory=deque)
    out_bytes: int = 0
    mask: int = select.EPOLLIN
    closing: bool = False
    # A PUT frame bigger than one recv, coming straight into put_buf (_read_put).
    put_buf: bytearray | None = None
    put_got: int = 0
    put_size: int = 0


URGENT_SECONDS = 2.0  # after a cgroup pressure event, watch closely this long
URGENT_INTERVAL = 0.01


class LenderServer:
    def __init__(
        self,
        sock: socket.socket,
        store: Store,
        auth_key: bytes | dict[bytes, AllowedClient],
        config: ServerConfig | None = None,
        watcher: Watcher | None = None,
        watcher_events: bool | PressureEvents = False,
    ) -> None:
        """`watcher_events`: also wake the watcher on memory pressure notifications
        (cgroup v1 threshold, cgroup v2 memory.events, PSI triggers; only meaningful
        with the real memory source), or on these given sources (tests)."""
        self.sock = sock
        self.store = store
        # One shared key, or each allowed client's own (memlend.lender.clients): then
        # a client id is a name, and only that client's key opens its namespace.
        self.auth_key = auth_key
        self.allowed = None if isinstance(auth_key, bytes) else auth_key
        self.cfg = config or ServerConfig()
        self.watcher = watcher
        # Raw epoll, not selectors: a selectors.select() call costs about 3 µs of Python,
        # paid on every look of the busy-poll loop (docs/remote.md).
        self.ep = select.epoll()
        self.clients: dict[int, _Client] = {}
        use_native = native.lib is not None and self.cfg.native_gets
        self._recv_serve = native.lib.recv_serve if use_native else None
        self._arena, self._slot_size = store.arena.view, store.slot_size
        self._recv_put = native.lib.recv_put if native.lib is not None else py_recv_put
        self._spare: bytearray | None = None  # the last big PUT's buffer, for the next
        self.get_keys = 0  # keys asked for (stats: CPU per GET)
        self._cpu_start = time.process_time()
        self.auth_failures = 0
        self.protocol_errors = 0
        self._last_fail_log = 0.0
        self._suppressed = 0
        self._running = False
        # Self-pipe: stop() from another thread or a signal handler wakes the loop.
        self._reload_wanted = False  # request_reload() was called
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        sock.setblocking(False)
        self._listen_fd = sock.fileno()
        self.ep.register(self._listen_fd, select.EPOLLIN)
        self.ep.register(self._wake_r, select.EPOLLIN)
        self._urgent_until = 0.0
        self._next_tick = 0.0
        self.events = PressureEvents()
        if watcher is not None and watcher_events:
            self.events = (
                watcher_events
                if isinstance(watcher_events, PressureEvents)
                else pressure_events(watcher.reserve)
            )
            for fd, mask in self.events.fds():
                self.ep.register(fd, mask)
            log.info("memory watcher wakes on: %s", ", ".join(self.events.names()) or
                     f"nothing but its {self.cfg.watch_interval} s polling")  # fmt: skip
        self._pressure_fds = {fd for fd, _ in self.events.fds()}

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def stop(self) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def request_reload(self) -> None:
        """Read the clients file again, from the loop (safe from a signal handler)."""
        self._reload_wanted = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"r")

    def _reload_clients(self) -> None:
        """The clients file again: new clients may connect; a client removed, or whose
        key changed, loses its connections (and, removed, its blocks); quotas change in
        place. A file that does not load leaves the running list as it is."""
        self._reload_wanted = False
        path = self.cfg.clients_file
        if path is None or self.allowed is None:
            log.info("SIGHUP: no clients file to read again")
            return
        try:
            new = load_clients(path)
        except UserError as e:
            log.error("clients file not reloaded, the running list stays: %s", e)
            return
        old, self.allowed = self.allowed, new
        removed = old.keys() - new.keys()
        rekeyed = {cid for cid in old.keys() & new.keys() if new[cid].auth_key != old[cid].auth_key}
        gone = removed | rekeyed
        for c in list(self.clients.values()):
            if c.ns is not None and c.ns.client_id in gone:
                self._close(c, "its key was removed or changed in the clients file")
        for cid in removed:
            self.store.drop_client(cid)
        for cid in old.keys() & new.keys() - rekeyed:
            self.store.namespace(cid, new[cid].quota)  # the new quota, if it changed
        log.info("clients file %s read again: %d clients (%d added, %d removed, %d re-keyed)",
                 path, len(new), len(new.keys() - old.keys()), len(removed),
                 len(rekeyed))  # fmt: skip

    # ---- main loop ------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._running = True
        self._next_tick = time.monotonic()
        spin_ns = self.cfg.busy_poll_us * 1000
        score, pause = 1.0, 0
        poll, clock = self.ep.poll, time.perf_counter_ns
        try:
            while self._running:
                now = time.monotonic()
                if now >= self._next_tick:
                    self._tick(now)
                    urgent = now < self._urgent_until
                    interval = URGENT_INTERVAL if urgent else self.cfg.watch_interval
                    self._next_tick = now + interval
                events = poll(max(0.0, self._next_tick - now))
                while events:
                    self._dispatch(events)
                    if not spin_ns or not self._running:
                        break
                    if pause:
                        pause -= 1
                        break
                    # Bounded spin: catch the client's next request without a wake-up.
                    deadline = clock() + spin_ns
                    events = poll(0)
                    while not events and clock() < deadline:
                        events = poll(0)
                    # Spins that rarely catch anything only burn the host's CPU (or
                    # delay a client on the same CPU): pause them for a while.
                    score = 0.9 * score + (0.1 if events else 0.0)
                    if score < 0.3:
                        pause, score = 256, 0.6
        finally:
            self._shutdown()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        clients = self.clients
        for fd, mask in events:
            c = clients.get(fd)
            if c is not None:
                if mask & select.EPOLLOUT:
                    self._flush(c)
                    if fd not in clients:  # the flush failed and closed it
                        continue
                if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP) and not c.closing:
                    try:
                        self._read(c)
                    except Exception:  # a bug must cost one connection, not the lender
                        log.exception("closing %s after an internal error", c.peer)
                        self._close(c)
            elif fd == self._listen_fd:
                self._accept()
            elif fd == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                if self._reload_wanted:
                    self._reload_clients()
            elif fd in self._pressure_fds:  # the cgroup or host is short of memory: act now
                self.events.consume(fd)
                now = time.monotonic()
                # The event fires once per crossing; while the neighbour keeps growing
                # above the line, look again every 10 ms for a while (from now on: the
                # next regular look may be seconds away).
                self._urgent_until = now + URGENT_SECONDS
                self._tick(now)
                self._next_tick = now + URGENT_INTERVAL

    def _tick(self, now: float) -> None:
        if self.watcher is not None:
            given = self.watcher.check()
            if given:
                log.info(
                    "host memory short: gave back %d MiB (now using %d MiB)",
                    given >> 20,
                    (self.store.used * self.store.slot_size) >> 20,
                )
        cfg = self.cfg
        for c in list(self.clients.values()):
            if not c.conn.authenticated and now - c.opened > cfg.auth_timeout:
                self._close(c, "handshake not finished in time")
            elif c.partial_since is not None and now - c.partial_since > cfg.frame_timeout:
                self._close(c, "frame arriving too slowly")
            elif now - c.last_active > cfg.idle_timeout:
                self._close(c, "idle")

    # ---- connections -----------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                s, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", e.strerror)
                return
            if len(self.clients) >= self.cfg.max_connections:
                log.warning("refusing %s: %d connections open", addr, len(self.clients))
                s.close()
                continue
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            now = time.monotonic()
            c = _Client(s, f"{addr[0]}:{addr[1]}", p.ServerConnection(self._key_for), now, now)
            self.clients[s.fileno()] = c
            self.ep.register(s.fileno(), select.EPOLLIN)

    def _key_for(self, client_id: bytes) -> bytes | None:
        if self.allowed is None:
            return self.auth_key  # type: ignore[return-value]
        client = self.allowed.get(client_id)
        return None if client is None else client.auth_key

    def _close(self, c: _Client, why: str | None = None) -> None:
        if self.clients.pop(c.sock.fileno(), None) is None:
            return
        if why:
            log.info("closing %s: %s", c.peer, why)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(c.sock.fileno())
        c.sock.close()

    def _read(self, c: _Client) -> None:
        if c.put_buf is not None:
            self._read_put(c)
            return
        if self._recv_serve is not None and c.ns is not None and c.conn.fast_ready:
            # The hot path in C: recv, parse, look up, one sendmsg from the arena.
            try:
                data, served = self._recv_serve(
                    c.sock.fileno(), c.ns.entries, self._arena, self._slot_size, not c.out
                )
            except OSError as e:
                self._close(c, None if e.errno in (errno.EPIPE, errno.ECONNRESET) else e.strerror)
                return
            if served is not None:
                c.last_active = time.monotonic()
                rest, hits, asked = served
                self.get_keys += asked
                if rest:
                    self._send(c, rest)
                    self._flush(c)
                self.store.served(c.ns, hits, asked - len(hits))
                return
            if data is None:
                return  # nothing there after all
        else:
            try:
                data = c.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._close(c, e.strerror)
                return
        if not data:
            self._close(c)
            return
        c.last_active = time.monotonic()
        gets = c.conn.receive_gets(data)
        if gets is not None:  # the hot path: whole GET frames, nothing else
            c.partial_since = None
            for request_id, keys in gets:
                self.get_keys += len(keys)
                self._reply_get(c, request_id, keys)
            return
        if c.ns is not None and c.conn.fast_ready:
            size = p.put_frame_size(data)
            if size is not None:
                self._start_put(c, data, size)
                return
        try:
            events = c.conn.receive_data(data)
        except p.AuthError as e:
            self._auth_failed(c, str(e))
            return
        except p.ProtocolError as e:
            self.protocol_errors += 1
            self._fail(c, p.ErrorCode.PROTOCOL, str(e))
            return
        if not c.conn.buffered:
            c.partial_since = None
        elif events or c.partial_since is None:
            c.partial_since = c.last_active  # a new frame started
        for ev in events:
            if c.closing:
                break
            self._handle(c, ev)
        self._flush(c)

    def _start_put(self, c: _Client, data: bytes, size: int) -> None:
        """The first bytes of a PUT frame that needs more recvs: the rest is received
        straight into one buffer (_read_put), not gathered in a growing one and copied
        out. The buffer is kept for the next frame: a fresh half-MiB buffer per frame
        cost more in page faults than the decoding (docs/native.md)."""
        spare = self._spare
        if spare is not None and len(spare) >= size:
            buf, self._spare = spare, None
        else:
            buf = bytearray(size)
        buf[: len(data)] = data
        c.put_buf, c.put_got, c.put_size = buf, len(data), size
        c.partial_since = c.last_active

    def _read_put(self, c: _Client) -> None:
        buf = c.put_buf
        assert buf is not None
        try:
            got, items = self._recv_put(c.sock, buf, c.put_got, c.put_size)
        except OSError as e:
            self._close(c, None if e.errno in (errno.EPIPE, errno.ECONNRESET) else e.strerror)
            return
        except p.ProtocolError as e:  # the payload: the message receive_data would give
            self._end_put(c)
            self.protocol_errors += 1
            self._fail(c, p.ErrorCode.PROTOCOL, str(e))
            return
        if got < 0:
            self._close(c)
            return
        c.last_active = time.monotonic()
        c.put_got = got
        if items is None:
            return
        self._apply_put(c, _RID.unpack_from(buf, 6)[0], items)
        self._end_put(c)  # buf may take the next frame: store.put copied every value
        self._flush(c)

    def _end_put(self, c: _Client) -> None:
        buf, c.put_buf, c.partial_since = c.put_buf, None, None
        if buf is not None and (self._spare is None or len(buf) > len(self._spare)):
            self._spare = buf

    def _apply_put(
        self, c: _Client, request_id: int, items: list[tuple[bytes, bytes | memoryview]]
    ) -> None:
        put, ns = self.store.put, c.ns
        assert ns is not None  # set when the handshake ended; PUTs come only after it
        stored = sum(put(ns, k, v) for k, v in items)
        self._send(c, c.conn.send_ack(request_id, stored))

    def _auth_failed(self, c: _Client, why: str) -> None:
        self._log_auth_failure(c, why)
        self._fail(c, p.ErrorCode.AUTH, "authentication failed")

    def _log_auth_failure(self, c: _Client, why: str) -> None:
        self.auth_failures += 1
        # One line per failed connection, at most one per second: a scanner hammering
        # the port must not fill the disk with logs.
        now = time.monotonic()
        if now - self._last_fail_log >= 1.0:
            extra = f" ({self._suppressed} more suppressed)" if self._suppressed else ""
            log.warning("%s failed authentication: %s%s", c.peer, why, extra)
            self._last_fail_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _fail(self, c: _Client, code: int, message: str) -> None:
        """Best-effort ERROR frame, then close: the peer learns why, we keep no state."""
        with contextlib.suppress(OSError):
            c.sock.send(c.conn.send_error(0, code, message))
        self._close(c, message if code != p.ErrorCode.AUTH else None)

    def _send(self, c: _Client, data: bytes) -> None:
        c.out.append(data)
        c.out_bytes += len(data)

    def _send_parts(self, c: _Client, parts: list[bytes | memoryview]) -> None:
        """Send a reply given as buffers (slot views among them) with one sendmsg;
        what the socket does not take now is copied and queued: a slot may be
        overwritten by the next put."""
        if not c.out:
            try:
                n = c.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._close(c, None if e.errno in (errno.EPIPE, errno.ECONNRESET) else e.strerror)
                return
            if n == sum(len(x) for x in parts):
                return
            rest = b"".join(parts)[n:]
        else:
            rest = b"".join(parts)
        self._send(c, rest)
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        while c.out:
            buf = c.out[0]
            try:
                n = c.sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._close(c, None if e.errno in (errno.EPIPE, errno.ECONNRESET) else e.strerror)
                return
            c.out_bytes -= n
            if n < len(buf):
                c.out[0] = memoryview(buf)[n:]
                break
            c.out.popleft()
        if c.closing and not c.out:
            self._close(c)
            return
        want = select.EPOLLOUT if c.out else 0
        if c.out_bytes < MAX_OUTPUT and not c.closing:
            want |= select.EPOLLIN
        if want != c.mask:
            c.mask = want
            self.ep.modify(c.sock.fileno(), want)

    # ---- requests ------------------------------------------------------------------

    def _handle(self, c: _Client, ev: p.Event) -> None:
        conn, st = c.conn, self.store
        if isinstance(ev, p.GetRequest):
            self.get_keys += len(ev.keys)
            self._reply_get(c, ev.request_id, ev.keys)
        elif isinstance(ev, p.PutRequest):
            self._apply_put(c, ev.request_id, ev.items)
        elif isinstance(ev, p.InvalidateRequest):
            ns = c.ns
            assert ns is not None
            if ev.mode == p.InvalidateMode.KEYS:
                n = st.invalidate(ns, ev.keys)
            elif ev.mode == p.InvalidateMode.PREFIX:
                n = st.invalidate_prefix(ns, ev.keys[0])
            else:
                n = st.invalidate_all(ns)
            self._send(c, conn.send_ack(ev.request_id, n))
        elif isinstance(ev, p.StatsRequest):
            s = self.stats()
            assert c.ns is not None
            s["client_blocks"] = len(c.ns.entries)  # this client's share of "blocks"
            s["client_share_blocks"] = st.client_share(c.ns)  # what it may hold: its curve's size
            if self.allowed is not None:
                # Clients with keys of their own (--clients) are tenants: each sees its
                # own advice; the others' activity is the operator's (--metrics). With
                # one shared secret every holder is trusted alike and sees all.
                own = c.ns.client_id[:8].hex()
                s["client_advice"] = {k: v for k, v in s["client_advice"].items() if k == own}
            self._send(c, conn.send_stats_reply(ev.request_id, s))
        elif isinstance(ev, p.Ping):
            self._send(c, conn.send_pong(ev.request_id, ev.data))
        elif isinstance(ev, p.Hello):
            if self.allowed is not None and ev.client_id not in self.allowed:
                # Logged here, as the client gives up on our (random-key) proof and
                # closes without a word; the handshake goes on so it cannot tell.
                name = ev.client_id.decode("ascii", "replace")[:64]
                self._log_auth_failure(c, f"unknown client {name!r}")
            self._send(c, conn.send_challenge())
        elif isinstance(ev, p.Authenticated):
            allowed = self.allowed.get(ev.client_id) if self.allowed is not None else None
            c.ns = st.namespace(ev.client_id, allowed.quota if allowed else None)
            if c.ns is None:
                self._send(c, conn.send_error(0, p.ErrorCode.BUSY, "too many client namespaces"))
                c.closing = True
                return
            self._send(c, conn.send_auth_ok(st.max_value))

    def _reply_get(self, c: _Client, request_id: int, keys: list[bytes]) -> None:
        store, ns = self.store, c.ns
        assert ns is not None  # set when the handshake ended; GETs come only after it
        get = store.get_parts
        values: list[tuple[memoryview, bytes] | None] = []
        room = p.MAX_PAYLOAD - 2
        found = False
        for k in keys:
            v = get(ns, k, False)
            if v is not None:
                found = True
                # A reply never exceeds a frame: what does not fit is reported missing.
                size = len(v[0]) + len(v[1]) + 5
                if size > room:
                    v = None
                else:
                    room -= size
            if v is None:
                room -= 1
            values.append(v)
        self._send_parts(c, p.get_reply_parts(request_id, values))
        if found:  # the policy learns of the hits once the client has its answer
            store.touched(ns, [k for k, v in zip(keys, values, strict=True) if v is not None])

    def stats(self) -> dict:
        s = self.store.stats()
        # list(): callable from the metrics thread while the loop adds clients.
        s["clients"] = sum(1 for c in list(self.clients.values()) if c.conn.authenticated)
        s["connections"] = len(self.clients)
        s["auth_failures"] = self.auth_failures
        s["protocol_errors"] = self.protocol_errors
        s["hot_path"] = native.description
        s["client_advice"] = self.store.advice_per_client()  # what each one's last GiB buys
        # The lender's whole CPU time (idle polling included) per key served: what
        # lending costs the host besides memory.
        cpu = time.process_time() - self._cpu_start
        s["cpu_seconds"] = round(cpu, 3)
        s["get_keys"] = self.get_keys
        s["cpu_us_per_get"] = round(cpu / self.get_keys * 1e6, 1) if self.get_keys else None
        if self.watcher is not None:
            s["reserve"] = self.watcher.reserve
            s["host_available"] = self.watcher.last_available
        return s

    def _shutdown(self) -> None:
        for c in list(self.clients.values()):
            self._close(c)
        self.ep.close()
        self.events.close()
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
