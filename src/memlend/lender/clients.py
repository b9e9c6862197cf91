"""The lender's list of allowed clients (`memlend lend --clients FILE`).

One client a line, `#` starts a comment::

    # name    key                       quota
    alice     /etc/memlend/alice.key    2G
    bob       3f9c...(64 hex digits)    -

name: 1..64 of [A-Za-z0-9._-]; the client's namespace on the lender, and what the
mount gives as --client-name. key: a secret file (memlend genkey; a relative path
is relative to FILE's directory) or the 64 hex digits of one; the mount gives the
same secret as --secret-file. quota: the most memory this client's blocks may take
(SIZE), or `-` for no quota beyond the fair share.

The handshake looks the key up by the name the client claims, so a client can only
open the namespace of the key it holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from memlend.errors import UserError
from memlend.remote.secret import SECRET_LEN, auth_key, load_secret
from memlend.sizes import parse_size

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_KEY = re.compile(rf"[0-9a-fA-F]{{{2 * SECRET_LEN}}}")


@dataclass(frozen=True)
class AllowedClient:
    name: str
    auth_key: bytes  # the HMAC key of the handshake, derived from the client's secret
    quota: int | None  # bytes, None: the fair share only


def valid_client_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def load_clients(path: str) -> dict[bytes, AllowedClient]:
    """Client id (the name, as bytes) -> AllowedClient; UserError with the line if bad."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"clients file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read clients file {path}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    clients: dict[bytes, AllowedClient] = {}
    owner: dict[bytes, str] = {}
    for n, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) != 3:
            raise UserError(f"{where}: expected `name key quota`, got {len(fields)} fields")
        name, key_text, quota_text = fields
        if not valid_client_name(name):
            raise UserError(f"{where}: client name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        if _HEX_KEY.fullmatch(key_text):
            secret = bytes.fromhex(key_text)
        else:
            secret = load_secret(os.path.join(base, key_text))
        try:
            quota = None if quota_text == "-" else parse_size(quota_text)
        except UserError as e:
            raise UserError(f"{where}: quota: {e}") from None
        cid = name.encode()
        if cid in clients:
            raise UserError(f"{where}: client {name} is listed twice")
        key = auth_key(secret)
        # Two names with one key would let either open the other's namespace.
        if key in owner:
            raise UserError(f"{where}: client {name} has the same key as {owner[key]}")
        owner[key] = name
        clients[cid] = AllowedClient(name, key, quota)
    if not clients:
        raise UserError(f"clients file {path} lists no clients")
    return clients
