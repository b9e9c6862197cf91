"""Real programs on a real mount: sqlite3, tar, cp -a, mmap, fio."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import Mount


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed (Debian package; see the Makefile)")
    return path


def run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd[0]} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def make_tree(root: Path, seed: int = 0) -> None:
    """A small tree: nested dirs, files of awkward sizes, modes, symlinks, hard links."""
    rng = random.Random(seed)
    root.mkdir()
    for d in ("a", "a/b", "a/b/c", "empty", "modes"):
        (root / d).mkdir()
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 65536 + 3, 300_000, 1 << 20]):
        (root / "a" / f"f{i}").write_bytes(rng.randbytes(size))
    (root / "a/b/c/deep.txt").write_text("deep\n" * 1000)
    for mode in (0o600, 0o640, 0o755, 0o700, 0o444, 0o4755, 0o2750):
        p = root / "modes" / f"m{mode:o}"
        p.write_bytes(rng.randbytes(100))
        os.chmod(p, mode)
    os.chmod(root / "a/b", 0o750)
    os.chmod(root / "empty", 0o1777)
    os.symlink("f3", root / "a/link")
    os.symlink("../a/b/c/deep.txt", root / "modes/rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "a/f5", root / "a/b/hard")
    os.link(root / "a/f5", root / "hard2")
    os.chown(root / "a/f1", 65534, 65534)
    os.chown(root / "a/link", 65534, 65534, follow_symlinks=False)


def describe(root: Path) -> dict[str, tuple]:
    """Type, mode, owner, size, content hash / link target, and hard-link groups."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            s = os.lstat(p)
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    what: object = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(s.st_ino, []).append(rel)
                size: int | None = s.st_size
            elif stat.S_ISLNK(s.st_mode):
                what, size = os.readlink(p), s.st_size
            else:
                what, size = "dir", None
            out[rel] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                        size, what, s.st_nlink if size is not None else None)  # fmt: skip
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return {"entries": out, "hard links": links}


def test_sqlite(mount: Mount) -> None:
    db = mount.mnt / "test.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
    rng = random.Random(7)
    rows = [(i, f"key{i:06d}", rng.randbytes(rng.randrange(10, 600))) for i in range(20000)]
    for start in range(0, len(rows), 2000):
        with con:
            con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows[start : start + 2000])
    con.execute("CREATE INDEX tk ON t (k)")
    with con:
        con.execute("UPDATE t SET v = x'00' WHERE id % 7 = 0")
        con.execute("DELETE FROM t WHERE id % 11 = 0")
    con.close()
    assert db.stat().st_size > 4 << 20  # a good part of the 8 MiB cache

    con = sqlite3.connect(db)
    want = [r for r in rows if r[0] % 11]
    want = [(i, k, b"\0" if i % 7 == 0 else v) for i, k, v in want]
    assert con.execute("SELECT id, k, v FROM t ORDER BY id").fetchall() == want
    assert con.execute("SELECT id FROM t WHERE k = 'key012345'").fetchall() == [(12345,)]
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()

    # The sqlite3 program agrees, on the mount and on the backing file.
    need("sqlite3")
    for path in (db, mount.backing / "test.db"):
        assert run("sqlite3", path, "PRAGMA integrity_check;").strip() == "ok"
        assert run("sqlite3", path, "SELECT count(*) FROM t;").strip() == str(len(want))


def test_tar_extract(mount: Mount, tmp_path: Path) -> None:
    need("tar")
    src = tmp_path / "src"
    make_tree(src, seed=1)
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as t:
        t.add(src, arcname="tree")
    run("tar", "-x", "-p", "--same-owner", "-f", archive, "-C", mount.mnt)
    assert describe(mount.mnt / "tree") == describe(src)
    assert describe(mount.backing / "tree") == describe(src)
    run("diff", "-r", "--no-dereference", src, mount.mnt / "tree")


def test_cp_a(mount: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, seed=2)
    run("cp", "-a", src, mount.mnt / "copy")
    assert describe(mount.mnt / "copy") == describe(src)
    assert describe(mount.backing / "copy") == describe(src)
    run("diff", "-r", "--no-dereference", src, mount.mnt / "copy")
    # And back out again: what the mount serves copies as the original.
    run("cp", "-a", mount.mnt / "copy", tmp_path / "back")
    assert describe(tmp_path / "back") == describe(src)


MMAP_PROGRAM = textwrap.dedent(
    """
    import mmap, os, sys
    path, size = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    before = bytes(m[:size])
    for off in range(0, size, 4096 * 3 + 17):
        m[off : off + 5] = b"SHARE"
    m.flush()
    m.close()
    p = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    p[0:7] = b"PRIVATE"
    assert p[0:7] == b"PRIVATE"
    p.close()
    os.close(fd)
    sys.stdout.write(before.hex())
    """
)


