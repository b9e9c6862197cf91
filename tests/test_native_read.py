"""The C read path (memlend._native read_next, fs/fast_read.py) against fakes of its
two peers: a SOCK_SEQPACKET pair stands in for /dev/fuse (one request per read, one
reply per write, as the kernel's device), a socket pair for the lender connection.

Whatever the lender answers, read_next must answer the kernel only with the right
bytes of a block that opened under its name, and otherwise leave the request to
Python with the lender's outcome; it must never send a GET for a file that was not
lent at its current version. The mount suites run it for real (kernel tier with a
memlend lender: tests/test_mount_remote.py, tests/test_faults.py)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlend import native
from memlend.fs.readpath import remote_key
from memlend.fuse.wire import Op
from memlend.remote import protocol as p
from memlend.remote.sealing import Sealer

lib = native.lib
pytestmark = pytest.mark.skipif(lib is None, reason=native.description)

SHIFT, BS = 14, 1 << 14
EPOCH = b"E" * 8
KEY, OLD_KEY = b"k" * 32, b"o" * 32
GEN, FILE_ID, VERSION, SLOT = 7, 5, 2, 3
FH = 99 << 20 | SLOT
IN_HEADER = struct.Struct("<IIQQIIIHH")
READ_IN = struct.Struct("<QQIIQII")
OUT_HEADER = struct.Struct("<IiQ")
DATA = bytes(range(256)) * (BS // 256)


def request(offset: int, size: int, unique: int = 41, opcode: int = Op.READ, fh: int = FH) -> bytes:
    body = READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, 2, 0, 0, 1, 0, 0) + body


def name(block: int, file_id: int = FILE_ID, version: int = VERSION) -> bytes:
    return remote_key(EPOCH, file_id, version, block)


def answer(rid: int, value: bytes | None) -> bytes:
    return p.ServerConnection(b"a" * 32).send_get_reply(rid, [value])


@contextlib.contextmanager
def fake_peers() -> Iterator[tuple[socket.socket, ...]]:
    """(kernel side, daemon side) of the fake /dev/fuse, (client, lender) sockets, and
    C told of one lent file in SLOT and an active lender."""
    k, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a, b = socket.socketpair()
    lib.read_setup(SHIFT, EPOCH)
    lib.read_keys(KEY, None)
    lib.read_lender(GEN)
    lib.read_slot(SLOT, FILE_ID, VERSION, True)
    try:
        yield k, d, a, b
    finally:
        lib.read_slot(SLOT, 0, 0, False)
        lib.read_lender(-1)
        for s in (k, d, a, b):
            s.close()


@pytest.fixture
def peers():
    with fake_peers() as four:
        yield four


def lender(b: socket.socket, reply, delay: float = 0.0) -> list[bytes]:
    """Answers one GET on `b` with reply(rid, key); the GETs seen are returned."""
    seen: list[bytes] = []

    def run() -> None:
        data = b.recv(4096)
        seen.append(data)
        rid = int.from_bytes(data[6:10], "big")
        time.sleep(delay)
        out = reply(rid, data[p.HEADER_SIZE + 3 :])
        if out:
            b.sendall(out)

    threading.Thread(target=run, daemon=True).start()
    return seen


def read_next(d, a, *, rid: int = 11, deadline: float = 2.0, gen: int = GEN, conn=None,
              stale_at: float | None = None) -> tuple:  # fmt: skip
    buf = bytearray(1 << 17)
    out = lib.read_next(
        d.fileno(), buf, bytearray(2 * BS + 4096), a.fileno() if conn is None else conn,
        gen, rid, 0.0, deadline, time.monotonic() + 60 if stale_at is None else stale_at,
    )  # fmt: skip
    return out, buf


def kernel_got(k: socket.socket) -> bytes | None:
    k.setblocking(False)
    try:
        return k.recv(1 << 17)
    except BlockingIOError:
        return None


def sealed(block: int, data: bytes = DATA, key: bytes = KEY, **kw) -> bytes:
    return Sealer(key).seal(name(block, **kw), data)


@pytest.mark.parametrize("offset,size", [(0, 4096), (BS + 100, 5000), (3 * BS, BS)])
def test_a_lent_block_is_served_without_python(peers, offset: int, size: int) -> None:
    k, d, a, b = peers
    block = offset >> SHIFT
    seen = lender(b, lambda rid, key: answer(rid, sealed(block)))
    k.send(request(offset, size, unique=77))
    (n, outcome, seconds, *_, file_id, version, got_block), _ = read_next(d, a)
    assert (n, outcome, file_id, version, got_block) == (0, lib.READ_HIT, FILE_ID, VERSION, block)
    assert seconds > 0
    assert seen[0][p.HEADER_SIZE + 3 :] == name(block)
    reply = kernel_got(k)
    start = offset - (block << SHIFT)
    assert reply == OUT_HEADER.pack(16 + size, 0, 77) + DATA[start : start + size]


def test_the_end_of_file_shortens_the_reply(peers) -> None:
    k, d, a, b = peers
    lender(b, lambda rid, key: answer(rid, sealed(0, DATA[:6000])))
    k.send(request(4096, 8192))
    assert read_next(d, a)[0][:2] == (0, lib.READ_HIT)
    assert kernel_got(k) == OUT_HEADER.pack(16 + 1904, 0, 41) + DATA[4096:6000]
    lender(b, lambda rid, key: answer(rid, sealed(0, DATA[:100])))
    k.send(request(4096, 4096))
    assert read_next(d, a)[0][:2] == (0, lib.READ_HIT)
    assert kernel_got(k) == OUT_HEADER.pack(16, 0, 41)  # past the end: no bytes


def test_a_blob_sealed_under_the_previous_key_opens(peers) -> None:
    k, d, a, b = peers
    lib.read_keys(KEY, OLD_KEY)
    lender(b, lambda rid, key: answer(rid, sealed(0, key=OLD_KEY)))
    k.send(request(0, 4096))
    assert read_next(d, a)[0][:2] == (0, lib.READ_HIT)
    assert kernel_got(k)[16:] == DATA[:4096]


BAD_BLOBS = {
    "another key": lambda: sealed(0, key=b"x" * 32),
    "another block's": lambda: sealed(1),
    "an older version's": lambda: sealed(0, version=VERSION - 1),
    "another file's": lambda: sealed(0, file_id=FILE_ID + 1),
    "cut": lambda: sealed(0)[:-1],
    "shorter than a blob": lambda: sealed(0)[:20],
    "unknown format": lambda: b"\x02" + sealed(0)[1:],
    "longer than a block": lambda: sealed(0, DATA + b"x"),
}


def left_to_python(peers, reply, outcome: int, **kw) -> tuple:
    """A READ whose lender answers `reply`: left whole in the buffer for Python with
    `outcome`, the kernel not answered. read_next's result."""
    k, d, a, b = peers
    req = request(0, 4096)
    lender(b, reply)
    k.send(req)
    out, buf = read_next(d, a, **kw)
    assert out[:2] == (len(req), outcome)
    assert bytes(buf[: len(req)]) == req and kernel_got(k) is None
    return out


