"""Secret files: `memlend genkey` writes them, lenders and clients load them.

Format: 64 hexadecimal characters and a newline (32 random bytes), so a secret can
be copied between machines as text. Loading also accepts a raw binary file of at
least 32 bytes; a file made only of hex digits is always read as hex.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import string
import sys
from typing import TextIO

from memlend.errors import UserError

SECRET_LEN = 32
AUTH_LABEL = b"memlend auth v1"


def hkdf(secret: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869, zero salt): one key per purpose from one secret.

    Written out here (it is ten lines) so the lender need not load `cryptography`:
    every MiB of the lender's own footprint is a MiB not lent."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 0
    while len(out) < length:
        i += 1
        block = hmac.new(prk, block + label + bytes((i,)), hashlib.sha256).digest()
        out += block
    return out[:length]


def auth_key(secret: bytes) -> bytes:
    """The HMAC key both ends of a connection use for the handshake."""
    return hkdf(secret, AUTH_LABEL)


_HEX = set(string.hexdigits.encode())


def write_secret(path: str, *, force: bool = False) -> None:
    """Write 32 fresh random bytes, hex encoded, to `path` with mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists (use --force to overwrite it)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory") from None
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror}") from None
    try:
        # O_CREAT's mode does not apply to an existing file overwritten with --force.
        os.fchmod(fd, 0o600)
        os.write(fd, os.urandom(SECRET_LEN).hex().encode() + b"\n")
    finally:
        os.close(fd)


def load_secret(path: str, *, warn: TextIO | None = None) -> bytes:
    """The secret in `path`; UserError if unreadable, empty or shorter than 32 bytes.

    A file that group or others may access is accepted with a one-line warning
    (on `warn`, default stderr)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"secret file {path} is not a regular file")
            data = f.read(4096)
    except FileNotFoundError:
        raise UserError(
            f"secret file {path} does not exist (create one with memlend genkey)"
        ) from None
    except IsADirectoryError:
        raise UserError(f"secret file {path} is a directory") from None
    except OSError as e:
        raise UserError(f"cannot read secret file {path}: {e.strerror}") from None
    text = data.strip()
    if text and set(text) <= _HEX and len(text) % 2 == 0:
        secret = bytes.fromhex(text.decode())
    else:
        secret = data
    if len(secret) < SECRET_LEN:
        what = "empty" if not data.strip() else f"too short ({len(secret)} bytes)"
        raise UserError(
            f"secret file {path} is {what}: it needs at least {SECRET_LEN} bytes "
            "(create one with memlend genkey)"
        )
    if st.st_mode & 0o077:
        print(f"memlend: warning: {_loose(path, st.st_mode)}", file=warn or sys.stderr)
    return secret


def _loose(path: str, mode: int) -> str:
    return (
        f"secret file {path} is accessible by group or others "
        f"(mode {stat.S_IMODE(mode):04o}; chmod 600 it)"
    )


def loose_permissions(path: str) -> str | None:
    """A warning if group or others may access the secret file at `path` (as ssh warns
    about a private key); None if not, or if it cannot be looked at (loading says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return _loose(path, mode) if mode & 0o077 else None
