"""Readers racing writers on one file: how many reads does a file system serve, and
how many return a torn 4 KiB record (half of one write, half of another)?

    python -m memlend.bench.torn_reads FILE [--seconds 5]

FILE is created (64 records of 4 KiB) and removed. Three writer threads pwrite whole
records, three reader threads pread them and check each record's CRC. Used to choose
FUSE_AUTO_INVAL_DATA for the kernel tier (docs/design-choices.md).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import threading
import time
import zlib

BS, NREC = 4096, 64


def record(idx: int, writer: int, seq: int) -> bytes:
    body = struct.pack("<QIQ", idx, writer, seq)
    body += random.Random(f"{idx}/{writer}/{seq}").randbytes(BS - 4 - len(body))
    return body + struct.pack("<I", zlib.crc32(body))


def run(path: str, seconds: float) -> dict[str, int]:
    with open(path, "wb") as f:
        f.write(b"".join(record(i, 0, 0) for i in range(NREC)))
    stop = threading.Event()
    counts = {"reads": 0, "torn": 0, "writes": 0}
    lock = threading.Lock()

    def writer(w: int) -> None:
        fd, rng, seq = os.open(path, os.O_WRONLY), random.Random(w), 0
        try:
            while not stop.is_set():
                i = rng.randrange(NREC)
                seq += 1
                os.pwrite(fd, record(i, w, seq), i * BS)
                with lock:
                    counts["writes"] += 1
        finally:
            os.close(fd)

    def reader() -> None:
        fd, rng = os.open(path, os.O_RDONLY), random.Random()
        try:
            while not stop.is_set():
                d = os.pread(fd, BS, rng.randrange(NREC) * BS)
                torn = zlib.crc32(d[:-4]) != struct.unpack("<I", d[-4:])[0]
                with lock:
                    counts["reads"] += 1
                    counts["torn"] += torn
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2, 3)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    os.unlink(path)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a file to create (and remove) on the file system tested")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(run(args.file, args.seconds))


if __name__ == "__main__":
    main()
