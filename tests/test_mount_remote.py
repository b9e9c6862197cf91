"""The remote tier through real mounts: lenders and memcached as real processes.

Every test runs real `memlend mount` daemons against real lenders (`memlend lend`,
memcached, or a lying fake memcached served by a thread of this process) on loopback
ports chosen by the kernel; the fixtures (tests/conftest.py) unmount every mount and
kill every process in all paths.

Timing: the remote deadline is 20 ms (not the default 2 ms) so that a loaded machine
(pytest -n) does not turn lender reads into timeouts; assertions on where blocks
came from keep wide margins and none is on latency.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import MEMLEND, Lender, Mount, force_unmount, free_port, is_mounted, memlend
from memlend import native
from memlend.remote.client import LenderClient
from memlend.remote.secret import auth_key, load_secret

KiB, MiB = 1 << 10, 1 << 20
BS = 16 * KiB
STATS_XATTR = "user.memlend.stats"


# ---- helpers -----------------------------------------------------------------------


def stats(m: Mount) -> dict:
    """The mount's counters, read straight from its xattr (no subprocess per call)."""
    return json.loads(os.getxattr(m.mnt, STATS_XATTR))


def disk_read_bytes(pid: int) -> int:
    """What the process read from block devices (/proc/PID/io; O_DIRECT reads count)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/PID/io")


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def lender_states(m: Mount) -> list[str]:
    return [ld["state"] for ld in stats(m)["lenders"]]


def all_active(m: Mount, timeout: float = 10) -> None:
    wait_for(lambda: set(lender_states(m)) == {"active"}, timeout, "every lender active")


def settle(m: Mount, timeout: float = 10) -> None:
    """Wait until every evicted block queued for the lenders has been sent."""
    wait_for(lambda: stats(m)["remote_queued_blocks"] == 0, timeout, "the put queue to drain")


def delta(before: dict, after: dict) -> dict[str, int]:
    return {
        k: after[k] - before[k]
        for k, v in after.items()
        if isinstance(v, int) and not isinstance(v, bool) and k in before
    }


def remote_opts(
    *urls: str,
    seal: Path,
    secret: Path | None = None,
    cache: str = "4M",
    policy: str | None = None,
) -> list[str]:
    opts = ["--cache-size", cache, "--block-size", "16K", "--seal-key-file", str(seal)]
    # Streams ask the lenders even though this machine's disk outruns them.
    opts += ["--remote-deadline", "20", "--lender-streams", "always"]
    for url in urls:
        opts += ["--lender", url]
    if secret is not None:
        opts += ["--secret-file", str(secret)]
    if policy is not None:
        opts += ["--policy", policy]
    return opts


def make_files(
    backing: Path, total: int, nfiles: int, seed: int, prefix: str = "f"
) -> dict[str, bytes]:
    rnd = random.Random(seed)
    data = {}
    for i in range(nfiles):
        name = f"{prefix}{i}"
        data[name] = rnd.randbytes(total // nfiles)
        (backing / name).write_bytes(data[name])
    return data


def drop_pages(*fds: int) -> None:
    """Make the kernel page cache drop these files, as memory pressure would, so that
    the kernel tier's reads reach memlend (memlend's own tier uses direct I/O: no-op)."""
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_pass(
    m: Mount,
    data: dict[str, bytes],
    seed: int,
    chunk: int = BS,
    halfway: Callable[[], None] | None = None,
) -> int:
    """pread every `chunk` of every file once, in a shuffled order; check every byte.

    `halfway` is called once half of the reads are done. Returns the number of reads."""
    fds = {name: os.open(m.mnt / name, os.O_RDONLY) for name in data}
    try:
        drop_pages(*fds.values())
        order = [(name, off) for name, d in data.items() for off in range(0, len(d), chunk)]
        random.Random(seed).shuffle(order)
        for i, (name, off) in enumerate(order):
            if halfway is not None and i == len(order) // 2:
                halfway()
            got = os.pread(fds[name], chunk, off)
            if got != data[name][off : off + chunk]:
                raise AssertionError(f"{name} at {off}: wrong bytes (pass seed {seed})")
        return len(order)
    finally:
        for fd in fds.values():
            os.close(fd)


# ---- 1, 2: a second pass served by the lenders -------------------------------------


@pytest.mark.parametrize(
    ("kind", "local_tier"),
    [
        *((k, t) for k in ("memlend", "memcached", "two-memlend") for t in ("kernel", "memlend")),
        ("memlend-exclusive", "memlend"),  # the kernel tier refuses exclusive mode
    ],
)
def test_second_pass_is_served_by_the_lenders(
    kind, local_tier, request, mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    total = 16 * MiB  # four times the local cache
    if kind == "memcached":
        urls = [f"memcached://127.0.0.1:{request.getfixturevalue('memcached_port')}"]
        secret = None
    else:
        urls = [lender_factory().url for _ in range(2 if kind == "two-memlend" else 1)]
        secret = secret_file
    mode = ["--remote-mode", "exclusive"] if kind.endswith("exclusive") else []
    m = mount_factory(*remote_opts(*urls, seal=seal_key_file, secret=secret), *mode)
    nblocks = total // BS

    def suspensions(st: dict) -> int:
        return sum(ld["suspensions"] for ld in st["lenders"])

    # The prober suspends a lender whose pings average above 2.5 ms (not an option of
    # the mount): a CPU-starved machine can do that mid-pass. Such a run measures
    # the load, not the lender: it is redone on fresh files (at most three times).
    for attempt in range(3):
        data = make_files(m.backing, total, 4, seed=attempt, prefix=f"a{attempt}-f")
        all_active(m)
        s0, io0 = stats(m), disk_read_bytes(m.pid)
        read_pass(m, data, seed=1)
        settle(m)
        s1, io1 = stats(m), disk_read_bytes(m.pid)
        all_active(m)
        read_pass(m, data, seed=2)
        s2, io2 = stats(m), disk_read_bytes(m.pid)
        if suspensions(s2) == suspensions(s0):
            break
    p1, p2 = delta(s0, s1), delta(s1, s2)
    io_1, io_2 = io1 - io0, io2 - io1
    report = f"pass 1 {p1}, /proc {io_1}; pass 2 {p2}, /proc {io_2}; {s2['lenders']}"
    print(f"attempt {attempt}: {report}")

    # Pass 1: everything from the disk, what fell out of the cache lent.
    assert p1["disk_read_bytes"] >= 0.9 * total, report
    # (a lender suspended by a load spike drops its share of the puts: counted)
    assert p1["remote_put_blocks"] + p1["remote_dropped_puts"] >= nblocks // 2, report
    assert p1["remote_put_blocks"] > 0, report
    # Pass 2: most local misses are lender hits, and the disk is hardly read.
    assert p2["local_misses"] >= nblocks // 2, report
    assert p2["remote_hits"] >= 0.5 * p2["local_misses"], report
    assert p2["remote_hits"] - p2["remote_queue_hits"] > 0, report
    assert p2["disk_read_bytes"] <= 0.5 * p1["disk_read_bytes"], report
    # The daemon's own I/O accounting agrees with its counters (reads are O_DIRECT).
    assert io_1 >= 0.9 * total, report
    assert io_2 <= 0.5 * io_1, report
    for d, io in ((p1, io_1), (p2, io_2)):
        assert abs(io - d["disk_read_bytes"]) <= MiB + 0.05 * io, report
    assert s2["seal_failures"] == 0 and s2["remote_errors"] == 0, report
    assert s2["remote_latency_us"]["p50"] > 0, report
    if mode:  # exclusive: what was read back is deleted from the lender
        assert s2["remote_mode"] == "exclusive" and p2["remote_deletes"] > 0, report

    # `memlend stats --json` shows the remote tier, per lender.
    cli = json.loads(memlend("stats", str(m.mnt), "--json").stdout)
    for key in ("remote_hits", "remote_misses", "remote_put_blocks", "remote_dropped_puts",
                "remote_errors", "seal_failures", "remote_latency_us", "local_hits",
                "local_misses", "disk_reads", "disk_read_bytes"):  # fmt: skip
        assert key in cli, key
    assert [ld["url"] for ld in cli["lenders"]] == urls
    for ld in cli["lenders"]:
        assert ld["state"] != "down", cli["lenders"]  # suspended at worst, by load
        assert ld["blocks_held"] > 0, cli["lenders"]
        assert ld["hits"] > 0, cli["lenders"]  # both lenders served reads
    # The kernel tier's one-block hits from one memlend lender in inclusive mode are
    # the C read path's (fs/fast_read.py); everything else is Python's.
    c_path = native.lib is not None and local_tier == "kernel" and kind == "memlend"
    assert cli["read_path"].startswith("native") == c_path, cli["read_path"]
    if c_path:
        assert p2["native_read_hits"] >= 0.5 * p2["remote_hits"], report
    else:
        assert p2["native_read_hits"] == 0, report


# ---- 1b: sequential streams bypass the lenders, and read the disk once -------------


@pytest.mark.parametrize("request_size", [128 * KiB, 256 * KiB, MiB])
def test_a_sequential_read_reads_the_disk_once(
    request_size, mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    """Sequential streams are read ahead from the disk (not asked of the lenders); each
    byte once, whatever the request size (cat reads 128 KiB at a time)."""
    lender = lender_factory()
    m = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=secret_file))
    data = make_files(m.backing, 8 * MiB, 1, seed=13)["f0"]
    s0, io0 = stats(m), disk_read_bytes(m.pid)
    fd = os.open(m.mnt / "f0", os.O_RDONLY)
    try:
        got = b"".join(iter(lambda: os.read(fd, request_size), b""))
    finally:
        os.close(fd)
    assert got == data
    p = delta(s0, stats(m))
    io = disk_read_bytes(m.pid) - io0
    assert p["disk_read_bytes"] <= 1.25 * len(data), f"read amplification: {p}"
    assert io <= 1.25 * len(data), f"/proc read_bytes {io} for {len(data)} bytes"


@pytest.fixture
def throttled(request) -> Iterator[Callable[[int], None]]:
    """throttled(pid): moves a process into a blkio cgroup that caps the backing disk like
    the testbed's `cloud` volume (100 MB/s, 1000 IOPS); the group is removed at teardown."""
    from memlend.bench.testbed import Group, disk_of

    dev = disk_of(Path(str(request.getfixturevalue("tmp_path"))))
    g = Group(f"memlend-test-{os.getpid()}-{threading.get_ident()}", ("blkio",))
    g.create()

    def enter(pid: int) -> None:
        g.write("blkio", "blkio.throttle.read_bps_device", f"{dev} {100_000_000}")
        g.write("blkio", "blkio.throttle.read_iops_device", f"{dev} 1000")
        g.write("blkio", "cgroup.procs", str(pid))

    try:
        yield enter
    finally:
        for pid in g.pids():  # back to the root group, never killed by this fixture
            with open("/sys/fs/cgroup/blkio/cgroup.procs", "w") as f:
                f.write(str(pid))
        g.remove()


