"""The C hot path (memlend._native) against its definition, the Python protocol.

The differential fuzz test feeds the same bytes to the native and the Python decoders
and requires the same result or the same ProtocolError message; `python -m
memlend.bench.fuzz_native` runs the same property for a million inputs.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlend import native
from memlend.bench import fuzz_native
from memlend.lender.server import py_recv_put
from memlend.lender.store import Store
from memlend.remote import protocol as p

lib = native.lib
needs_native = pytest.mark.skipif(lib is None, reason=native.description)
pytestmark = needs_native
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


keys_st = st.lists(st.binary(min_size=1, max_size=p.MAX_KEY_LEN), max_size=6)


@FUZZ
@given(fuzz_native.inputs())
def test_native_decoders_agree_with_python(data: bytes) -> None:
    fuzz_native.check(data)


@FUZZ
@given(keys_st, st.integers(0, 0xFFFFFFFF))
def test_encode_get_is_the_python_frame(keys: list[bytes], rid: int) -> None:
    assert lib.encode_get(keys, rid) == p.encode_frame(p.MsgType.GET, rid, *p._encode_keys(keys))


def test_encode_get_refuses_what_python_refuses() -> None:
    for keys in ([b""], [b"x" * 65], [b"k"] * 257):
        with pytest.raises(ValueError):
            lib.encode_get(keys, 1)
        with pytest.raises(ValueError):
            p._encode_keys(keys)
    with pytest.raises(ValueError):
        lib.encode_get([b"k"], 1 << 32)


# ---- the lender's serve_gets -------------------------------------------------------


@pytest.fixture
def store():
    st_ = Store(1 << 20, 4096)
    yield st_
    st_.close()


def python_replies(store: Store, ns, data: bytes) -> bytes:
    """What LenderServer._reply_get sends for these frames, built the Python way."""
    out = []
    for rid, keys in p.py_parse_gets(data):
        values = []
        room = p.MAX_PAYLOAD - 2
        for k in keys:
            v = store.get_parts(ns, k, False)
            if v is not None:
                size = len(v[0]) + len(v[1]) + 5
                v, room = (None, room) if size > room else (v, room - size)
            room -= v is None
            values.append(v)
        out.append(b"".join(p.get_reply_parts(rid, values)))
    return b"".join(out)


def test_serve_gets_builds_the_replies_the_python_path_builds(store: Store) -> None:
    ns = store.namespace(b"client")
    for i in range(20):
        store.put(ns, b"key%d" % i, os.urandom(4096 + (i % 3) * 10))  # some with a tail
    c = p.ClientConnection(b"k" * 32, b"c")
    data = c.send_get([b"key1", b"nope", b"key2"], 5) + c.send_get([b"key19"], 6)
    data += c.send_get([b"key%d" % i for i in range(20)], 7)
    rest, hits, asked = lib.serve_gets(-1, data, ns.entries, store.arena.view, 4096, False)
    assert rest == python_replies(store, ns, data)
    assert asked == 24 and hits == [b"key1", b"key2", b"key19"] + [b"key%d" % i for i in range(20)]
    [reply] = c._frames.split(rest)[:1]
    assert p.py_decode_values(reply[2])[1] is None


def test_serve_gets_sends_and_reports_missing_what_overflows_a_frame() -> None:
    big = Store(8 << 20, 64 << 10)
    try:
        ns = big.namespace(b"c")
        keys = [b"b%d" % i for i in range(70)]  # 70 x 64 KiB > the 4 MiB frame limit
        for k in keys:
            assert big.put(ns, k, b"\xab" * (64 << 10))
        c = p.ClientConnection(b"k" * 32, b"c")
        data = c.send_get(keys, 9)
        a, b = socket.socketpair()
        try:
            b.setblocking(False)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            rest, hits, _ = lib.serve_gets(a.fileno(), data, ns.entries, big.arena.view,
                                               64 << 10, True)  # fmt: skip
            got = bytearray()
            while True:
                try:
                    got += b.recv(1 << 20)
                except BlockingIOError:
                    break
            whole = bytes(got) + rest
            assert whole == python_replies(big, ns, data)
            values = p.py_decode_values(memoryview(whole)[p.HEADER_SIZE :])
            assert 0 < len(hits) < 70 and values.count(None) == 70 - len(hits)
        finally:
            a.close()
            b.close()
    finally:
        big.close()


@FUZZ
@given(st.binary(max_size=200))
def test_serve_gets_takes_only_what_parse_gets_takes(data: bytes) -> None:
    s = Store(1 << 20, 4096)
    try:
        ns = s.namespace(b"c")
        r = lib.serve_gets(-1, data, ns.entries, s.arena.view, 4096, False)
        parsed = p.py_parse_gets(data)
        assert (r is None) == (parsed is None or parsed == [])
    finally:
        s.close()


# ---- the lender's recv_put ---------------------------------------------------------


def recv_put_outcome(fn, frame: bytes, first: int, cap: int, eof: bool) -> tuple:
    """What `fn` (recv_put or py_recv_put) ends with while a PUT frame arrives: its
    first `first` bytes already in the buffer (of `cap` bytes), the rest coming on
    the socket (then an end of file if `eof`): the items (values as bytes; views of
    the buffer are required), the error, or the end of file."""
    a, b = socket.socketpair()
    a.setblocking(False)
    # With eof nothing follows the frame: "tail" would be the 4 bytes that complete it.
    rest = frame[first:] + (b"" if eof else b"tail")
    sender = threading.Thread(target=send_then_close, args=(b, rest, eof))
    sender.start()
    try:
        buf = bytearray(cap)
        buf[:first] = frame[:first]
        size, got = len(frame) + (4 if eof else 0), first  # eof: the frame never completes
        while True:
            try:
                new, items = fn(a, buf, got, size)
            except (p.ProtocolError, ValueError) as e:
                return type(e).__name__, str(e)
            if items is not None:
                assert all(type(v) is memoryview and v.obj is buf for _, v in items)
                a.settimeout(2.0)
                assert a.recv(8) == b"tail"  # what follows the frame is left unread
                return new, [(k, bytes(v)) for k, v in items]
            if new < 0:
                return new, None
            assert got <= new < size
            got = new
            select.select([a], [], [], 2.0)
    finally:
        sender.join()
        a.close()
        b.close()


def send_then_close(b: socket.socket, data: bytes, eof: bool) -> None:
    b.sendall(data)
    if eof:
        b.shutdown(socket.SHUT_WR)


@FUZZ
@given(
    fuzz_native.inputs(),  # as a PUT payload: valid ones and garbage alike
    st.integers(p.HEADER_SIZE, 400),
    st.integers(0, 64),
    st.booleans(),
)
def test_recv_put_agrees_with_its_python_definition(
    payload: bytes, first: int, room: int, eof: bool
) -> None:
    frame = p.HEADER.pack(p.MAGIC, p.VERSION, p.MsgType.PUT, 0, 7, len(payload)) + payload
    first = min(first, len(frame))
    cap = len(frame) + 4 + room
    said = recv_put_outcome(lib.recv_put, frame, first, cap, eof)
    assert said == recv_put_outcome(py_recv_put, frame, first, cap, eof)
    if eof:
        assert said == (-1, None) or said[0] in ("ProtocolError", "ValueError")


def test_recv_put_decodes_a_frame_of_16k_blocks_as_views_of_its_buffer() -> None:
    c = p.ClientConnection(b"k" * 32, b"c")
    items = [(b"b%d" % i, os.urandom(16384 + 29)) for i in range(32)]
    frame = c.send_put(items, 3)
    for fn in (lib.recv_put, py_recv_put):
        assert recv_put_outcome(fn, frame, 1000, len(frame), False) == (len(frame), items)


def test_recv_put_refuses_bad_arguments_as_its_definition_does(pair) -> None:
    a, _ = pair
    for fn in (lib.recv_put, py_recv_put):
        for buf, got, size in ((bytearray(20), 0, 21), (bytearray(20), 15, 14),
                               (bytearray(20), 16, 15), (bytearray(20), -1, 20)):  # fmt: skip
            with pytest.raises(ValueError):
                fn(a, buf, got, size)
        assert fn(a, bytearray(20), 14, 20) == (14, None)  # nothing there yet
    with pytest.raises(OSError):  # a closed socket: as recv_into would say
        s = socket.socket()
        s.close()
        lib.recv_put(s, bytearray(20), 14, 20)
    for fn in (lib.recv_put, py_recv_put):
        with pytest.raises((BufferError, TypeError)):  # the buffer must be writable
            fn(a, b"x" * 20, 14, 20)


# ---- the client's get_one ------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def serve_once(b: socket.socket, reply: bytes, delay: float = 0.0, close: bool = False) -> None:
    def run() -> None:
        b.recv(4096)
        time.sleep(delay)
        if reply:
            b.sendall(reply)
        if close:
            b.shutdown(socket.SHUT_WR)

    threading.Thread(target=run, daemon=True).start()


def get_one(a: socket.socket, rid: int, deadline: float) -> tuple:
    return lib.get_one(a.fileno(), rid, b"k", bytearray(4096), deadline, 0.0, 0.0)


def reply(rid: int, values) -> bytes:
    return p.ServerConnection(b"k" * 32).send_get_reply(rid, values)


@pytest.mark.parametrize("spin", [0.0, 0.0002])
def test_get_one_returns_the_value_or_none(pair, spin: float) -> None:
    a, b = pair
    buf = bytearray(p.HEADER_SIZE + 7 + 70000)
    serve_once(b, reply(3, [b"v" * 65000]), delay=0.001)
    status, value, _, _ = lib.get_one(a.fileno(), 3, b"key", buf, time.monotonic() + 2, spin, 0.0)
    assert (status, value) == (lib.GOT_VALUE, b"v" * 65000)
    serve_once(b, reply(4, [None]))
    assert lib.get_one(a.fileno(), 4, b"key", buf, time.monotonic() + 2, spin, 0.0)[:2] == (
        lib.GOT_NONE,
        None,
    )


def test_get_one_into_a_memoryview_returns_a_view_of_it(pair) -> None:
    a, b = pair
    buf = bytearray(p.HEADER_SIZE + 7 + 100)
    serve_once(b, reply(5, [b"w" * 100]))
    status, value, _, _ = lib.get_one(
        a.fileno(), 5, b"key", memoryview(buf), time.monotonic() + 2, 0.0, 0.0
    )
    assert status == lib.GOT_VALUE and type(value) is memoryview and value == b"w" * 100
    buf[-1:] = b"z"  # no copy: the value is the buffer's last 100 bytes
    assert value[-1:] == b"z"


@pytest.mark.parametrize(
    "answer",
    [
        reply(9, [b"x"]),  # another request's reply
        reply(3, [b"x", None]),  # two values
        p.ServerConnection(b"k" * 32).send_error(3, 3, "busy"),
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        reply(3, [b"x"]) + b"extra",
    ],
)
def test_get_one_hands_anything_else_to_python_with_the_bytes(pair, answer: bytes) -> None:
    a, b = pair
    serve_once(b, answer)
    status, data, _, _ = get_one(a, 3, time.monotonic() + 2)
    assert status == lib.NOT_FAST
    assert answer.startswith(data) and data


def test_get_one_times_out_and_reports_a_closed_peer(pair) -> None:
    a, b = pair
    t0 = time.monotonic()
    status, data, _, _ = get_one(a, 1, t0 + 0.05)
    assert status == lib.TIMED_OUT and data == b""
    assert 0.05 <= time.monotonic() - t0 < 1.0
    # A truncated frame that stops coming: the bytes go to Python, which waits on.
    serve_once(b, reply(2, [b"x" * 100])[:20])
    status, data, _, _ = get_one(a, 2, time.monotonic() + 0.05)
    assert status == lib.NOT_FAST and len(data) == 20
    serve_once(b, b"", close=True)
    assert get_one(a, 3, time.monotonic() + 2)[0] == (lib.CLOSED)


def test_get_one_reads_a_reply_that_came_while_the_caller_was_late(pair) -> None:
    a, b = pair
    b_reply = reply(5, [b"late"])
    b.sendall(b_reply)  # there before the call: a deadline already past is no time-out
    status, value, _, late = get_one(a, 5, time.monotonic() - 1)
    assert (status, value, late) == (lib.GOT_VALUE, b"late", True)


def test_get_one_waits_without_the_gil(pair) -> None:
    a, _ = pair
    ticks = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    try:
        lib.get_one(a.fileno(), 1, b"k", bytearray(4096), time.monotonic() + 0.2, 0.2, 0.0)
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 20  # the other thread ran all along (about 200 ticks)


# ---- the client's multi-block wait: recv_values ---------------------------------------


def recv_values(a: socket.socket, rid: int, n: int, deadline: float, size: int = 1 << 16):
    return lib.recv_values(a.fileno(), rid, n, memoryview(bytearray(size)), deadline, 0.0)


@pytest.mark.parametrize("spin", [0.0, 0.0002])
def test_recv_values_returns_views_of_the_values(pair, spin: float) -> None:
    a, b = pair
    values = [b"a" * 16384, None, b"", b"c" * 100]
    b.sendall(reply(8, values))
    buf = memoryview(bytearray(p.HEADER_SIZE + 2 + 4 * (5 + 16384)))
    status, got, _, late = lib.recv_values(a.fileno(), 8, 4, buf, time.monotonic() + 2, spin)
    assert (status, got, late) == (lib.GOT_VALUE, values, False)
    assert all(v is None or type(v) is memoryview for v in got)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.binary(max_size=300)), min_size=1, max_size=6),
    st.one_of(st.just(0), st.integers(1, 2000)),  # bytes cut off the end
    st.integers(0, 7),
)
def test_recv_values_agrees_with_the_python_decoder(values, cut: int, rid: int) -> None:
    """A whole reply for this request with the right count: the values; anything
    else (cut short, another request, another count) goes to Python as bytes."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        whole = reply(rid, values)
        frame = whole[: max(1, len(whole) - cut)]
        b.sendall(frame)
        status, got, _, _ = recv_values(a, 3, len(values), time.monotonic() + 0.02)
        if frame == whole and rid == 3:
            assert (status, got) == (lib.GOT_VALUE, values)
        else:
            assert status == lib.NOT_FAST and got == frame
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "answer",
    [
        reply(3, [b"x"]),  # one value for two keys
        p.ServerConnection(b"k" * 32).send_error(3, 3, "busy"),
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        reply(3, [b"x", None]) + b"extra",
    ],
)
def test_recv_values_hands_anything_else_to_python(pair, answer: bytes) -> None:
    a, b = pair
    b.sendall(answer)
    status, data, _, _ = recv_values(a, 3, 2, time.monotonic() + 2)
    assert status == lib.NOT_FAST and answer.startswith(data) and data


