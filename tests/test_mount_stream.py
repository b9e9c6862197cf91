"""Sequential streams: read-ahead windows must never serve stale or wrong bytes."""

from __future__ import annotations

import os

MiB = 1 << 20


def _read_all(path: os.PathLike, chunk: int = MiB) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while part := os.read(fd, chunk):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def test_sequential_reads_match_and_fill_the_cache(mount_factory, local_tier: str) -> None:
    m = mount_factory("--cache-size", "64M", "--block-size", "16K")
    data = os.urandom(8 * MiB + 12345)  # not a multiple of the window: a short tail
    (m.backing / "big").write_bytes(data)
    assert _read_all(m.mnt / "big") == data
    first = m.stats()
    assert first["disk_read_bytes"] >= len(data)
    assert _read_all(m.mnt / "big") == data
    second = m.stats()
    # Read-ahead put the stream in the cache: the second pass reads (almost) no disk.
    assert second["disk_read_bytes"] - first["disk_read_bytes"] < MiB
    if local_tier == "memlend":
        assert second["local_hits"] > first["local_hits"]


def test_write_during_a_stream_is_seen_by_the_stream(mount_factory) -> None:
    m = mount_factory("--cache-size", "64M", "--block-size", "16K")
    data = bytearray(os.urandom(16 * MiB))
    (m.backing / "big").write_bytes(data)
    reader = os.open(m.mnt / "big", os.O_RDONLY)
    writer = os.open(m.mnt / "big", os.O_WRONLY)
    try:
        got = bytearray()
        for i in range(16):
            if i == 3:
                # Windows for the next megabytes are in flight or read by now.
                patch = os.urandom(3 * MiB)
                assert os.pwrite(writer, patch, 4 * MiB + 100) == len(patch)
                data[4 * MiB + 100 : 7 * MiB + 100] = patch
            got += os.pread(reader, MiB, i * MiB)
        assert got == data
    finally:
        os.close(reader)
        os.close(writer)
    assert _read_all(m.mnt / "big") == data


def test_two_interleaved_streams_on_one_file(mount_factory) -> None:
    m = mount_factory("--cache-size", "4M", "--block-size", "16K")  # cache << file
    data = os.urandom(12 * MiB)
    (m.backing / "big").write_bytes(data)
    a = os.open(m.mnt / "big", os.O_RDONLY)
    b = os.open(m.mnt / "big", os.O_RDONLY)
    try:
        for i in range(12):
            assert os.pread(a, MiB, i * MiB) == data[i * MiB : (i + 1) * MiB]
            j = 11 - i  # b runs backwards: never a stream, must still be right
            assert os.pread(b, MiB, j * MiB) == data[j * MiB : (j + 1) * MiB]
    finally:
        os.close(a)
        os.close(b)