def cat(path: Path) -> bytes:
    """Read a file as `cat` does (128 KiB at a time), from memlend, not the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_pages(fd)
        return b"".join(iter(lambda: os.read(fd, 128 * KiB), b""))
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="blkio throttling: root")
def test_a_first_sequential_read_on_a_throttled_disk_lends_every_block(
    mount_factory, lender_factory, secret_file, seal_key_file, throttled
) -> None:
    """The put path keeps up with a disk read at 100 MB/s: `cat` of a file four times
    the cache lends every block it read (none dropped), and a second `cat` reads
    (almost) nothing from the disk."""
    lender = lender_factory()
    opts = remote_opts(lender.url, seal=seal_key_file, secret=secret_file)
    m = mount_factory(*opts)
    throttled(m.pid)
    nblocks = 48 * MiB // BS
    # The prober suspends a lender whose pings average above 2.5 ms, so a CPU-starved
    # machine may drop puts for its own sake: such a pass is redone on a fresh file.
    for attempt in range(3):
        name = f"s{attempt}-0"
        data = make_files(m.backing, nblocks * BS, 1, seed=20 + attempt, prefix=f"s{attempt}-")[
            name
        ]
        os.sync()
        all_active(m)
        s0 = stats(m)
        assert cat(m.mnt / name) == data
        settle(m)
        s1 = stats(m)
        p1 = delta(s0, s1)
        report = f"attempt {attempt}: {p1}, lenders {s1['lenders']}"
        if sum(ld["suspensions"] for ld in s1["lenders"]) > sum(
            ld["suspensions"] for ld in s0["lenders"]
        ):
            print(report)
            continue
        assert p1["remote_dropped_puts"] == 0, report
        # Every block read was lent, but those memlend's own tier still holds (the
        # kernel tier holds none: it lends what it reads).
        assert p1["remote_put_blocks"] + s1["resident_blocks"] >= nblocks, report
        assert p1["disk_read_bytes"] <= 1.1 * len(data), report

        assert cat(m.mnt / name) == data
        p2 = delta(s1, stats(m))
        assert p2["disk_read_bytes"] <= 0.1 * len(data), f"second cat: {p2}"
        assert p2["remote_hits"] >= 0.9 * nblocks - s1["resident_blocks"], f"second cat: {p2}"
        return
    pytest.fail("a lender was suspended in every attempt: the machine is too loaded")


# ---- 3: a lender killed in the middle of a pass, then restarted ---------------------


def restart_on(lender_factory: Callable[..., Lender], port: int) -> Lender:
    """A new, empty lender on the port of a dead one (retried: the port may linger)."""
    for attempt in range(10):
        try:
            return lender_factory(port=port)
        except AssertionError:
            if attempt == 9:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def test_lender_killed_mid_pass_then_restarted_empty(
    mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    lender = lender_factory()
    m = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="2M"))
    data = make_files(m.backing, 8 * MiB, 2, seed=3)
    all_active(m)
    read_pass(m, data, seed=1)
    settle(m)
    all_active(m)

    # kill -9 halfway through the second pass: no read fails, every byte is right.
    s1 = stats(m)
    read_pass(m, data, seed=2, halfway=lender.kill)
    s2 = stats(m)
    p2 = delta(s1, s2)
    assert lender.proc.returncode == -9
    assert p2["remote_hits"] > 0, p2  # the first half did come from the lender
    assert p2["disk_read_bytes"] > 0, p2  # the second half came from the disk
    ld = s2["lenders"][0]
    assert ld["state"] != "active", ld
    assert ld["errors"] >= 1 and ld["last_error"], ld

    # Restarted, empty, on the same port: active again within a few seconds...
    restart_on(lender_factory, lender.port)
    wait_for(lambda: lender_states(m) == ["active"], 10, "the restarted lender active")
    # ...and lent blocks again: evictions reach it, and a later pass reads them back.
    s3 = stats(m)
    read_pass(m, data, seed=3)
    settle(m)
    s4 = stats(m)
    assert s4["remote_put_blocks"] > s3["remote_put_blocks"], delta(s3, s4)
    assert s4["lenders"][0]["put_blocks"] > s3["lenders"][0]["put_blocks"]
    all_active(m)
    read_pass(m, data, seed=4)
    p5 = delta(s4, stats(m))
    assert p5["remote_hits"] - p5["remote_queue_hits"] > 0, p5


def test_a_stopped_lender_costs_time_not_reads(
    mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    """SIGSTOP: the lender accepts connections (the kernel does) but never answers.
    Reads wait at most the deadline, the lender is suspended, the disk answers."""
    lender = lender_factory()
    m = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="1M"))
    data = make_files(m.backing, 4 * MiB, 2, seed=12)
    all_active(m)
    read_pass(m, data, seed=1)
    settle(m)
    all_active(m)
    os.kill(lender.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        n = read_pass(m, data, seed=2)
        elapsed = time.monotonic() - t
        s = stats(m)
        assert s["lenders"][0]["state"] != "active", s["lenders"]
        assert s["remote_timeouts"] >= 1, s
        # Far less than one deadline (20 ms) per read: a few timeouts, then suspended.
        assert elapsed < 0.25 * n * 0.020 + 2, f"{n} reads took {elapsed:.2f} s"
    finally:
        os.kill(lender.pid, signal.SIGCONT)
    wait_for(lambda: lender_states(m) == ["active"], 10, "the lender resumed")
    read_pass(m, data, seed=3)


# ---- 3b: blocks the lender dropped (its host wanted the memory) are lent again ------


def test_blocks_a_lender_gave_back_are_lent_again(
    tmp_path, mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    """Inclusive mode skips re-sending a block it read back from a lender (the lender
    keeps it). When the lender has dropped it meanwhile -- here because its host
    needed the memory -- the block must be sent again once it is evicted again,
    not skipped for good."""
    avail = tmp_path / "available"  # the lender's view of its host's free memory
    avail.write_text(str(8 << 30))
    lender = lender_factory(
        "--reserve", "1G", "--memory-source-file", str(avail), "--watch-interval", "0.1",
        memory="8M",
    )  # fmt: skip
    m = mount_factory(
        *remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="1M", policy="lru")
    )
    a = make_files(m.backing, MiB, 1, seed=10)  # 64 blocks
    (m.backing / "flusher").write_bytes(random.Random(11).randbytes(3 * MiB // 2))
    flusher = {"flusher": (m.backing / "flusher").read_bytes()}
    nblocks = MiB // BS
    all_active(m)

    def lender_stats() -> dict:
        with LenderClient(("127.0.0.1", lender.port), key, b"test", timeout=5) as c:
            return c.stats()

    key = auth_key(load_secret(str(secret_file)))

    def step(d: dict[str, bytes]) -> dict[str, int]:
        s0 = stats(m)
        read_pass(m, d, seed=0)
        settle(m)
        return delta(s0, stats(m))

    step(a)
    step(flusher)  # a is lent...
    p = step(a)  # ...and read back: the tier now knows the lender holds it
    assert p["remote_hits"] >= 0.9 * nblocks, p
    step(flusher)  # a is evicted again: not re-sent (the lender has it), rightly
    # The lender's host runs short of memory: it gives back every block.
    assert lender_stats()["blocks"] >= nblocks
    avail.write_text(str((1 << 30) - (16 << 20)))
    wait_for(lambda: lender_stats()["blocks"] == 0, 5, "the lender to give back its blocks")
    avail.write_text(str(8 << 30))
    full = lender_stats()["slots"] * lender_stats()["slot_size"]
    wait_for(lambda: lender_stats()["allowed_bytes"] == full, 5, "the lender to grow back")
    all_active(m)
    p = step(a)  # from the disk: the lender has nothing
    assert p["remote_hits"] - p["remote_queue_hits"] == 0, p
    step(flusher)  # a is evicted again: the lender no longer holds it, so it is sent
    p = step(a)
    assert p["remote_hits"] - p["remote_queue_hits"] >= 0.5 * nblocks, (
        f"blocks the lender dropped were never lent again: {p}"
    )


# ---- 4: a lender that lies ------------------------------------------------------------


class FakeMemcached:
    """Just enough of memcached's text protocol (what memlend.remote.memcached sends:
    get/gets, set, delete, version, stats), served by threads of this process, that
    answers gets with wrong bytes.

    mode "garbage": random bytes of the stored length; "swap": the value stored under
    another key; "mixed": in turn honest, swapped, garbage, one bit flipped, one byte
    short."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.store: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.turn = 0
        self.answers: dict[str, int] = {}
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self.threads.append(t)
            t.start()

    def _lie(self, key: bytes, value: bytes) -> bytes:
        """The answer for `key` (lock held)."""
        how = self.mode
        if how == "mixed":
            how = ("honest", "swap", "garbage", "flip", "short")[self.turn % 5]
            self.turn += 1
        if how == "swap":
            others = [k for k, v in self.store.items() if k != key and len(v) == len(value)]
            if others:
                self.answers["swap"] = self.answers.get("swap", 0) + 1
                return self.store[random.choice(others)]
            how = "garbage"
        self.answers[how] = self.answers.get(how, 0) + 1
        if how == "garbage":
            return os.urandom(len(value))
        if how == "flip":
            i = len(value) // 2
            return value[:i] + bytes((value[i] ^ 1,)) + value[i + 1 :]
        if how == "short":
            return value[:-1]
        return value

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()

        def need(n: int) -> bool:
            while len(buf) < n:
                data = conn.recv(1 << 20)
                if not data:
                    return False
                buf.extend(data)
            return True

        try:
            while True:
                while b"\r\n" not in buf:
                    data = conn.recv(1 << 20)
                    if not data:
                        return
                    buf.extend(data)
                i = buf.index(b"\r\n")
                words = bytes(buf[:i]).split()
                del buf[: i + 2]
                cmd, args = (words[0], words[1:]) if words else (b"", [])
                out = []
                if cmd in (b"get", b"gets"):
                    with self.lock:
                        for key in args:
                            value = self.store.get(key)
                            if value is None:
                                continue
                            answer = self._lie(key, value)
                            cas = b" 1" if cmd == b"gets" else b""
                            out.append(b"VALUE %s 0 %d%s\r\n" % (key, len(answer), cas))
                            out += [answer, b"\r\n"]
                    out.append(b"END\r\n")
                elif cmd == b"set" and len(args) >= 4:
                    n = int(args[3])
                    if not need(n + 2):
                        return
                    with self.lock:
                        self.store[args[0]] = bytes(buf[:n])
                    del buf[: n + 2]
                    if args[-1] != b"noreply":
                        out.append(b"STORED\r\n")
                elif cmd == b"delete" and args:
                    with self.lock:
                        self.store.pop(args[0], None)
                    if args[-1] != b"noreply":
                        out.append(b"DELETED\r\n")
                elif cmd == b"version":
                    out.append(b"VERSION 1.6.0-fake\r\n")
                elif cmd == b"stats":
                    with self.lock:
                        out.append(b"STAT curr_items %d\r\nEND\r\n" % len(self.store))
                else:
                    out.append(b"ERROR\r\n")
                conn.sendall(b"".join(out))
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        with self.lock:
            conns = [self.sock, *self.conns]
        for c in conns:  # shutdown, not close, wakes a thread blocked on the socket
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(5)
        self.sock.close()


