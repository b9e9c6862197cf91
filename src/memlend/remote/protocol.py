"""The memlend remote-tier wire protocol, as pure bytes-in, events-out code.

No sockets here (h11/wsproto style): each side owns a connection object, feeds it
whatever bytes arrived with `receive_data()`, gets a list of events back, and
calls `send_*()` methods that return the bytes to write. Anything malformed
received from the peer raises `ProtocolError` (never another exception); after
that the connection is dead and every later call raises it again. Bad arguments
given to a `send_*()` method by the local program raise ValueError.

Frame (all integers big-endian)::

    magic "ML" | version u8 | type u8 | flags u16 (0) | request id u32 | length u32 | payload

Handshake (mutual HMAC-SHA256 challenge-response over the shared auth key)::

    client -> HELLO      client nonce (32) | id length u8 | client id
    server -> CHALLENGE  server nonce (32) | HMAC(key, "server" | id | cnonce | snonce)
    client -> AUTH       HMAC(key, "client" | id | cnonce | snonce)
    server -> AUTH_OK    max value length u32 | max keys u16

The client checks the server's proof before proving itself, so a fake lender
learns nothing it can replay; both proofs cover both fresh nonces and have
distinct labels, so neither can be reflected. The client id names the client's
namespace on the lender. A lender with a list of clients looks the key up by the
client id (its name), so a namespace is bound to the key that authenticated it;
an unknown name gets a random key, and fails exactly like a wrong key.

Requests (the reply carries the request's id)::

    GET        n u16 | n x (klen u8 | key)                      -> GET_REPLY
    GET_REPLY  n u16 | n x (0 | 1 vlen u32 value)               (in request order)
    PUT        n u16 | n x (klen u8 | key | vlen u32 | value)  -> ACK (keys stored)
    INVALIDATE mode u8: 0 keys (n u16 | keys) / 1 prefix (plen u8 | prefix)
               / 2 whole namespace                              -> ACK (keys removed)
    STATS      empty                                            -> STATS_REPLY (JSON object)
    PING       up to 64 bytes                                   -> PONG (same bytes)
    ERROR      code u16 | UTF-8 message                         (server -> client)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from memlend.native import lib as _native

VERSION = 1
MAGIC = b"ML"
HEADER = struct.Struct(">2sBBHII")
HEADER_SIZE = HEADER.size  # 14
MAX_PAYLOAD = 4 << 20  # a batch of 32 sealed 64 KiB blocks fits with room to spare
MAX_KEYS = 256
MAX_KEY_LEN = 64
MAX_CLIENT_ID = 64
MAX_PING = 64
NONCE_LEN = 32
MAC_LEN = 32

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_AUTH_OK = struct.Struct(">IH")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; close the connection."""


class AuthError(ProtocolError):
    """The peer does not know the shared secret (or replayed someone else's proof)."""


class MsgType(enum.IntEnum):
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    AUTH_OK = 0x04
    GET = 0x10
    GET_REPLY = 0x11
    PUT = 0x12
    INVALIDATE = 0x13
    ACK = 0x14
    STATS = 0x20
    STATS_REPLY = 0x21
    PING = 0x30
    PONG = 0x31
    ERROR = 0x7F


class InvalidateMode(enum.IntEnum):
    KEYS = 0
    PREFIX = 1
    ALL = 2


_T_GET, _T_GET_REPLY, _T_ERROR = int(MsgType.GET), int(MsgType.GET_REPLY), int(MsgType.ERROR)
# The fixed head of a frame (magic, version, type, no flags), its id and length, and a
# one-key GET: the remote tier's hot path packs and checks these in one step.
_GET_HEAD = MAGIC + bytes((VERSION, _T_GET, 0, 0))
_REPLY_HEAD = MAGIC + bytes((VERSION, _T_GET_REPLY, 0, 0))
_PUT_HEAD = MAGIC + bytes((VERSION, int(MsgType.PUT), 0, 0))
_RID_LEN = struct.Struct(">II")
_GET1 = struct.Struct(">6sIIBBB")
NOT_FAST = object()  # receive_value(): "not the common case, use receive_data"


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    AUTH = 2
    BUSY = 3
    INTERNAL = 4


# ---- events ------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    request_id: int