@pytest.mark.parametrize("case", list(BAD_BLOBS))
def test_a_blob_that_does_not_open_is_left_to_python(peers, case: str) -> None:
    blob = BAD_BLOBS[case]()
    left_to_python(peers, lambda rid, key: answer(rid, blob), lib.READ_BAD_SEAL)


def test_a_miss_is_left_to_python_which_does_not_ask_again(peers) -> None:
    left_to_python(peers, lambda rid, key: answer(rid, None), lib.READ_MISS)


# What the lender sends back, and the fault status that makes (-NOT_FAST, ...).
FAULTS = {
    "another request's reply": (lambda rid, key: answer(rid + 1, sealed(0)), "NOT_FAST"),
    "an ERROR frame": (
        lambda rid, key: p.ServerConnection(b"a" * 32).send_error(rid, 3, "busy"),
        "NOT_FAST",
    ),
    "HTTP": (lambda rid, key: b"HTTP/1.1 400 Bad Request\r\n\r\n", "NOT_FAST"),
    "trailing bytes": (lambda rid, key: answer(rid, sealed(0)) + b"extra", "NOT_FAST"),
    "a truncated frame": (lambda rid, key: answer(rid, sealed(0))[:30], "TIMED_OUT"),
    "silence": (lambda rid, key: b"", "TIMED_OUT"),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_a_lender_that_does_not_answer_right_is_a_fault(peers, case: str) -> None:
    reply, status_name = FAULTS[case]
    t0 = time.monotonic()
    out = left_to_python(peers, reply, lib.READ_FAULT, deadline=0.05)
    assert out[5] == -getattr(lib, status_name)
    assert time.monotonic() - t0 < 1.0


def test_a_closed_lender_is_a_fault(peers) -> None:
    k, d, a, b = peers
    b.shutdown(socket.SHUT_WR)
    k.send(request(0, 4096))
    (_, outcome, *_, status, _, _, _), _ = read_next(d, a)
    assert outcome == lib.READ_FAULT and status == -lib.CLOSED
    k.send(request(0, 4096))  # a descriptor that is not open: the send fails, an errno
    (_, outcome, *_, status, _, _, _), _ = read_next(d, a, conn=10**6)
    assert outcome == lib.READ_FAULT and status > 0


@pytest.mark.parametrize(
    "case",
    ["not lent", "other generation", "two blocks", "no connection", "stale connection",
     "not a READ", "no slot", "unknown slot", "empty"],
)  # fmt: skip
def test_what_c_cannot_serve_goes_to_python_without_asking(peers, case: str) -> None:
    k, d, a, b = peers
    req = request(0, 4096)
    kw: dict = {}
    if case == "not lent":
        lib.read_slot(SLOT, FILE_ID, VERSION, False)
    elif case == "other generation":
        kw["gen"] = GEN + 1
    elif case == "two blocks":
        req = request(BS - 10, 20)
    elif case == "no connection":
        kw["conn"] = -1
    elif case == "stale connection":
        kw["stale_at"] = time.monotonic() - 1
    elif case == "not a READ":
        req = request(0, 4096, opcode=Op.GETATTR)
    elif case == "no slot":
        req = request(0, 4096, fh=99 << 20)
    elif case == "unknown slot":
        req = request(0, 4096, fh=99 << 20 | 1000)
    elif case == "empty":
        req = request(0, 0)
    k.send(req)
    (n, outcome, *_), buf = read_next(d, a, **kw)
    assert (n, outcome) == (len(req), lib.READ_PYTHON)
    assert bytes(buf[:n]) == req
    b.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing was asked of the lender
        b.recv(10)


def test_the_end_of_the_device_is_unmounted(peers) -> None:
    k, d, a, _ = peers
    k.close()
    assert read_next(d, a)[0][0] == -1


def test_the_wait_does_not_hold_the_gil(peers) -> None:
    k, d, a, b = peers
    lender(b, lambda rid, key: answer(rid, sealed(0)), delay=0.2)
    done = threading.Event()
    ticks = 0

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    k.send(request(0, 4096))
    assert read_next(d, a)[0][1] == lib.READ_HIT
    done.set()
    t.join()
    assert ticks > 50


def test_bad_arguments_are_errors_not_crashes() -> None:
    with pytest.raises(TypeError):
        lib.read_next(0, bytearray(10))
    with pytest.raises(TypeError):
        lib.read_setup(14, b"short")
    with pytest.raises(ValueError):
        lib.read_setup(40, EPOCH)
    with pytest.raises(TypeError):
        lib.read_keys(b"short", None)
    with pytest.raises(ValueError):
        lib.read_slot(0, 1, 1, True)
    with pytest.raises(ValueError):
        lib.read_slot(1 << lib.SLOT_BITS, 1, 1, True)
    with pytest.raises(BufferError):
        lib.read_next(0, b"read-only", bytearray(10), -1, 0, 0, 0.0, 1.0, 0.0)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=120), st.integers(1, 255)),
                   max_size=3),
    tail=st.binary(max_size=8),
)  # fmt: skip
def test_any_answer_serves_the_right_bytes_or_nothing(cut: int, flips, tail: bytes) -> None:
    """A valid answer cut short, with bytes changed or with bytes after it: the kernel
    gets the block's bytes exactly when the answer is the valid one, else nothing."""
    with fake_peers() as (k, d, a, b):
        good = answer(11, sealed(0, DATA[:1000]))
        bad = bytearray(good[: len(good) - cut] if cut else good)
        for at, x in flips:
            if at < len(bad):
                bad[at] ^= x
        bad += tail
        lender(b, lambda rid, key: bytes(bad))
        k.send(request(0, 1000))
        (_, outcome, *_), _ = read_next(d, a, deadline=0.02)
        got = kernel_got(k)
        if bytes(bad) == good:
            assert outcome == lib.READ_HIT and got == OUT_HEADER.pack(1016, 0, 41) + DATA[:1000]
        else:
            assert outcome in (lib.READ_FAULT, lib.READ_BAD_SEAL) and got is None
