"""A tiny FUSE file system whose operations fail on purpose (run as a script).

    python fault_fs.py MOUNTPOINT DATAFILE

serves memlend's own protocol layer (mount + Session) with one regular file per
fault, all looking like DATAFILE: reading `read-ENOENT` raises OSError(ENOENT) from
Operations.read, `read-RuntimeError` raises a RuntimeError, `read-600` an OSError whose
errno the kernel would refuse in a reply, `open-600` fails in OPEN (the generic
path), and `ok` reads DATAFILE. Prints "ready" once mounted; serves until unmounted
or killed. Used by tests/test_session_faults.py.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from memlend.fuse import wire
from memlend.fuse.api import Context, Operations
from memlend.fuse.mount import mount
from memlend.fuse.session import Session


def fault(name: bytes) -> BaseException:
    what = name.decode().split("-", 1)[1]
    if what == "RuntimeError":
        return RuntimeError("injected")
    code = int(what) if what.isdigit() else getattr(errno, what)
    return OSError(code, "injected")


class FaultFS(Operations):
    def __init__(self, datafile: str) -> None:
        self.datafile = datafile
        self.names: dict[int, bytes] = {}  # nodeid -> name
        self.ids: dict[bytes, int] = {}

    def lookup(self, ctx: Context, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        if parent != wire.ROOT_ID or name.split(b"-")[0] not in (b"ok", b"read", b"open"):
            raise OSError(errno.ENOENT, "no such file")
        nodeid = self.ids.setdefault(name, wire.ROOT_ID + 1 + len(self.ids))
        self.names[nodeid] = name
        return nodeid, os.stat(self.datafile)

    def getattr(self, nodeid: int, fh: int | None) -> os.stat_result:
        return os.stat(os.path.dirname(self.datafile) if nodeid == wire.ROOT_ID else self.datafile)

    def open(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        if self.names[nodeid].startswith(b"open-"):
            raise fault(self.names[nodeid])
        return nodeid, wire.FOPEN_DIRECT_IO  # every read reaches us: no page cache

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> Sequence[bytes]:
        name = self.names[nodeid]
        if name.startswith(b"read-"):
            raise fault(name)
        with open(self.datafile, "rb") as f:
            f.seek(offset)
            return [f.read(size)]


def main() -> None:
    mountpoint, datafile = sys.argv[1:3]
    fd = mount(mountpoint, "faultfs", max_read=1 << 20)
    session = Session(fd, FaultFS(datafile), threads=2)
    session.handshake()
    session.start()
    print("ready", flush=True)
    session.wait()


if __name__ == "__main__":
    main()