@dataclass(slots=True)
class Hello(Event):
    client_id: bytes


@dataclass(slots=True)
class ServerVerified(Event):
    """The server proved it knows the secret; the client should now send_auth()."""


@dataclass(slots=True)
class Authenticated(Event):
    """Server side: the client proved it knows the secret; reply with send_auth_ok()."""

    client_id: bytes


@dataclass(slots=True)
class AuthOk(Event):
    max_value: int
    max_keys: int


@dataclass(slots=True)
class GetRequest(Event):
    keys: list[bytes]


@dataclass(slots=True)
class GetReply(Event):
    values: list[bytes | None]


@dataclass(slots=True)
class PutRequest(Event):
    items: list[tuple[bytes, bytes | memoryview]]  # values: views of the received frame


@dataclass(slots=True)
class InvalidateRequest(Event):
    mode: InvalidateMode
    keys: list[bytes]  # KEYS: the keys; PREFIX: [prefix]; ALL: []


@dataclass(slots=True)
class Ack(Event):
    count: int


@dataclass(slots=True)
class StatsRequest(Event):
    pass


@dataclass(slots=True)
class StatsReply(Event):
    stats: dict


@dataclass(slots=True)
class Ping(Event):
    data: bytes


@dataclass(slots=True)
class Pong(Event):
    data: bytes


@dataclass(slots=True)
class ErrorReply(Event):
    code: int
    message: str


# ---- framing -----------------------------------------------------------------


def encode_frame(mtype: MsgType, request_id: int, *parts: bytes | memoryview) -> bytes:
    length = sum(len(p) for p in parts)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")
    if not 0 <= request_id <= 0xFFFFFFFF:
        raise ValueError(f"request id {request_id} out of range")
    return b"".join((HEADER.pack(MAGIC, VERSION, mtype, 0, request_id, length), *parts))