@pytest.fixture
def fake_memcached() -> Iterator[Callable[[str], FakeMemcached]]:
    made: list[FakeMemcached] = []

    def start(mode: str) -> FakeMemcached:
        made.append(FakeMemcached(mode))
        return made[-1]

    try:
        yield start
    finally:
        for fake in made:
            fake.close()


@pytest.mark.parametrize("mode", ["garbage", "swap", "mixed"])
def test_a_lying_lender_never_changes_what_reads_return(
    mode, mount_factory, fake_memcached, seal_key_file
) -> None:
    fake = fake_memcached(mode)
    url = f"memcached://127.0.0.1:{fake.port}"
    m = mount_factory(*remote_opts(url, seal=seal_key_file, cache="1M"))
    data = make_files(m.backing, 4 * MiB, 2, seed=4)
    all_active(m)
    read_pass(m, data, seed=1)
    settle(m)
    assert len(fake.store) > 0
    for seed in (2, 3):  # every read right, however the lender lies
        all_active(m)
        read_pass(m, data, seed=seed)
    s = stats(m)
    report = f"{fake.answers} {s['lenders']} hits {s['remote_hits']} q {s['remote_queue_hits']}"
    assert s["seal_failures"] > 0, report
    assert s["seal_failures"] <= sum(n for k, n in fake.answers.items() if k != "honest"), report
    lender_hits = s["remote_hits"] - s["remote_queue_hits"]
    if mode == "mixed":
        assert fake.answers.get("honest", 0) > 0 and lender_hits > 0, report
        assert lender_hits <= fake.answers["honest"], report
    else:
        assert lender_hits == 0, report  # no lie was taken for a block


