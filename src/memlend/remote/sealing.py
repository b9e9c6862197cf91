"""Sealing: authenticated encryption of block contents by the client.

A lender holds only sealed blobs: it can neither read nor alter them undetected
(invariant 5), and a blob that fails to open is just a miss (invariant 1).

    blob = format u8 (1) | nonce (12) | AES-256-GCM(ciphertext | tag (16))

The associated data is the block's key bytes (file id, block number, version), so
a blob moved to another key, replayed under an older version, truncated, or with
any bit flipped fails to open. Nonces are random 96-bit values: at 2^32 seals per
key the collision chance stays below 2^-32 (NIST SP 800-38D's bound).

AES-256-GCM was chosen over ChaCha20-Poly1305 by measurement (docs/remote.md,
`python -m memlend.bench.sealbench`): with AES-NI/VAES here it seals a 4 KiB
block in 3.0 µs (ChaCha20-Poly1305: 3.7) and a 64 KiB block in 8.1 µs (19.7).

The sealing key is derived with HKDF-SHA256 from a client-side secret, with a label
("memlend seal v1") the lender never uses. If the client seals with the same
secret file the lender authenticates with, the lender *could* derive the sealing
key itself; give clients a separate seal secret (`--seal-key-file`) so that it
cannot. See docs/remote.md.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from memlend.remote.secret import hkdf

FORMAT = 1
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = 1 + NONCE_LEN + TAG_LEN  # 29 bytes per blob
SEAL_LABEL = b"memlend seal v1"
RUN_SEAL_LABEL = b"memlend run seal v1"
# Random 96-bit nonces: 2^32 seals per key keep the collision chance below 2^-32
# (NIST SP 800-38D); rekey with room to spare.
SEALS_PER_KEY = 1 << 31
CLIENT_ID_LABEL = b"memlend client id v1"


# cryptography 47+ opens into a caller's buffer: a 16 KiB block then costs 2.5 µs
# instead of 3.5 (no new bytes object, no copy into the reply; docs/native.md).
_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")


class SealError(Exception):
    """A blob failed to open: tampered, truncated, or stored under another key."""


def client_id_for(seal_secret: bytes) -> bytes:
    """A stable 16-byte namespace id for a client: same seal secret, same namespace.

    (Different seal secrets cannot read each other's blobs anyway, so sharing a
    namespace would only waste the lender's memory.)"""
    return hkdf(seal_secret, CLIENT_ID_LABEL, 16)


class Sealer:
    """Seals and opens blocks with one key; safe to share between threads."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key is 32 bytes")
        self.key = key  # for the C read path, which opens blobs itself
        self._aead = AESGCM(key)

    @classmethod
    def from_secret(cls, secret: bytes) -> Sealer:
        return cls(hkdf(secret, SEAL_LABEL))

    def seal(self, key_bytes: bytes, plaintext: bytes | memoryview) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return b"".join((bytes((FORMAT,)), nonce, self._aead.encrypt(nonce, plaintext, key_bytes)))

    def open(self, key_bytes: bytes, blob: bytes | memoryview) -> bytes:
        if len(blob) < OVERHEAD or blob[0] != FORMAT:
            raise SealError("not a sealed blob (too short or unknown format)")
        view = memoryview(blob)
        try:
            return self._aead.decrypt(view[1 : 1 + NONCE_LEN], view[1 + NONCE_LEN :], key_bytes)
        except InvalidTag:
            raise SealError("sealed blob failed authentication") from None

    def open_into(self, key_bytes: bytes, blob: bytes | memoryview, out: memoryview) -> int:
        """open() straight into out[:n]; returns n. On SealError out[:n] may hold
        unverified bytes: the caller overwrites them (the block is read from disk)."""
        n = len(blob) - OVERHEAD
        if n < 0 or blob[0] != FORMAT:
            raise SealError("not a sealed blob (too short or unknown format)")
        if n > len(out):
            raise SealError("sealed blob longer than a block")
        view = memoryview(blob)
        if not _DECRYPT_INTO:
            out[:n] = self.open(key_bytes, view)
            return n
        try:
            return self._aead.decrypt_into(
                view[1 : 1 + NONCE_LEN], view[1 + NONCE_LEN :], key_bytes, out[:n]
            )
        except InvalidTag:
            raise SealError("sealed blob failed authentication") from None


class RunSealer:
    """Sealing for one mount run: a key derived from the seal secret and the run's
    epoch, replaced by the next generation's before SEALS_PER_KEY seals.

    Opening tries the current key, then the previous one (blocks sealed just before a
    rekey); anything older, or of an earlier run, fails to open: a miss."""

    def __init__(self, secret: bytes, epoch: bytes, seals_per_key: int = SEALS_PER_KEY) -> None:
        if seals_per_key < 1:
            raise ValueError("seals_per_key must be positive")
        self._secret, self._epoch = secret, bytes(epoch)
        self.seals_per_key = seals_per_key
        self._lock = threading.Lock()
        self.generation = 0
        self._current = self._sealer(0)
        self._previous: Sealer | None = None
        self._count = itertools.count()  # next() is atomic under the GIL: no lock per seal
        self.on_rekey: Callable[[], None] | None = None  # told after each new key

    def keys(self) -> tuple[bytes, bytes | None]:
        """The raw keys a blob may be opened with now: current and previous."""
        previous = self._previous
        return self._current.key, previous.key if previous is not None else None

    def _sealer(self, generation: int) -> Sealer:
        info = RUN_SEAL_LABEL + self._epoch + generation.to_bytes(8, "big")
        return Sealer(hkdf(self._secret, info))

    def seal(self, key_bytes: bytes, plaintext: bytes | memoryview) -> bytes:
        n = next(self._count)
        if n >= self.seals_per_key:
            self._rekey()
            return self.seal(key_bytes, plaintext)
        return self._current.seal(key_bytes, plaintext)

    def _rekey(self) -> None:
        with self._lock:
            # Another thread may have rekeyed while this one waited for the lock.
            if next(self._count) < self.seals_per_key:
                return
            self.generation += 1
            self._previous, self._current = self._current, self._sealer(self.generation)
            self._count = itertools.count()
            if self.on_rekey is not None:
                self.on_rekey()

    def open(self, key_bytes: bytes, blob: bytes | memoryview) -> bytes:
        current, previous = self._current, self._previous
        try:
            return current.open(key_bytes, blob)
        except SealError:
            if previous is None:
                raise
            return previous.open(key_bytes, blob)

    def open_into(self, key_bytes: bytes, blob: bytes | memoryview, out: memoryview) -> int:
        current, previous = self._current, self._previous
        try:
            return current.open_into(key_bytes, blob, out)
        except SealError:
            if previous is None:
                raise
            return previous.open_into(key_bytes, blob, out)