def test_mmap_shared_and_private(mount: Mount) -> None:
    f, b = mount.mnt / "f", mount.backing / "f"
    size = 5 * 4096 + 1000
    data = bytearray(random.Random(3).randbytes(size))
    f.write_bytes(data)
    f.read_bytes()  # cached before it is mapped
    # A separate process, so its mappings and descriptors are surely gone at exit.
    out = subprocess.run(
        [sys.executable, "-c", MMAP_PROGRAM, str(f), str(size)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == data  # the mapping showed the file's bytes
    for off in range(0, size, 4096 * 3 + 17):
        data[off : off + 5] = b"SHARE"
    # MAP_SHARED writes reached BACKING; the MAP_PRIVATE write did not.
    assert b.read_bytes() == data
    assert f.read_bytes() == data

    # In this process: read-only shared mapping of a file changed by write(2) after it
    # was cached, and a mapping that sees write(2)s made while it exists.
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"WRITTEN", 4096)
        data[4096 : 4096 + 7] = b"WRITTEN"
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:] == data
            m[100:104] = b"abcd"
            data[100:104] = b"abcd"
            m.flush()
            assert os.pread(os.open(b, os.O_RDONLY), 4, 100) == b"abcd"
        with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as p:
            assert p[:] == data
            p[0:3] = b"xyz"
        assert os.pread(fd, size + 1, 0) == data
    finally:
        os.close(fd)
    assert b.read_bytes() == data


def _fio(cwd: Path, *args: str) -> str:
    need("fio")
    common = ["--ioengine=psync", "--direct=0", "--bs=4k", "--size=4M", "--numjobs=1"]
    return run("fio", "--output-format=terse", *common, *args, cwd=cwd, timeout=120)


def test_fio_write_then_verify(mount: Mount) -> None:
    # Random writes with a crc32c header in every block, then a separate read pass
    # verifying every block.
    job = ["--name=w", "--filename=data", "--rw=randwrite", "--verify=crc32c", "--randrepeat=1"]
    _fio(mount.mnt, *job, "--do_verify=0", "--verify_state_save=0")
    _fio(mount.mnt, *job, "--verify_only", "--verify_fatal=1", "--verify_state_load=0")
    # Also write-and-verify in one job, sequential with a block size across blocks.
    _fio(mount.mnt, "--name=s", "--filename=seq", "--rw=write", "--bs=12k",
         "--verify=crc32c", "--verify_fatal=1")  # fmt: skip
    assert (mount.backing / "data").stat().st_size == 4 << 20


def test_fio_randread(mount: Mount, local_tier: str) -> None:
    (mount.backing / "data").write_bytes(random.Random(9).randbytes(4 << 20))
    before = mount.stats()
    # (fio drops a file's page cache before each loop unless told not to)
    _fio(mount.mnt, "--name=r", "--filename=data", "--rw=randread", "--loops=3", "--invalidate=0")
    after = mount.stats()
    # 3 passes over 4 MiB through an 8 MiB cache (or the page cache): the later passes hit.
    if local_tier == "memlend":
        assert after["local_hits"] - before["local_hits"] >= 2 * 1024
    assert after["disk_read_bytes"] - before["disk_read_bytes"] <= 5 << 20


def test_mmap_coherent_with_read_and_write(mount: Mount) -> None:
    """A shared mapping and read(2)/write(2) on the mount see each other at once."""
    f = mount.mnt / "f"
    f.write_bytes(b"a" * 8192)
    fd = os.open(f, os.O_RDWR)
    other = os.open(f, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED) as m:
            assert m[:4] == b"aaaa"
            m[0:4] = b"MMAP"  # no msync: still only in the mapping's pages
            assert os.pread(fd, 4, 0) == b"MMAP"
            assert os.pread(other, 4, 0) == b"MMAP"
            os.pwrite(fd, b"WRIT", 4096)
            assert m[4096:4100] == b"WRIT"
            os.pwrite(fd, b"OVER", 0)  # over a dirty page of the mapping
            assert m[0:4] == b"OVER"
            m.flush()
        assert os.pread(other, 8192, 0) == b"OVER" + b"a" * 4092 + b"WRIT" + b"a" * 4092
    finally:
        os.close(fd)
        os.close(other)
    assert (mount.backing / "f").read_bytes() == f.read_bytes()


def test_big_directory_lists_and_removes(mount: Mount) -> None:
    # Thousands of short names: one READDIR asks for up to 128 KiB of entries, more
    # records than writev() takes pieces (a reply refused by the kernel left `rm -r`
    # blocked for good; SIGKILL cannot free a process waiting on a FUSE request).
    d = mount.backing / "big"
    d.mkdir()
    names = {f"f{i}" for i in range(5000)}
    for n in names:
        (d / n).touch()
    for cmd in (["ls", "-f", str(mount.mnt / "big")], ["rm", "-r", str(mount.mnt / "big")]):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(mount.pid, 9)  # frees the caller (the connection is aborted)
            p.communicate()
            pytest.fail(f"{cmd[0]} on a directory of 5000 files hung")
        assert p.returncode == 0, err
        if cmd[0] == "ls":
            assert set(out.split()) == names | {".", ".."}
    assert not d.exists()