# ---- 5: writes and outside changes never bring back a lent old copy ------------------


class Target:
    """A file whose blocks are made to sit on the lender, not in the local cache, before
    every change: read it, then read a flusher file bigger than the (LRU) cache."""

    def __init__(self, m: Mount, content: bytes, flusher_size: int) -> None:
        self.m = m
        self.model = bytearray(content)
        (m.backing / "t").write_bytes(content)
        (m.backing / "flusher").write_bytes(random.Random(9).randbytes(flusher_size))
        self.flusher = {"flusher": (m.backing / "flusher").read_bytes()}

    def check(self, fd: int | None = None) -> None:
        """Every byte as the model says, through `fd` (16 KiB preads) and a fresh open."""
        want = bytes(self.model)
        if fd is not None:
            assert os.fstat(fd).st_size == len(want)
            got = b"".join(os.pread(fd, BS, off) for off in range(0, len(want), BS))
            assert got == want, "stale or wrong bytes through the open descriptor"
        with open(self.m.mnt / "t", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(BS), b""))
        assert got == want, "stale or wrong bytes through a fresh open"

    def evict(self) -> None:
        read_pass(self.m, self.flusher, seed=0)
        settle(self.m)
        fd = os.open(self.m.mnt / "t", os.O_RDONLY)  # the kernel tier's local copy
        drop_pages(fd)
        os.close(fd)

    def lend(self) -> None:
        """Leave every block of t on the lender (checked) and none in the local cache.

        Retried: on a loaded machine a lender read may miss its deadline, and that block
        then comes from the disk (it is lent again at the next eviction). The kernel tier
        may ask for a block twice (a readahead window ending inside it, a page reclaimed
        before it was read: 17 lender hits for 16 blocks in one CI run), so the test is:
        nothing from the disk or the local cache, every miss served by the lender."""
        self.check()  # in the local cache (from wherever)...
        nblocks = -(-len(self.model) // BS)
        for _ in range(5):
            self.evict()  # ...then lent
            all_active(self.m)
            s0 = stats(self.m)
            self.check()  # read back from the lender, all of it...
            p = delta(s0, stats(self.m))
            lent = p["remote_hits"] == p["local_misses"] >= nblocks and not p["local_hits"]
            if lent and p["disk_read_bytes"] == 0:
                self.evict()  # ...and out of the local cache again
                return
        shown = {k: v for k, v in p.items() if v and k not in ("pid", "started")}
        raise AssertionError(f"t is not all on the lender: {shown}")


def test_writes_through_the_mount_never_read_back_a_lent_old_copy(
    mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    lender = lender_factory()
    # The daemon's own write path: in passthrough a written file never reaches the
    # lenders at all (tests/test_mount_passthrough.py checks that case).
    m = mount_factory(
        *remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="1M", policy="lru"),
        "--no-passthrough",
    )
    rnd = random.Random(5)
    t = Target(m, rnd.randbytes(16 * BS), flusher_size=2 * MiB)
    all_active(m)
    t.check()
    t.lend()
    fd = os.open(m.mnt / "t", os.O_RDWR)
    try:
        # A full block.
        new = rnd.randbytes(BS)
        assert os.pwrite(fd, new, 2 * BS) == BS
        t.model[2 * BS : 3 * BS] = new
        t.check(fd)
        # Part of a block.
        t.lend()
        new = rnd.randbytes(300)
        assert os.pwrite(fd, new, 5 * BS + 100) == 300
        t.model[5 * BS + 100 : 5 * BS + 400] = new
        t.check(fd)
        # Truncate into a block, then extend by writing past the end (a hole of zeros).
        t.lend()
        os.ftruncate(fd, 3 * BS + 1000)
        del t.model[3 * BS + 1000 :]
        t.check(fd)
        t.lend()
        new = rnd.randbytes(BS + 7)
        assert os.pwrite(fd, new, 10 * BS + 7) == len(new)
        t.model += bytes(10 * BS + 7 - len(t.model)) + new
        t.check(fd)
        # Extend by truncate (zeros).
        t.lend()
        os.ftruncate(fd, 14 * BS)
        t.model += bytes(14 * BS - len(t.model))
        t.check(fd)
    finally:
        os.close(fd)
    s = stats(m)
    assert s["writes"] >= 3 and s["seal_failures"] == 0, s


def test_outside_changes_are_seen_at_open_not_the_lent_copy(
    mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    lender = lender_factory()
    # The page cache tier's own checks: in passthrough a file changed outside (its
    # pages in the backing store's cache) is read from the backing file itself.
    m = mount_factory(
        *remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="1M", policy="lru"),
        "--attr-timeout",
        "0.2",
        "--no-passthrough",
    )
    rnd = random.Random(6)
    t = Target(m, rnd.randbytes(16 * BS), flusher_size=2 * MiB)
    all_active(m)
    backing = m.backing / "t"
    # Same size, new bytes, and the old mtime put back: only the ctime tells.
    t.lend()
    st = os.stat(backing)
    with open(backing, "r+b") as f:
        f.seek(3 * BS + 5)
        new = rnd.randbytes(2 * BS)
        f.write(new)
    os.utime(backing, ns=(st.st_atime_ns, st.st_mtime_ns))
    t.model[3 * BS + 5 : 5 * BS + 5] = new
    t.check()
    # Appended to, and every block rewritten, by a new file renamed over it.
    t.lend()
    content = rnd.randbytes(17 * BS + 3)
    tmp = m.backing / "t.new"
    tmp.write_bytes(content)
    os.rename(tmp, backing)
    time.sleep(0.3)  # the kernel keeps the name -> old inode for --attr-timeout
    t.model[:] = content
    t.check()
    # Rewritten in place, all of it, same size.
    t.lend()
    content = rnd.randbytes(len(t.model))
    backing.write_bytes(content)
    t.model[:] = content
    t.check()
    assert stats(m)["seal_failures"] == 0


# ---- 6: a mount with the wrong secret, another with the right one, one lender --------


def test_wrong_secret_reads_from_disk_and_the_lender_serves_the_right_client(
    tmp_path, mount_factory, lender_factory, secret_file, seal_key_file
) -> None:
    lender = lender_factory()
    wrong = tmp_path / "wrong.secret"
    wrong.write_text(os.urandom(32).hex() + "\n")
    wrong.chmod(0o600)
    bad = mount_factory(*remote_opts(lender.url, seal=seal_key_file, secret=wrong, cache="1M"))
    good = mount_factory(
        *remote_opts(lender.url, seal=seal_key_file, secret=secret_file, cache="1M")
    )
    total = 4 * MiB
    mounts = {"bad": bad, "good": good}
    data = {k: make_files(mt.backing, total, 2, seed=len(k)) for k, mt in mounts.items()}
    all_active(good)
    before = {k: stats(mt) for k, mt in mounts.items()}
    errors: list[BaseException] = []

    def two_passes(k: str) -> None:
        try:
            read_pass(mounts[k], data[k], seed=1)
            settle(mounts[k])
            read_pass(mounts[k], data[k], seed=2)
        except BaseException as e:
            errors.append(e)

    # Both mounts at the same time.
    threads = [threading.Thread(target=two_passes, args=(k,)) for k in mounts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)

    sb, sg = stats(bad), stats(good)
    b, g = delta(before["bad"], sb), delta(before["good"], sg)
    ld = sb["lenders"][0]
    assert ld["state"] != "active", ld
    assert ld["errors"] > 0 and "Auth" in ld["last_error"], ld
    assert b["remote_hits"] == b["remote_queue_hits"], b  # nothing came from the lender
    assert b["disk_read_bytes"] >= 1.5 * total, b  # both passes from the disk
    assert sb["remote_put_blocks"] == 0 and sb["remote_dropped_puts"] > 0, sb
    # The lender is unharmed and kept serving the right client meanwhile.
    assert lender.proc.poll() is None
    assert sg["lenders"][0]["state"] == "active", sg["lenders"]
    assert g["remote_hits"] - g["remote_queue_hits"] > 0, g
    # (blocks_held is this client's count on the lender, as of the prober's last STATS)
    wait_for(lambda: stats(good)["lenders"][0]["blocks_held"] > 0, 5, "blocks held")


def test_unreachable_lenders_cost_nothing_but_time(mount_factory, secret_file, seal_key_file):
    urls = [f"memlend://127.0.0.1:{free_port()}", f"memcached://127.0.0.1:{free_port()}"]
    m = mount_factory(*remote_opts(*urls, seal=seal_key_file, secret=secret_file, cache="1M"))
    data = make_files(m.backing, 2 * MiB, 2, seed=8)
    for seed in (1, 2):
        read_pass(m, data, seed=seed)
    s = stats(m)
    assert [ld["state"] for ld in s["lenders"]] == ["down", "down"], s["lenders"]
    assert all(ld["errors"] > 0 for ld in s["lenders"]), s["lenders"]
    assert s["remote_put_blocks"] == 0


# ---- 7: bad input: one line, no traceback, non-zero exit, nothing left behind -------


def _daemons_for(mnt: Path) -> list[int]:
    """Processes whose command line names this mountpoint (only ours can)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if str(mnt).encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize(
    "case",
    [
        "unknown-scheme",
        "no-port",
        "bad-port",
        "memlend-without-secret",
        "missing-secret",
        "empty-secret",
        "short-secret",
        "missing-seal-key",
        "zero-deadline",
        "exclusive-on-kernel-tier",
    ],
)
def test_bad_remote_options_are_one_line_and_leave_nothing(case, tmp_path, seal_key_file):
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    (tmp_path / "empty").write_text("")
    (tmp_path / "short").write_text("abcd\n")
    good = tmp_path / "good.secret"
    good.write_text(os.urandom(32).hex() + "\n")
    for p in ("empty", "short", "good.secret"):
        (tmp_path / p).chmod(0o600)
    lend = f"memlend://127.0.0.1:{free_port()}"
    args = {
        "unknown-scheme": ["--lender", "foo://x:1", "--secret-file", str(good)],
        "no-port": ["--lender", "memlend://nohost", "--secret-file", str(good)],
        "bad-port": ["--lender", "memcached://127.0.0.1:http"],
        "memlend-without-secret": ["--lender", lend],
        "missing-secret": ["--lender", lend, "--secret-file", str(tmp_path / "nope")],
        "empty-secret": ["--lender", lend, "--secret-file", str(tmp_path / "empty")],
        "short-secret": ["--lender", lend, "--secret-file", str(tmp_path / "short")],
        "missing-seal-key": ["--lender", lend, "--secret-file", str(good)],
        "zero-deadline": ["--lender", lend, "--secret-file", str(good), "--remote-deadline", "0"],
        "exclusive-on-kernel-tier": [
            "--lender",
            lend,
            "--secret-file",
            str(good),
            "--local-tier",
            "kernel",
            "--remote-mode",
            "exclusive",
        ],
    }[case]
    seal = tmp_path / "nope" if case == "missing-seal-key" else seal_key_file
    cmd = [*MEMLEND, "mount", str(backing), str(mnt), "--cache-size", "1M"]
    cmd += [*args, "--seal-key-file", str(seal), "--log-file", str(tmp_path / "mount.log")]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0, r.stderr
        assert r.stderr.startswith("memlend"), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert not is_mounted(mnt)
        wait_for(lambda: not _daemons_for(mnt), 10, "no daemon left")
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
        for pid in _daemons_for(mnt):
            try:
                os.kill(pid, 9)
            except OSError as e:
                assert e.errno == errno.ESRCH
