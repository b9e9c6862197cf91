"""The lender's network loop, in-process (a thread), with real sockets on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from memlend.lender.server import LenderServer, ServerConfig
from memlend.lender.store import META_PER_SLOT, Store
from memlend.lender.watcher import Watcher
from memlend.remote import protocol as p
from memlend.remote.client import LenderClient, RemoteAuthError, RemoteError

KEY = b"a" * 32
SLOT = 4096


@pytest.fixture
def lender() -> Iterator[Callable[..., LenderServer]]:
    """lender(slots=64, config=None, source=None, reserve=0, quota=None) -> running server."""
    started: list[tuple[LenderServer, threading.Thread]] = []

    def start(slots=64, config=None, source=None, reserve=0, quota=None) -> LenderServer:
        store = Store(slots * (SLOT + META_PER_SLOT), SLOT, client_quota=quota)
        watcher = Watcher(store, source, reserve) if source else None
        sock = socket.create_server(("127.0.0.1", 0))
        cfg = config or ServerConfig(watch_interval=0.05)
        srv = LenderServer(sock, store, KEY, cfg, watcher)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        started.append((srv, t))
        return srv

    yield start
    for srv, t in started:
        srv.stop()
        t.join(5)
        srv.store.close()


def client(srv: LenderServer, cid: bytes = b"a", key: bytes = KEY, **kw) -> LenderClient:
    return LenderClient(srv.address, key, cid, timeout=2.0, **kw)


def raw(srv: LenderServer) -> socket.socket:
    s = socket.create_connection(srv.address, timeout=2)
    return s


def closed_by_peer(s: socket.socket, timeout: float = 3.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def test_put_get_round_trip_and_stats(lender) -> None:
    srv = lender()
    with client(srv) as c:
        assert c.max_value == SLOT + 64
        blocks = [(b"blk%03d" % i, bytes([i]) * (SLOT + 29)) for i in range(40)]
        assert c.put_many(blocks) == 40
        got = c.multi_get([k for k, _ in blocks] + [b"missing"])
        assert got[:-1] == [v for _, v in blocks] and got[-1] is None
        assert c.invalidate([b"blk000", b"blk001"]) == 2
        assert c.invalidate_prefix(b"blk01") == 10
        assert c.multi_get([b"blk000", b"blk020"])[0] is None
        assert c.ping(b"hello") == b"hello"
        s = c.stats()
        assert s["blocks"] == 28 and s["clients"] == 1 and s["hits"] == 41
        assert {"memory_cap", "bytes_used", "misses", "evictions", "given_back_bytes"} <= set(s)
        assert c.invalidate_all() == 28


def test_many_keys_are_split_into_frames(lender) -> None:
    srv = lender(slots=600)
    with client(srv) as c:
        blocks = [(b"%05d" % i, b"v%d" % i) for i in range(500)]  # > MAX_KEYS per message
        assert c.put_many(blocks) == 500
        assert c.multi_get([k for k, _ in blocks]) == [v for _, v in blocks]


def test_wrong_secret_is_refused_while_others_keep_working(lender, caplog) -> None:
    srv = lender()
    good = client(srv)
    good.put_many([(b"k", b"v")])
    with pytest.raises(RemoteAuthError):
        client(srv, cid=b"intruder", key=b"z" * 32)
    # A client that skips the check and forges its proof gets closed, too.
    s = raw(srv)
    c = p.ClientConnection(b"z" * 32, b"forger")
    s.sendall(c.send_hello())
    s.recv(4096)
    s.sendall(p.encode_frame(p.MsgType.AUTH, 0, b"\0" * 32))
    assert closed_by_peer(s)
    assert good.multi_get([b"k"]) == [b"v"]
    assert srv.auth_failures == 1  # the first client gave up on its own: wrong lender
    assert sum("failed authentication" in r.message for r in caplog.records) == 1
    good.close()


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        p.HEADER.pack(p.MAGIC, 1, p.MsgType.HELLO, 0, 0, p.MAX_PAYLOAD + 1),  # oversized
        p.HEADER.pack(p.MAGIC, 9, p.MsgType.HELLO, 0, 0, 0),  # another version
        bytes(range(256)) * 4,
    ],
)
def test_garbage_closes_the_connection_and_the_lender_keeps_serving(lender, junk) -> None:
    srv = lender()
    with client(srv) as good:
        s = raw(srv)
        s.sendall(junk)
        assert closed_by_peer(s)
        assert good.ping() == b""
        assert srv.protocol_errors == 1


def test_truncated_frame_is_closed_after_the_frame_timeout(lender) -> None:
    srv = lender(config=ServerConfig(frame_timeout=0.3, watch_interval=0.05))
    s = raw(srv)
    frame = p.ClientConnection(KEY, b"a").send_hello()
    s.sendall(frame[:-5])  # never finished
    t = time.monotonic()
    assert closed_by_peer(s)
    assert time.monotonic() - t < 2.5
    with client(srv) as good:
        assert good.ping() == b""


def test_idle_and_unauthenticated_connections_are_closed(lender) -> None:
    srv = lender(config=ServerConfig(idle_timeout=0.4, auth_timeout=0.3, watch_interval=0.05))
    silent = raw(srv)
    c = client(srv)
    assert closed_by_peer(silent)
    time.sleep(0.8)
    with pytest.raises(RemoteError):
        c.ping()
    assert c.closed


def test_client_b_cannot_read_client_a(lender) -> None:
    srv = lender()
    with client(srv, b"A") as a, client(srv, b"B") as b:
        a.put_many([(b"shared-name", b"A's block")])
        assert b.multi_get([b"shared-name"]) == [None]
        assert b.invalidate_all() == 0
        assert a.multi_get([b"shared-name"]) == [b"A's block"]
        assert a.stats()["namespaces"] == 1


def test_quota_and_fair_share_across_clients(lender) -> None:
    srv = lender(slots=40, quota=10 * SLOT)
    with client(srv, b"A") as a, client(srv, b"B") as b:
        a.put_many([(b"%d" % i, b"x" * SLOT) for i in range(30)])
        assert a.stats()["blocks"] == 10
        b.put_many([(b"%d" % i, b"y" * SLOT) for i in range(30)])
        assert sum(v is not None for v in a.multi_get([b"%d" % i for i in range(30)])) == 10
        assert b.stats()["blocks"] == 20


def test_watcher_gives_memory_back_when_the_source_says_short(lender) -> None:
    reserve = 80 * SLOT  # its hysteresis margin is reserve / 8 = 10 slots
    avail = [10 << 30]
    srv = lender(slots=64, source=lambda: avail[0], reserve=reserve)
    with client(srv) as c:
        c.put_many([(b"%d" % i, b"x" * SLOT) for i in range(64)])
        assert c.stats()["blocks"] == 64
        avail[0] = reserve - 40 * SLOT  # 40 slots short: 40 + the 10-slot margin go back
        t = time.monotonic()
        while c.stats()["blocks"] > 14:
            assert time.monotonic() - t < 1.0, "not given back within a second"
            time.sleep(0.02)
        s = c.stats()
        assert s["given_back_bytes"] >= 50 * SLOT and s["allowed_bytes"] == 14 * SLOT
        # While short, a new block replaces the client's oldest: no growth.
        assert c.put_many([(b"new", b"x")]) == 1
        assert c.stats()["blocks"] == 14
        avail[0] = 10 << 30
        t = time.monotonic()
        while c.stats()["allowed_bytes"] < 64 * SLOT:
            assert time.monotonic() - t < 1.0
            time.sleep(0.02)
        assert c.put_many([(b"newer", b"x")]) == 1 and c.stats()["blocks"] == 15


def test_many_clients_at_once(lender) -> None:
    srv = lender(slots=256)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with client(srv, b"c%d" % n) as c:
                for r in range(20):
                    c.put_many([(b"k%d" % r, b"%d-%d" % (n, r))])
                    assert c.multi_get([b"k%d" % r]) == [b"%d-%d" % (n, r)]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_an_internal_error_costs_one_connection_not_the_lender(lender) -> None:
    srv = lender()
    a, b = client(srv, b"a"), client(srv, b"b")
    assert a.put_many([(b"k", b"v" * 100)]) == 1
    real = srv._read
    broken = {a._sock.getsockname()}

    def read(c) -> None:
        if c.sock.getpeername() in broken:
            raise RuntimeError("a bug")
        real(c)

    srv._read = read  # type: ignore[method-assign]
    with pytest.raises(RemoteError):
        a.multi_get([b"k"])
    assert b.multi_get([b"k"]) == [None]  # the lender serves the others on
    assert client(srv, b"a").multi_get([b"k"]) == [b"v" * 100]


def test_clients_that_vanish_with_replies_queued_leave_the_lender_serving(lender) -> None:
    # What a mount does when its reads time out: close the connection while the
    # lender still has a large reply to send. The lender once died of this.
    srv = lender(slots=256)
    keys = [b"k%03d" % i for i in range(200)]
    assert client(srv, b"a").put_many([(k, b"v" * SLOT) for k in keys]) == 200
    for _ in range(20):
        c = client(srv, b"a")
        sock = c._require()
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # 16 MiB of replies: more than the socket buffers hold, so the lender queues.
        gets = [c._conn.send_get(keys[i : i + 50], i) for i in range(0, 200, 50)]
        sock.sendall(b"".join(gets) * 20)
        time.sleep(0.02)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # reset: the lender's sends and reads fail from here on
    time.sleep(0.2)
    assert client(srv, b"a").multi_get(keys[:3]) == [b"v" * SLOT] * 3
    assert srv._running


def test_get_one_gives_the_lender_its_budget_from_the_send(lender) -> None:
    srv = lender()
    c = client(srv)
    c.put_many([(b"k", b"v" * 100)])
    # A deadline already gone when the call starts (the caller was descheduled): the
    # lender still has `budget` from the send, and the client says it was late.
    assert c.get_one(b"k", time.monotonic() - 0.05, 0.5) == b"v" * 100
    assert not c.late
    with contextlib.suppress(RemoteError):  # no budget: a hit only if the reply is quick
        c.get_one(b"k", time.monotonic() - 0.05)
    assert c.late  # either way it ended 50 ms past its deadline


# ---- PUT frames bigger than one recv (LenderServer._read_put, native or not) ----------


def authed(srv: LenderServer, cid: bytes = b"a") -> tuple[socket.socket, p.ClientConnection]:
    """An authenticated connection driven by hand: its (blocking) socket and protocol."""
    c = client(srv, cid)
    sock = c._require()
    sock.setblocking(True)
    sock.settimeout(2.0)
    return sock, c._conn


def replies(sock: socket.socket, conn: p.ClientConnection, n: int) -> list[p.Event]:
    events: list[p.Event] = []
    while len(events) < n:
        data = sock.recv(1 << 16)
        if not data:
            break
        events += conn.receive_data(data)
    return events


def blocks(n: int, tag: bytes = b"b") -> list[tuple[bytes, bytes]]:
    return [(b"%s%d" % (tag, i), bytes([i]) * (SLOT + 29)) for i in range(n)]


def test_put_frames_in_pieces_are_stored_and_what_follows_them_served(lender) -> None:
    srv = lender()
    sock, conn = authed(srv)
    # A frame, a smaller one (the kept buffer serves), a bigger one (a new buffer).
    for rid, n in ((5, 30), (6, 17), (7, 40)):
        items = blocks(n, b"r%d-" % rid)
        frame = conn.send_put(items, rid)
        sock.sendall(frame[:1000])
        time.sleep(0.05)  # the lender has the first piece before the rest comes
        sock.sendall(frame[1000:] + conn.send_get([k for k, _ in items[-2:]], rid + 100))
        assert replies(sock, conn, 2) == [
            p.Ack(rid, n),
            p.GetReply(rid + 100, [v for _, v in items[-2:]]),
        ]
        assert srv._spare is not None and len(srv._spare) >= len(frame)  # this path, kept
    assert srv.protocol_errors == 0


def test_put_frames_of_two_clients_arriving_at_once(lender) -> None:
    srv = lender()
    (sa, ca), (sb, cb) = authed(srv, b"A"), authed(srv, b"B")
    a_items, b_items = blocks(20, b"a"), blocks(20, b"b")
    fa, fb = ca.send_put(a_items, 1), cb.send_put(b_items, 1)
    for i in range(0, len(fa), 8000):  # both half received at once: a buffer each
        sa.sendall(fa[i : i + 8000])
        sb.sendall(fb[i : i + 8000])
        time.sleep(0.002)
    assert replies(sa, ca, 1) == [p.Ack(1, 20)] and replies(sb, cb, 1) == [p.Ack(1, 20)]
    with client(srv, b"A") as a, client(srv, b"B") as b:
        assert a.multi_get([k for k, _ in a_items]) == [v for _, v in a_items]
        assert b.multi_get([k for k, _ in b_items]) == [v for _, v in b_items]


@pytest.mark.parametrize("bad", ["trailing bytes", "key length", "value length", "eof"])
def test_a_bad_put_frame_in_pieces_gets_the_python_decoders_error(lender, bad: str) -> None:
    srv = lender()
    sock, conn = authed(srv)
    items = blocks(20)
    payload = bytearray(conn.send_put(items)[p.HEADER_SIZE :])
    second = 2 + 1 + len(items[0][0]) + 4 + len(items[0][1])  # where item 2 starts
    if bad == "trailing bytes":
        payload += b"x"
    elif bad == "key length":
        payload[second] = 0
    elif bad == "value length":
        payload[second + 1 + len(items[1][0])] = 0xFF  # a value longer than the frame
    frame = p.HEADER.pack(p.MAGIC, p.VERSION, p.MsgType.PUT, 0, 3, len(payload)) + payload
    sock.sendall(frame[:1000])
    time.sleep(0.05)
    if bad == "eof":  # the client goes away mid-frame: closed, no protocol error
        sock.sendall(frame[1000:50000])
        sock.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sock) and srv.protocol_errors == 0
    else:
        sock.sendall(frame[1000:])
        with pytest.raises(p.ProtocolError) as want:
            p.py_decode_put(memoryview(bytes(payload)))
        assert replies(sock, conn, 1) == [p.ErrorReply(0, p.ErrorCode.PROTOCOL, str(want.value))]
        assert closed_by_peer(sock) and srv.protocol_errors == 1
    with client(srv) as good:
        assert good.ping() == b"" and good.multi_get([items[0][0]]) == [None]


def test_a_put_frame_that_stops_coming_is_closed_after_the_frame_timeout(lender) -> None:
    srv = lender(config=ServerConfig(frame_timeout=0.3, watch_interval=0.05))
    sock, conn = authed(srv)
    sock.sendall(conn.send_put(blocks(20))[:30000])  # never finished
    t = time.monotonic()
    assert closed_by_peer(sock)
    assert time.monotonic() - t < 2.5
    with client(srv) as good:
        assert good.ping() == b""