def test_recv_values_times_out_reports_eof_and_bigger_frames(pair) -> None:
    a, b = pair
    t0 = time.monotonic()
    assert recv_values(a, 1, 1, t0 + 0.05)[:2] == (lib.TIMED_OUT, b"")
    assert 0.05 <= time.monotonic() - t0 < 1.0
    big = reply(2, [b"x" * 5000])  # more than the buffer holds: Python reads it
    b.sendall(big)
    status, data, _, _ = recv_values(a, 2, 1, time.monotonic() + 2, size=1000)
    assert status == lib.NOT_FAST and big.startswith(data) and len(data) == 1000
    a.recv(1 << 16)
    b.shutdown(socket.SHUT_WR)
    assert recv_values(a, 3, 1, time.monotonic() + 2)[0] == lib.CLOSED
    with pytest.raises(ValueError):
        lib.recv_values(a.fileno(), 1, 0, memoryview(bytearray(64)), 0.0, 0.0)
    with pytest.raises(ValueError):  # the values would be copies: a view is required
        lib.recv_values(a.fileno(), 1, 1, bytearray(64), 0.0, 0.0)


def test_bad_arguments_are_errors_not_crashes(pair) -> None:
    a, _ = pair
    with pytest.raises(ValueError):
        lib.get_one(a.fileno(), 1, b"", bytearray(64), 0.0, 0.0, 0.0)
    with pytest.raises(OSError):  # a closed socket's fileno(): as recv() would say
        lib.get_one(-1, 1, b"k", bytearray(64), 0.0, 0.0, 0.0)
    with pytest.raises(OSError):
        lib.recv_serve(-1, {}, bytearray(4096), 4096, True)
    with pytest.raises(BufferError):
        lib.get_one(a.fileno(), 1, b"k", b"read-only", 0.0, 0.0, 0.0)
    with pytest.raises(TypeError):
        lib.serve_gets(-1, b"", [], b"", 4096, False)
    with pytest.raises(OSError):
        c = p.ClientConnection(b"k" * 32, b"c")
        lib.serve_gets(10**6, c.send_get([b"k"], 1), {}, bytearray(4096), 4096, True)