class _Reader:
    """Bounds-checked cursor over one payload; every overrun is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("truncated message")
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def key(self, what: str = "key") -> bytes:
        n = self.u8()
        if not 1 <= n <= MAX_KEY_LEN:
            raise ProtocolError(f"{what} length {n} outside 1..{MAX_KEY_LEN}")
        return self.take(n)

    def count(self) -> int:
        n = self.u16()
        if n > MAX_KEYS:
            raise ProtocolError(f"{n} keys in one message (at most {MAX_KEYS})")
        return n

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after message")


def _check_keys(keys: Sequence[bytes]) -> None:
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{len(keys)} keys in one message (at most {MAX_KEYS})")
    for k in keys:
        if not 1 <= len(k) <= MAX_KEY_LEN:
            raise ValueError(f"key length {len(k)} outside 1..{MAX_KEY_LEN}")


def _encode_keys(keys: Sequence[bytes]) -> list[bytes]:
    _check_keys(keys)
    parts = [_U16.pack(len(keys))]
    for k in keys:
        parts.append(_U8.pack(len(k)))
        parts.append(bytes(k))
    return parts


# GET and GET_REPLY are the remote tier's hot path: decoded without _Reader, with the
# same checks (tests/test_remote_protocol.py fuzzes both against the same rules).


def _count(payload: memoryview) -> tuple[int, int]:
    """(size, item count) of a GET, GET_REPLY or PUT payload, the count checked."""
    size = len(payload)
    if size < 2:
        raise ProtocolError("truncated message")
    n = _U16.unpack_from(payload)[0]
    if n > MAX_KEYS:
        raise ProtocolError(f"{n} keys in one message (at most {MAX_KEYS})")
    return size, n


def _decode_keys(payload: memoryview) -> list[bytes]:
    size, n = _count(payload)
    keys, pos = [], 2
    for _ in range(n):
        if pos >= size:
            raise ProtocolError("truncated message")
        klen = payload[pos]
        if not 1 <= klen <= MAX_KEY_LEN:
            raise ProtocolError(f"key length {klen} outside 1..{MAX_KEY_LEN}")
        pos += 1 + klen
        if pos > size:
            raise ProtocolError("truncated message")
        keys.append(bytes(payload[pos - klen : pos]))
    if pos != size:
        raise ProtocolError("trailing bytes after message")
    return keys


def _decode_values(payload: memoryview) -> list[bytes | None]:
    size, n = _count(payload)
    values: list[bytes | None] = []
    pos = 2
    for _ in range(n):
        if pos >= size:
            raise ProtocolError("truncated message")
        found = payload[pos]
        if found == 0:
            values.append(None)
            pos += 1
        elif found == 1:
            if pos + 5 > size:
                raise ProtocolError("truncated message")
            vlen = _U32.unpack_from(payload, pos + 1)[0]
            pos += 5 + vlen
            if pos > size:
                raise ProtocolError("truncated message")
            values.append(bytes(payload[pos - vlen : pos]))
        else:
            raise ProtocolError(f"bad found flag {found}")
    if pos != size:
        raise ProtocolError("trailing bytes after message")
    return values


def _decode_put(payload: memoryview) -> list[tuple[bytes, bytes | memoryview]]:
    """A PUT payload's (key, value) items, each value a slice of `payload` (a view:
    the store copies it once, into its slot)."""
    size, n = _count(payload)
    items: list[tuple[bytes, bytes | memoryview]] = []
    pos = 2
    for _ in range(n):
        if pos >= size:
            raise ProtocolError("truncated message")
        klen = payload[pos]
        if not 1 <= klen <= MAX_KEY_LEN:
            raise ProtocolError(f"key length {klen} outside 1..{MAX_KEY_LEN}")
        pos += 1 + klen
        if pos + 4 > size:  # the key or the value's length cut short
            raise ProtocolError("truncated message")
        key = bytes(payload[pos - klen : pos])
        vlen = _U32.unpack_from(payload, pos)[0]
        pos += 4 + vlen
        if pos > size:
            raise ProtocolError("truncated message")
        items.append((key, payload[pos - vlen : pos]))
    if pos != size:
        raise ProtocolError("trailing bytes after message")
    return items


def _decode(mtype: int, request_id: int, payload: memoryview) -> Event:
    """One payload -> one event; any malformation is a ProtocolError."""
    # The hot path first, compared as plain ints (an IntEnum attribute costs 0.13 µs).
    if mtype == _T_GET_REPLY:
        return GetReply(request_id, _decode_values(payload))
    if mtype == _T_GET:
        return GetRequest(request_id, _decode_keys(payload))
    r = _Reader(payload)
    ev: Event
    if mtype == MsgType.HELLO:
        r.take(NONCE_LEN)  # the connection re-reads the nonce; checked here for size
        cid = r.key("client id")
        ev = Hello(request_id, cid)
    elif mtype == MsgType.CHALLENGE or mtype == MsgType.AUTH:
        r.take(NONCE_LEN + MAC_LEN if mtype == MsgType.CHALLENGE else MAC_LEN)
        ev = Event(request_id)  # the connection does the crypto on the raw payload
    elif mtype == MsgType.AUTH_OK:
        max_value, max_keys = r.u32(), r.u16()
        ev = AuthOk(request_id, max_value, max_keys)
    elif mtype == MsgType.PUT:
        return PutRequest(request_id, _decode_put(payload))
    elif mtype == MsgType.INVALIDATE:
        try:
            mode = InvalidateMode(r.u8())
        except ValueError:
            raise ProtocolError("unknown invalidation mode") from None
        if mode == InvalidateMode.KEYS:
            keys = [r.key() for _ in range(r.count())]
        elif mode == InvalidateMode.PREFIX:
            n = r.u8()
            if n > MAX_KEY_LEN:
                raise ProtocolError("prefix too long")
            keys = [r.take(n)]
        else:
            keys = []
        ev = InvalidateRequest(request_id, mode, keys)
    elif mtype == MsgType.ACK:
        ev = Ack(request_id, r.u32())
    elif mtype == MsgType.STATS:
        ev = StatsRequest(request_id)
    elif mtype == MsgType.STATS_REPLY:
        try:
            stats = json.loads(bytes(payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("stats reply is not JSON") from None
        if not isinstance(stats, dict):
            raise ProtocolError("stats reply is not a JSON object")
        r.pos = len(payload)
        ev = StatsReply(request_id, stats)
    elif mtype == MsgType.PING or mtype == MsgType.PONG:
        if len(payload) > MAX_PING:
            raise ProtocolError("ping payload too long")
        data = r.take(len(payload))
        ev = Ping(request_id, data) if mtype == MsgType.PING else Pong(request_id, data)
    elif mtype == MsgType.ERROR:
        code = r.u16()
        msg = r.take(len(payload) - 2).decode("utf-8", "replace")
        ev = ErrorReply(request_id, code, msg)
    else:  # pragma: no cover - callers filter types first
        raise ProtocolError(f"unknown message type {mtype:#x}")
    r.end()
    return ev


class _FrameSplitter:
    """Splits received bytes into complete (type, request id, payload) frames.

    The common case costs no copy: bytes that arrive holding whole frames are sliced
    (memoryviews of the immutable chunk). Only a frame split across chunks is
    gathered in a buffer, and copied out once it is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def split(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int, memoryview]]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < HEADER_SIZE:
                _check_prefix(buf)
                return []
            length = _check_header(buf, 0)[2]
            if len(buf) < HEADER_SIZE + length:
                return []
            src = bytes(buf)
            buf.clear()
        else:
            src = data if type(data) is bytes else bytes(data)
        frames = []
        pos, n = 0, len(src)
        view = memoryview(src)
        while n - pos >= HEADER_SIZE:
            mtype, request_id, length = _check_header(src, pos)
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            frames.append((mtype, request_id, view[pos + HEADER_SIZE : end]))
            pos = end
        if pos < n:
            if n - pos < HEADER_SIZE:
                _check_prefix(view[pos:])
            buf += view[pos:]
        return frames


