"""memcached as a lender: a small blocking client for the text protocol.

Same interface as `LenderClient` (multi_get, put_many, invalidate, ping, stats,
close), plus `start_get` / `finish_get` so the remote tier can ask several lenders
in parallel from one thread, and the same error model: any failure raises
`RemoteError` (`RemoteTimeout` past the deadline) and closes the client.

Values are the sealed blobs (memlend.remote.sealing): memcached never sees a
plaintext block, and a blob it returns under the wrong key, truncated or altered
fails to open. Keys are opaque bytes, stored as

    "ml" + base64url(client id) + ":" + base64url(key)     (no padding)

which is memcached-legal (printable, no spaces, 69 bytes for a 32-byte key) and
namespaced by the client id (`sealing.client_id_for(seal_secret)`), so two mounts
sharing one memcached never see each other's blocks. Keys longer than 150 bytes
are replaced by a BLAKE2b digest (sealing still binds a blob to the full key).

Puts are `set ... noreply` (no reply to wait for), followed by one `version`
round trip per batch so that `put_many` returns once memcached has processed the
batch (and a dead server is noticed on the put path). Deletes are `delete ...
noreply`. memcached may evict anything at any time: that is only a miss.

Why a raw-socket client rather than pymemcache: it needs split send/receive (to
ask several lenders at once), an overall deadline per call rather than a
per-recv socket timeout, and the adaptive busy-polling that halves a cross-CPU
round trip here; measured against pymemcache in docs/remote.md.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Sequence

from memlend.remote.sockio import RemoteError, SpinSocket

MAX_KEY = 250
MAX_VALUE = (1 << 20) - 1024  # memcached's default item size limit (-I 1m) less its header
_LONG_KEY = 150


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class MemcachedClient(SpinSocket):
    what = "memcached"

    def __init__(
        self,
        address: tuple[str, int],
        namespace: bytes,
        *,
        timeout: float = 2.0,
        busy_poll_us: int = 200,
        max_value: int = MAX_VALUE,
    ) -> None:
        super().__init__(address, timeout, busy_poll_us)
        self.max_value = max_value
        self.max_keys = 256
        self._prefix = b"ml" + _b64(namespace) + b":"
        self._buf = bytearray()
        self.stray_bytes = 0  # bytes received where no reply was expected
        try:
            self._connect()
        except OSError as e:
            self.close()
            raise RemoteError(f"cannot connect to memcached {address[0]}:{address[1]}: {e}") from e

    # ---- keys -------------------------------------------------------------------------

    def encode_key(self, key: bytes) -> bytes:
        if len(key) > _LONG_KEY:
            key = b"#" + hashlib.blake2b(key, digest_size=24).digest()
        return self._prefix + _b64(key)

    # ---- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        super().close()
        self._buf.clear()

    def _recv_some(self, deadline: float, spin: bool) -> None:
        self._buf += self._recv(deadline, spin)

    def _line(self, deadline: float, spin: bool = False) -> bytes:
        """The next reply line, without its CRLF."""
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            if len(self._buf) > 4096:
                raise RemoteError("memcached sent an overlong line")
            self._recv_some(deadline, spin)
            spin = False

    def _guard(self, fn, *args):
        """Run one exchange; any failure closes the client and raises RemoteError."""
        try:
            return fn(*args)
        except RemoteError:
            self.close()
            raise
        except (OSError, ValueError, IndexError) as e:
            self.close()
            raise RemoteError(f"memcached connection failed: {e}") from e

    def _drain_stray(self) -> None:
        """Discard anything memcached sent unasked (an error despite noreply)."""
        sock = self._require()
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                raise RemoteError("memcached closed the connection")
            self.stray_bytes += len(data)

    # ---- GET ----------------------------------------------------------------------------

    def start_get(self, keys: Sequence[bytes]) -> list[bytes]:
        """Send one multi-get; returns the token for finish_get."""
        enc = [self.encode_key(k) for k in keys]

        def go() -> list[bytes]:
            if self._buf:
                raise RemoteError("memcached sent data nobody asked for")
            self._drain_stray()
            self._send(b"get " + b" ".join(enc) + b"\r\n", time.monotonic() + self.timeout)
            return enc

        return self._guard(go)

    def finish_get(self, token: list[bytes], deadline: float) -> list[bytes | None]:
        """The values of a start_get, in key order (None: not stored)."""
        return self._guard(self._finish_get, token, deadline)

    def _finish_get(self, enc: list[bytes], deadline: float) -> list[bytes | None]:
        where = {k: i for i, k in enumerate(enc)}
        out: list[bytes | None] = [None] * len(enc)
        spin = self._spin()
        while True:
            line = self._line(deadline, spin)
            spin = False
            if line == b"END":
                return out
            parts = line.split()
            if len(parts) < 4 or parts[0] != b"VALUE":
                raise RemoteError(f"memcached: {line[:80]!r}")
            i = where.get(parts[1])
            n = int(parts[3])
            if i is None or n < 0 or n > self.max_value:
                raise RemoteError("memcached answered a key that was not asked")
            while len(self._buf) < n + 2:
                self._recv_some(deadline, False)
            if self._buf[n : n + 2] != b"\r\n":
                raise RemoteError("memcached value not followed by CRLF")
            out[i] = bytes(self._buf[:n])
            del self._buf[: n + 2]

    def get_one(
        self, key: bytes, deadline: float, budget: float = 0.0, view: bool = False
    ) -> bytes | None:
        """One key's value (None: not stored), answered by `deadline`, or within
        `budget` seconds of sending if that is later (LenderClient.get_one; always a
        copy here, whatever `view` says)."""
        token = self.start_get((key,))
        if budget:
            deadline = max(deadline, time.monotonic() + budget)
        return self.finish_get(token, deadline)[0]

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        token = self.start_get(keys)
        return self.finish_get(token, time.monotonic() + self.timeout)

    # ---- PUT / DELETE ----------------------------------------------------------------

    def _sync(self, deadline: float) -> None:
        """One round trip: memcached has processed everything sent before it."""
        self._send(b"version\r\n", deadline)
        while True:
            line = self._line(deadline)
            if line.startswith(b"VERSION "):
                return
            # An error for an earlier noreply command: count it, keep reading.
            self.stray_bytes += len(line) + 2

    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Store blobs (`set noreply`); returns how many were sent and processed."""
        parts: list[bytes] = []
        n = 0
        for k, v in items:
            if len(v) > self.max_value:
                continue
            parts.append(b"set %s 0 0 %d noreply\r\n" % (self.encode_key(k), len(v)))
            parts.append(v)
            parts.append(b"\r\n")
            n += 1
        if not n:
            return 0

        def go() -> int:
            deadline = time.monotonic() + self.timeout
            self._drain_stray()
            self._send(b"".join(parts), deadline)
            self._sync(deadline)
            return n

        return self._guard(go)

    def invalidate(self, keys: Sequence[bytes]) -> int:
        """Delete keys (`delete noreply`); returns how many deletes were processed."""
        if not keys:
            return 0
        data = b"".join(b"delete %s noreply\r\n" % self.encode_key(k) for k in keys)

        def go() -> int:
            deadline = time.monotonic() + self.timeout
            self._drain_stray()
            self._send(data, deadline)
            self._sync(deadline)
            return len(keys)

        return self._guard(go)

    # ---- misc -------------------------------------------------------------------------

    def ping(self, data: bytes = b"") -> bytes:
        def go() -> bytes:
            self._drain_stray()
            self._sync(time.monotonic() + self.timeout)
            return data

        return self._guard(go)

    def stats(self) -> dict:
        """memcached's `stats` (server-wide, all namespaces), numbers as ints/floats."""

        def go() -> dict:
            deadline = time.monotonic() + self.timeout
            self._drain_stray()
            self._send(b"stats\r\n", deadline)
            out: dict = {}
            while True:
                line = self._line(deadline)
                if line == b"END":
                    return out
                parts = line.decode("ascii", "replace").split(" ", 2)
                if len(parts) != 3 or parts[0] != "STAT":
                    raise RemoteError(f"memcached: {line[:80]!r}")
                value: object = parts[2]
                for conv in (int, float):
                    try:
                        value = conv(parts[2])
                        break
                    except ValueError:
                        pass
                out[parts[1]] = value

        return self._guard(go)