def test_recv_serve_serves_hands_over_or_reports_eof(store: Store, pair) -> None:
    a, b = pair
    ns = store.namespace(b"client")
    store.put(ns, b"key", b"v" * 4096)
    args = (ns.entries, store.arena.view, 4096, True)
    assert lib.recv_serve(a.fileno(), *args) == (None, None)  # nothing there yet
    c = p.ClientConnection(b"k" * 32, b"c")
    b.sendall(c.send_get([b"key", b"nope"], 3))
    time.sleep(0.05)
    data, (rest, hits, asked) = lib.recv_serve(a.fileno(), *args)
    assert (data, rest, hits, asked) == (None, b"", [b"key"], 2)
    assert b.recv(8192) == reply(3, [b"v" * 4096, None])
    b.sendall(b"GET / HTTP/1.1\r\n")  # not GET frames: the bytes go back to Python
    time.sleep(0.05)
    assert lib.recv_serve(a.fileno(), *args) == (b"GET / HTTP/1.1\r\n", None)
    b.close()
    time.sleep(0.05)
    assert lib.recv_serve(a.fileno(), *args) == (b"", None)


def test_the_lender_gets_its_budget_from_the_send_not_from_the_deadline(pair) -> None:
    a, b = pair
    # The caller's deadline passed before it sent (a thread descheduled in between):
    # the lender still gets `budget` seconds from the send, and a timely answer is a hit.
    serve_once(b, reply(6, [b"v"]), delay=0.01)
    status, value, _, late = lib.get_one(
        a.fileno(), 6, b"k", bytearray(4096), time.monotonic() - 0.05, 0.0, 0.5
    )
    assert (status, value, late) == (lib.GOT_VALUE, b"v", False)
    # Without a budget the same call gives up at once, and says it ended late.
    status, _, _, late = lib.get_one(
        a.fileno(), 7, b"k", bytearray(4096), time.monotonic() - 0.05, 0.0, 0.0
    )
    assert (status, late) == (lib.TIMED_OUT, True)