def parse_gets(data: bytes) -> list[tuple[int, list[bytes]]] | None:
    """The lender's fast path: `data` holding only whole, valid GET frames -> their
    (request id, keys); None for anything else (another type, a partial frame, any
    malformation), which the caller then feeds to `receive_data`, the one place that
    judges and reports it. Pure, like the rest of this module; it accepts exactly the
    GET frames `receive_data` accepts (tests/test_remote_protocol.py checks both)."""
    out = []
    pos, n = 0, len(data)
    unpack = HEADER.unpack_from
    while pos < n:
        if n - pos < HEADER_SIZE:
            return None
        magic, version, mtype, flags, request_id, length = unpack(data, pos)
        end = pos + HEADER_SIZE + length
        if mtype != _T_GET or magic != MAGIC or version != VERSION or flags or end > n:
            return None
        if length > MAX_PAYLOAD:
            return None
        try:
            keys = py_decode_keys(memoryview(data)[pos + HEADER_SIZE : end])
        except ProtocolError:
            return None
        out.append((request_id, keys))
        pos = end
    return out


def put_frame_size(data: bytes) -> int | None:
    """The lender's big-PUT path: the size of the PUT frame `data` starts but does not
    finish, if its header is valid (the rest may then be received straight into one
    buffer, LenderServer._read_put); None for anything else, which receive_data
    judges."""
    if len(data) < HEADER_SIZE or data[:6] != _PUT_HEAD:
        return None
    length = _U32.unpack_from(data, 10)[0]
    if length > MAX_PAYLOAD or len(data) >= HEADER_SIZE + length:
        return None
    return HEADER_SIZE + length


def get_reply_parts(
    request_id: int, values: Sequence[tuple[bytes | memoryview, ...] | None]
) -> list[bytes | memoryview]:
    """A GET_REPLY as a list of buffers for sendmsg: each found value given as the
    pieces it is stored in (the lender's slot and tail), sent without joining them.
    ValueError when the reply would exceed the frame limit: the caller leaves out
    (reports missing) what does not fit."""
    parts: list[bytes | memoryview] = [b"", _U16.pack(len(values))]
    length = 2
    for v in values:
        if v is None:
            parts.append(b"\0")
            length += 1
        else:
            vlen = sum(len(x) for x in v)
            parts.append(b"\1" + _U32.pack(vlen))
            parts.extend(v)
            length += 5 + vlen
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")
    parts[0] = HEADER.pack(MAGIC, VERSION, _T_GET_REPLY, 0, request_id, length)
    return parts


def _check_prefix(head: bytes | bytearray | memoryview) -> None:
    """Reject garbage as early as its first bytes allow (a stray HTTP request should
    not wait for 14 bytes to be refused)."""
    head = bytes(head[:3])
    if not (MAGIC + bytes([VERSION])).startswith(head):
        raise ProtocolError(_header_problem(head))


