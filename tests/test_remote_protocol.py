"""The sans-I/O wire protocol: round trips, handshake, and fuzzing the parser."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlend import native
from memlend.remote import protocol as p

KEY = b"k" * 32


def handshake(
    client_key: bytes = KEY, server_key: bytes = KEY
) -> tuple[p.ClientConnection, p.ServerConnection]:
    c = p.ClientConnection(client_key, b"client-a")
    s = p.ServerConnection(server_key)
    [hello] = s.receive_data(c.send_hello())
    assert hello == p.Hello(0, b"client-a")
    [ver] = c.receive_data(s.send_challenge())
    assert isinstance(ver, p.ServerVerified)
    [auth] = s.receive_data(c.send_auth())
    assert auth == p.Authenticated(0, b"client-a")
    [ok] = c.receive_data(s.send_auth_ok(65600))
    assert ok == p.AuthOk(0, 65600, p.MAX_KEYS)
    assert c.authenticated and s.authenticated
    return c, s


def test_requests_and_replies_round_trip() -> None:
    c, s = handshake()
    keys = [b"a", b"b" * 64, bytes(range(16))]
    assert s.receive_data(c.send_get(keys, 7)) == [p.GetRequest(7, keys)]
    items = [(b"a", b"x" * 5000), (b"b", b"")]
    assert s.receive_data(c.send_put(items, 8)) == [p.PutRequest(8, items)]
    assert s.receive_data(c.send_invalidate(keys, 9)) == [
        p.InvalidateRequest(9, p.InvalidateMode.KEYS, keys)
    ]
    assert s.receive_data(c.send_invalidate_prefix(b"fi", 10)) == [
        p.InvalidateRequest(10, p.InvalidateMode.PREFIX, [b"fi"])
    ]
    assert s.receive_data(c.send_invalidate_all(11)) == [
        p.InvalidateRequest(11, p.InvalidateMode.ALL, [])
    ]
    assert s.receive_data(c.send_stats(12)) == [p.StatsRequest(12)]
    assert s.receive_data(c.send_ping(b"hi", 13)) == [p.Ping(13, b"hi")]

    values = [b"v" * 100, None, memoryview(b"mv")]
    assert c.receive_data(s.send_get_reply(7, values)) == [p.GetReply(7, [b"v" * 100, None, b"mv"])]
    assert c.receive_data(s.send_ack(8, 2)) == [p.Ack(8, 2)]
    assert c.receive_data(s.send_stats_reply(12, {"a": 1})) == [p.StatsReply(12, {"a": 1})]
    assert c.receive_data(s.send_pong(13, b"hi")) == [p.Pong(13, b"hi")]
    assert c.receive_data(s.send_error(14, 3, "busy")) == [p.ErrorReply(14, 3, "busy")]


def test_several_frames_in_one_chunk_and_byte_by_byte() -> None:
    c, s = handshake()
    data = c.send_get([b"x"], 1) + c.send_ping(b"", 2) + c.send_stats(3)
    assert [e.request_id for e in s.receive_data(data)] == [1, 2, 3]
    events = []
    for i in range(len(data)):
        events += s.receive_data(data[i : i + 1])
    assert [e.request_id for e in events] == [1, 2, 3]


def test_wrong_secret_fails_on_both_sides() -> None:
    # The client detects a lender without the secret before proving anything.
    c = p.ClientConnection(KEY, b"a")
    s = p.ServerConnection(b"x" * 32)
    s.receive_data(c.send_hello())
    with pytest.raises(p.AuthError):
        c.receive_data(s.send_challenge())
    # A client without the secret: it cannot compute the lender's proof, so it can
    # only send a guess; the lender refuses it.
    s = p.ServerConnection(KEY)
    s.receive_data(p.ClientConnection(b"y" * 32, b"a").send_hello())
    forged = p.encode_frame(p.MsgType.AUTH, 0, b"\0" * 32)
    with pytest.raises(p.AuthError):
        s.receive_data(forged)
    with pytest.raises(p.ProtocolError):  # dead for good
        s.receive_data(b"")


CLIENT_KEYS = {b"client-a": KEY, b"client-b": b"b" * 32}


def test_per_client_keys_bind_the_namespace_to_the_key() -> None:
    # Each client authenticates with its own key, under its own name.
    for name, key in CLIENT_KEYS.items():
        c = p.ClientConnection(key, name)
        s = p.ServerConnection(CLIENT_KEYS.get)
        s.receive_data(c.send_hello())
        c.receive_data(s.send_challenge())
        [auth] = s.receive_data(c.send_auth())
        assert auth == p.Authenticated(0, name)
    # client-a's key under client-b's name (claiming its namespace), and an unknown
    # name: both fail on the client's side like a wrong secret, before it proves anything.
    for key, name in ((KEY, b"client-b"), (KEY, b"nobody")):
        c = p.ClientConnection(key, name)
        s = p.ServerConnection(CLIENT_KEYS.get)
        s.receive_data(c.send_hello())
        with pytest.raises(p.AuthError, match="wrong secret"):
            c.receive_data(s.send_challenge())
    # A forged proof for another client's name is refused by the server.
    s = p.ServerConnection(CLIENT_KEYS.get)
    s.receive_data(p.ClientConnection(KEY, b"client-b").send_hello())
    with pytest.raises(p.AuthError):
        s.receive_data(p.encode_frame(p.MsgType.AUTH, 0, b"\0" * 32))


def test_requests_before_authentication_are_refused() -> None:
    c = p.ClientConnection(KEY, b"a")
    with pytest.raises(p.ProtocolError):
        p.ServerConnection(KEY).receive_data(c.send_get([b"k"]))
    s = p.ServerConnection(KEY)
    s.receive_data(c.send_hello())
    with pytest.raises(p.ProtocolError):
        s.receive_data(c.send_get([b"k"]))


@pytest.mark.parametrize(
    "frame",
    [
        b"GET / HTTP/1.1\r\n",  # garbage: refused on its first bytes
        b"ML\x02",  # future version
        p.HEADER.pack(p.MAGIC, 1, 0x55, 0, 0, 0),  # unknown type
        p.HEADER.pack(p.MAGIC, 1, p.MsgType.PING, 1, 0, 0),  # reserved flags
        p.HEADER.pack(p.MAGIC, 1, p.MsgType.HELLO, 0, 0, 0xFFFFFFFF),  # huge length
        p.encode_frame(p.MsgType.HELLO, 0, b"short"),  # truncated payload
        p.encode_frame(p.MsgType.HELLO, 0, b"n" * 32, b"\x00"),  # empty client id
        p.encode_frame(p.MsgType.HELLO, 0, b"n" * 32, b"\x01ab"),  # trailing byte
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.ServerConnection(KEY).receive_data(frame)


def test_huge_length_is_refused_before_the_payload_arrives() -> None:
    _, s = handshake()
    header = p.HEADER.pack(p.MAGIC, 1, p.MsgType.PUT, 0, 1, p.MAX_PAYLOAD + 1)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        s.receive_data(header)


def test_send_side_checks_its_arguments() -> None:
    c, _ = handshake()
    with pytest.raises(ValueError):
        c.send_get([b""])
    with pytest.raises(ValueError):
        c.send_get([b"k"] * (p.MAX_KEYS + 1))
    with pytest.raises(ValueError):
        c.send_put([(b"k", b"x" * (p.MAX_PAYLOAD + 1))])


# ---- fuzzing -------------------------------------------------------------------------


def _valid_client_frames() -> list[bytes]:
    c, _ = handshake()
    return [
        c.send_get([b"key1", b"key2" * 8], 1),
        c.send_put([(b"key1", b"v" * 300), (b"k2", b"")], 2),
        c.send_invalidate([b"key1"], 3),
        c.send_invalidate_prefix(b"pre", 4),
        c.send_invalidate_all(5),
        c.send_stats(6),
        c.send_ping(b"abc", 7),
    ]


def _valid_server_frames() -> list[bytes]:
    _, s = handshake()
    return [
        s.send_get_reply(1, [b"x" * 40, None]),
        s.send_ack(2, 5),
        s.send_stats_reply(3, {"blocks": 1}),
        s.send_pong(4, b"abc"),
        s.send_error(5, 1, "bad"),
    ]


CLIENT_FRAMES = _valid_client_frames()
SERVER_FRAMES = _valid_server_frames()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_never_crashes(conn: p._Connection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except p.ProtocolError as e:
            # Raised by the checks themselves, not by the catch-all for decoder bugs.
            assert e.__cause__ is None, repr(e.__cause__)
            return


def _targets() -> list[p._Connection]:
    c, s = handshake()
    # A lender with a list of clients: the key is looked up by the HELLO's client id.
    keyed = p.ServerConnection(CLIENT_KEYS.get)
    return [p.ServerConnection(KEY), s, c, keyed, _keyed_hello_received()]


def _keyed_hello_received() -> p.ServerConnection:
    s = p.ServerConnection(CLIENT_KEYS.get)
    s.receive_data(p.ClientConnection(KEY, b"client-a").send_hello())
    return s


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_fuzz_random_bytes(chunks: list[bytes]) -> None:
    for conn in _targets():
        _feed_never_crashes(conn, chunks)


@FUZZ
@given(
    st.sampled_from(CLIENT_FRAMES + SERVER_FRAMES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 20),
)
def test_fuzz_mutated_valid_frames(frame: bytes, edits: list, cut: int) -> None:
    data = bytearray(frame)
    for pos, val in edits:
        data[pos % len(data)] = val
    data = data[: len(data) - cut] if cut < len(data) else data
    for conn in _targets():
        _feed_never_crashes(conn, [bytes(data)])


@FUZZ
@given(st.data())
def test_fuzz_valid_frames_split_anywhere_decode_the_same(data: st.DataObject) -> None:
    for frames, side in ((CLIENT_FRAMES, 1), (SERVER_FRAMES, 0)):
        picked = data.draw(st.lists(st.sampled_from(frames), min_size=1, max_size=5))
        stream = b"".join(picked)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        whole = handshake()[side].receive_data(stream)
        conn = handshake()[side]
        events, prev = [], 0
        for cut in [*cuts, len(stream)]:
            events += conn.receive_data(stream[prev:cut])
            prev = cut
        assert events == whole
        assert len(events) == len(picked)
        assert conn.buffered == 0


# ---- the lender's GET fast path ------------------------------------------------------


def test_get_reply_parts_are_the_same_frame_as_send_get_reply() -> None:
    _, s = handshake()
    stored = [(memoryview(b"s" * 70), b"tail"), None, (b"", b"")]
    joined = b"".join(p.get_reply_parts(9, stored))
    assert joined == s.send_get_reply(9, [b"s" * 70 + b"tail", None, b""])


def test_receive_gets_only_on_a_ready_connection_with_nothing_buffered() -> None:
    c, s = handshake()
    frames = c.send_get([b"a", b"b"], 1) + c.send_get([b"c"], 2)
    assert s.receive_gets(frames) == [(1, [b"a", b"b"]), (2, [b"c"])]
    assert s.receive_gets(frames[:-1]) is None  # a partial frame: the general path
    assert s.receive_gets(frames + c.send_ping(b"", 3)) is None  # not only GETs
    assert p.ServerConnection(KEY).receive_gets(frames) is None  # not authenticated
    s.receive_data(frames[:5])
    assert s.receive_gets(frames) is None  # a frame is half received


@FUZZ
@given(
    st.lists(st.lists(st.binary(min_size=0, max_size=70), max_size=4), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 5),
)
def test_fuzz_receive_gets_agrees_with_receive_data(keysets: list, edits: list, cut: int) -> None:
    c, _ = handshake()
    data = bytearray()
    for i, keys in enumerate(keysets):
        ok = [k for k in keys if 0 < len(k) <= p.MAX_KEY_LEN]
        data += c.send_get(ok, i)
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[: len(data) - cut] if cut < len(data) else data)
    fast = handshake()[1].receive_gets(data)
    try:
        events = handshake()[1].receive_data(data)
    except p.ProtocolError:
        assert fast is None  # anything refused is left to receive_data
        return
    if fast is not None:
        assert [p.GetRequest(rid, keys) for rid, keys in fast] == events


# ---- the client's one-value fast path ------------------------------------------------


def test_one_key_get_is_the_same_frame_as_the_general_encoder() -> None:
    c, _ = handshake()
    for key in (b"k", b"x" * 64, bytes(range(32))):
        assert c.send_get([key], 77) == p.encode_frame(p.MsgType.GET, 77, *p._encode_keys([key]))


def test_receive_value_reads_one_value_and_leaves_the_rest_to_receive_data() -> None:
    c, s = handshake()
    found, missing = s.send_get_reply(5, [b"v" * 100]), s.send_get_reply(6, [None])
    assert bytes(c.receive_value(found, 5)) == b"v" * 100
    assert c.receive_value(missing, 6) is None
    for data, rid in (
        (found, 6),  # another request's reply
        (found[:-1], 5),  # not all of it yet
        (found + missing, 5),  # more than one frame
        (s.send_get_reply(5, [b"a", b"b"]), 5),  # more than one value
        (s.send_ack(5, 1), 5),  # another type
    ):
        assert c.receive_value(data, rid) is p.NOT_FAST
    assert p.ClientConnection(KEY, b"a").receive_value(found, 5) is p.NOT_FAST  # no handshake


@FUZZ
@given(
    st.one_of(st.none(), st.binary(max_size=300)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 5),
)
def test_fuzz_receive_value_agrees_with_receive_data(value, edits: list, cut: int) -> None:
    _, s = handshake()
    data = bytearray(s.send_get_reply(3, [value]))
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[: len(data) - cut] if cut < len(data) else data)
    fast = handshake()[0].receive_value(data, 3)
    if fast is p.NOT_FAST:
        return
    [ev] = handshake()[0].receive_data(data)  # whatever the fast path took, this takes too
    assert ev == p.GetReply(3, [None if fast is None else bytes(fast)])


@pytest.mark.skipif(os.environ.get(native.ENV) == "0", reason="the Python path was asked for")
def test_the_native_hot_path_is_built() -> None:
    # `make install` compiles it; the build is optional for users, not for CI.
    assert native.lib is not None, native.description