def _check_header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int]:
    magic, version, mtype, flags, request_id, length = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(_header_problem(bytes(buf[pos : pos + 3])))
    if mtype not in _TYPES:
        raise ProtocolError(f"unknown message type {mtype:#x}")
    if flags:
        raise ProtocolError(f"reserved flags set ({flags:#x})")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
    return mtype, request_id, length


_TYPES = frozenset(int(t) for t in MsgType)


def _header_problem(head: bytes) -> str:
    if head[:2] != MAGIC[: len(head[:2])]:
        return "not a memlend frame (bad magic)"
    return f"unsupported protocol version {head[2]} (this side speaks {VERSION})"


def _mac(key: bytes, label: bytes, client_id: bytes, cnonce: bytes, snonce: bytes) -> bytes:
    msg = b"memlend-auth-v1\0" + label + _U8.pack(len(client_id)) + client_id + cnonce + snonce
    return hmac.new(key, msg, hashlib.sha256).digest()


class _Connection:
    # Message types this side may receive once authenticated.
    _READY_TYPES: frozenset[int] = frozenset()

    def __init__(self) -> None:
        self._frames = _FrameSplitter()
        self._dead: ProtocolError | None = None
        self.authenticated = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (a partial frame)."""
        return self._frames.buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; return the complete events they finish, in order."""
        if self._dead is not None:
            raise ProtocolError(f"connection already failed: {self._dead}")
        try:
            return [self._handle(*frame) for frame in self._frames.split(data)]
        except ProtocolError as e:
            self._dead = e
            raise
        except Exception as e:  # a decoder bug must not become another exception type
            self._dead = ProtocolError(f"malformed message ({type(e).__name__})")
            raise self._dead from e

    def _handle(self, mtype: int, request_id: int, payload: memoryview) -> Event:
        raise NotImplementedError

    def _ready(self, mtype: int, request_id: int, payload: memoryview) -> Event:
        if mtype not in self._READY_TYPES or not self.authenticated:
            raise ProtocolError(f"unexpected {MsgType(mtype).name} message")
        return _decode(mtype, request_id, payload)


class ServerConnection(_Connection):
    """The lender's side of one connection."""

    _READY_TYPES = frozenset(
        {MsgType.GET, MsgType.PUT, MsgType.INVALIDATE, MsgType.STATS, MsgType.PING}
    )

    def __init__(
        self,
        auth_key: bytes | Callable[[bytes], bytes | None],
        *,
        nonce: bytes | None = None,
    ) -> None:
        """`auth_key`: the one shared key, or a lookup from client id to that client's
        key (None: unknown client)."""
        super().__init__()
        self._key = auth_key
        self._snonce = nonce or os.urandom(NONCE_LEN)
        self._state = "hello"
        self._challenge = b""
        self._expected = b""
        self.client_id: bytes | None = None

    def _handle(self, mtype: int, request_id: int, payload: memoryview) -> Event:
        if self.authenticated:
            return self._ready(mtype, request_id, payload)
        if self._state == "hello":
            if mtype != MsgType.HELLO:
                raise ProtocolError("expected HELLO")
            ev = _decode(mtype, request_id, payload)
            assert isinstance(ev, Hello)
            cnonce = bytes(payload[:NONCE_LEN])
            self.client_id = ev.client_id
            key = self._key if isinstance(self._key, bytes) else self._key(ev.client_id)
            # An unknown client gets a proof under a random key: it cannot tell an
            # unknown name from a wrong key, so names cannot be probed for.
            key = key if key is not None else os.urandom(MAC_LEN)
            proof = _mac(key, b"server", ev.client_id, cnonce, self._snonce)
            self._challenge = encode_frame(MsgType.CHALLENGE, request_id, self._snonce, proof)
            self._expected = _mac(key, b"client", ev.client_id, cnonce, self._snonce)
            self._state = "auth"
            return ev
        if self._state == "auth":
            if mtype != MsgType.AUTH:
                raise ProtocolError("expected AUTH")
            _decode(mtype, request_id, payload)
            if not hmac.compare_digest(bytes(payload), self._expected):
                raise AuthError("client failed authentication (wrong secret?)")
            self._state = "ready"
            self.authenticated = True
            assert self.client_id is not None
            return Authenticated(request_id, self.client_id)
        return self._ready(mtype, request_id, payload)

    @property
    def fast_ready(self) -> bool:
        """Authenticated, alive and nothing buffered: whole GET frames may take a
        fast path (receive_gets, or the lender's native serve_gets)."""
        return self.authenticated and self._dead is None and not self._frames.buffered

    def receive_gets(self, data: bytes) -> list[tuple[int, list[bytes]]] | None:
        """The fast path of receive_data for the common case, a chunk of whole GET
        frames on a ready connection: their (request id, keys), without events.
        None means "not that case": feed the same bytes to receive_data instead."""
        return parse_gets(data) if self.fast_ready else None

    def send_challenge(self) -> bytes:
        if not self._challenge:
            raise ValueError("no HELLO received yet")
        return self._challenge

    def send_auth_ok(self, max_value: int, max_keys: int = MAX_KEYS) -> bytes:
        return encode_frame(MsgType.AUTH_OK, 0, _AUTH_OK.pack(max_value, max_keys))

    def send_get_reply(self, request_id: int, values: Sequence[bytes | memoryview | None]) -> bytes:
        pieces = [None if v is None else (v,) for v in values]
        return b"".join(get_reply_parts(request_id, pieces))

    def send_ack(self, request_id: int, count: int) -> bytes:
        return encode_frame(MsgType.ACK, request_id, _U32.pack(count))

    def send_stats_reply(self, request_id: int, stats: dict) -> bytes:
        return encode_frame(MsgType.STATS_REPLY, request_id, json.dumps(stats).encode())

    def send_pong(self, request_id: int, data: bytes) -> bytes:
        return encode_frame(MsgType.PONG, request_id, data)

    def send_error(self, request_id: int, code: int, message: str) -> bytes:
        return encode_frame(MsgType.ERROR, request_id, _U16.pack(code), message.encode()[:1024])


class ClientConnection(_Connection):
    """A client's side of one connection to a lender."""

    _READY_TYPES = frozenset(
        {MsgType.GET_REPLY, MsgType.ACK, MsgType.STATS_REPLY, MsgType.PONG, MsgType.ERROR}
    )

    def __init__(self, auth_key: bytes, client_id: bytes) -> None:
        super().__init__()
        if not 1 <= len(client_id) <= MAX_CLIENT_ID:
            raise ValueError(f"client id must be 1..{MAX_CLIENT_ID} bytes")
        self._key = auth_key
        self.client_id = bytes(client_id)
        self._cnonce = os.urandom(NONCE_LEN)
        self._state = "start"
        self._auth = b""

    def send_hello(self) -> bytes:
        if self._state != "start":
            raise ValueError("HELLO already sent")
        self._state = "challenge"
        cid = self.client_id
        return encode_frame(MsgType.HELLO, 0, self._cnonce, _U8.pack(len(cid)), cid)

    def _handle(self, mtype: int, request_id: int, payload: memoryview) -> Event:
        if self.authenticated:
            return self._ready(mtype, request_id, payload)
        if mtype == _T_ERROR:  # the server may refuse at any stage
            return _decode(mtype, request_id, payload)
        if self._state == "challenge":
            if mtype != MsgType.CHALLENGE:
                raise ProtocolError("expected CHALLENGE")
            _decode(mtype, request_id, payload)
            snonce, proof = bytes(payload[:NONCE_LEN]), bytes(payload[NONCE_LEN:])
            want = _mac(self._key, b"server", self.client_id, self._cnonce, snonce)
            if not hmac.compare_digest(proof, want):
                raise AuthError("server failed authentication (wrong secret?)")
            mac = _mac(self._key, b"client", self.client_id, self._cnonce, snonce)
            self._auth = encode_frame(MsgType.AUTH, 0, mac)
            self._state = "auth_ok"
            return ServerVerified(request_id)
        if self._state == "auth_ok":
            if mtype != MsgType.AUTH_OK:
                raise ProtocolError("expected AUTH_OK")
            ev = _decode(mtype, request_id, payload)
            self._state = "ready"
            self.authenticated = True
            return ev
        return self._ready(mtype, request_id, payload)

    def send_auth(self) -> bytes:
        if not self._auth:
            raise ValueError("the server has not been verified yet")
        return self._auth

    def send_get(self, keys: Sequence[bytes], request_id: int = 0) -> bytes:
        if len(keys) == 1 and 1 <= len(keys[0]) <= MAX_KEY_LEN and 0 <= request_id <= 0xFFFFFFFF:
            k = keys[0]  # the remote tier's common request, packed in one go
            return _GET1.pack(_GET_HEAD, request_id, 3 + len(k), 0, 1, len(k)) + bytes(k)
        if _native is not None and all(type(k) is bytes for k in keys):
            return _native.encode_get(keys, request_id)
        return encode_frame(MsgType.GET, request_id, *_encode_keys(keys))

    def receive_value(self, data: bytes, request_id: int) -> memoryview | object | None:
        """The fast path of receive_data for the remote tier's common reply: `data` is
        exactly one whole GET_REPLY to `request_id` carrying one value, on a ready
        connection with nothing buffered. Returns the value (None: not found), or
        NOT_FAST for anything else; then feed the same bytes to receive_data."""
        if (
            len(data) < HEADER_SIZE + 3
            or data[:6] != _REPLY_HEAD
            or self._frames.buffered
            or not self.authenticated
            or self._dead is not None
        ):
            return NOT_FAST
        rid, length = _RID_LEN.unpack_from(data, 6)
        if rid != request_id or length != len(data) - HEADER_SIZE:
            return NOT_FAST
        head = data[HEADER_SIZE : HEADER_SIZE + 3]
        if head == b"\0\1\1":
            if length >= 7 and _U32.unpack_from(data, HEADER_SIZE + 3)[0] == length - 7:
                return memoryview(data)[HEADER_SIZE + 7 :]  # the sealed blob, uncopied
        elif head == b"\0\1\0" and length == 3:
            return None
        return NOT_FAST

    def send_put(
        self, items: Iterable[tuple[bytes, bytes | memoryview]], request_id: int = 0
    ) -> bytes:
        items = list(items)
        _check_keys([k for k, _ in items])
        parts: list[bytes | memoryview] = [_U16.pack(len(items))]
        for k, v in items:
            parts.append(_U8.pack(len(k)) + bytes(k) + _U32.pack(len(v)))
            parts.append(v)
        return encode_frame(MsgType.PUT, request_id, *parts)

    def send_invalidate(self, keys: Sequence[bytes], request_id: int = 0) -> bytes:
        return encode_frame(
            MsgType.INVALIDATE, request_id, _U8.pack(InvalidateMode.KEYS), *_encode_keys(keys)
        )

    def send_invalidate_prefix(self, prefix: bytes, request_id: int = 0) -> bytes:
        if len(prefix) > MAX_KEY_LEN:
            raise ValueError("prefix too long")
        mode = _U8.pack(InvalidateMode.PREFIX)
        return encode_frame(MsgType.INVALIDATE, request_id, mode, _U8.pack(len(prefix)), prefix)

    def send_invalidate_all(self, request_id: int = 0) -> bytes:
        return encode_frame(MsgType.INVALIDATE, request_id, _U8.pack(InvalidateMode.ALL))

    def send_stats(self, request_id: int = 0) -> bytes:
        return encode_frame(MsgType.STATS, request_id)

    def send_ping(self, data: bytes = b"", request_id: int = 0) -> bytes:
        if len(data) > MAX_PING:
            raise ValueError("ping payload too long")
        return encode_frame(MsgType.PING, request_id, data)


def put_payload_size(key: bytes, value_len: int) -> int:
    """Bytes one item adds to a PUT payload (for splitting batches under MAX_PAYLOAD)."""
    return 1 + len(key) + 4 + value_len


# The Python decoders above are the definition; the C ones (memlend.native) replace
# them when built, and tests/test_native.py fuzzes each pair against each other.
py_decode_keys, py_decode_values, py_parse_gets = _decode_keys, _decode_values, parse_gets
py_decode_put = _decode_put
if _native is not None:
    _native.init(ProtocolError)
    _decode_keys, _decode_values = _native.decode_keys, _native.decode_values
    parse_gets, _decode_put = _native.parse_gets, _native.decode_put
