"""Lender identity (issue 10, item 6): a key per client, namespaces bound to keys,
per-client quotas, per-run sealing keys; against a real `memlend lend --clients`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import memlend
from memlend.errors import UserError
from memlend.lender.clients import load_clients
from memlend.remote.client import LenderClient, RemoteAuthError, RemoteError
from memlend.remote.sealing import RunSealer, SealError
from memlend.remote.secret import auth_key, write_secret

BLOCK = 16 << 10


@pytest.fixture
def clients(tmp_path: Path) -> dict[str, bytes]:
    """alice (key file, no quota) and bob (inline key, quota 16 blocks): name -> secret."""
    write_secret(str(tmp_path / "alice.key"))
    alice = bytes.fromhex((tmp_path / "alice.key").read_text().strip())
    bob = os.urandom(32)
    (tmp_path / "clients").write_text(
        "# name key quota\n"
        "alice  alice.key  -      # a relative path: next to this file\n"
        f"bob    {bob.hex()}  256K\n"
    )
    return {"alice": alice, "bob": bob}


def connect(port: int, name: str, secret: bytes) -> LenderClient:
    return LenderClient(("127.0.0.1", port), auth_key(secret), name.encode(), timeout=5)


def blocks(tag: bytes, n: int) -> list[tuple[bytes, bytes]]:
    return [(b"k%d" % i, tag * (BLOCK // len(tag)) + b"%d" % i) for i in range(n)]


def test_a_client_cannot_reach_another_clients_blocks(
    lender_factory, clients, tmp_path: Path
) -> None:
    lender = lender_factory("--clients", str(tmp_path / "clients"))
    mine = blocks(b"A", 8)
    with connect(lender.port, "alice", clients["alice"]) as alice:
        assert alice.put_many(mine) == 8
    with connect(lender.port, "bob", clients["bob"]) as bob:
        # Same keys, bob's namespace: nothing to read, and his writes and deletes
        # land in his own namespace only.
        assert bob.multi_get([k for k, _ in mine]) == [None] * 8
        assert bob.put_many(blocks(b"B", 4)) == 4
        assert bob.invalidate([k for k, _ in mine]) == 4  # his own 4, not alice's 8
        assert bob.invalidate_all() == 0
    # bob's key under alice's name, an unknown name, a wrong key: refused at the
    # handshake, the same error a wrong shared secret gets.
    for name, secret in (("alice", clients["bob"]), ("carol", clients["bob"])):
        with pytest.raises(RemoteAuthError, match="wrong secret"):
            connect(lender.port, name, secret)
    with pytest.raises(RemoteAuthError, match="wrong secret"):
        connect(lender.port, "alice", os.urandom(32))
    # The lender's operator learns of the unknown name (its log is in tmp_path).
    wait_until = time.monotonic() + 5
    log = tmp_path / "lender0.log"
    while "unknown client 'carol'" not in log.read_text() and time.monotonic() < wait_until:
        time.sleep(0.05)
    assert "failed authentication: unknown client 'carol'" in log.read_text()
    with connect(lender.port, "alice", clients["alice"]) as alice:
        assert alice.multi_get([k for k, _ in mine]) == [v for _, v in mine]
        s = alice.stats()
        assert s["client_blocks"] == 8
        # Tenants see their own sizing advice, not each other's activity.
        assert list(s["client_advice"]) == [b"alice".hex()]  # named by its id's first 8 bytes


def test_quota_keeps_a_clients_newest_blocks_and_spares_the_others(
    lender_factory, clients, tmp_path: Path
) -> None:
    lender = lender_factory("--clients", str(tmp_path / "clients"))
    with connect(lender.port, "alice", clients["alice"]) as alice:
        assert alice.put_many(blocks(b"A", 20)) == 20
    many = blocks(b"B", 40)  # bob's quota is 256K: 16 blocks
    with connect(lender.port, "bob", clients["bob"]) as bob:
        assert bob.put_many(many) == 40  # accepted: his own oldest made room
        got = bob.multi_get([k for k, _ in many])
        assert got[:24] == [None] * 24
        assert got[24:] == [v for _, v in many[24:]]
        s = bob.stats()
        assert s["client_blocks"] == 16 and s["blocks"] == 36, s
    with connect(lender.port, "alice", clients["alice"]) as alice:
        assert alice.stats()["client_blocks"] == 20


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", "expected `name key quota`"),
        ("al/ice 00 -\n", "client name 'al/ice'"),
        ("alice nosuch.key -\n", "does not exist"),
        ("a {k} -\na {k2} -\n", "listed twice"),
        ("a {k} -\nb {k} -\n", "same key as a"),
        ("a {k} lots\n", "quota: invalid size"),
        ("# nobody\n", "lists no clients"),
    ],
)
def test_bad_clients_files_are_refused_with_the_line(tmp_path: Path, text, error) -> None:
    path = tmp_path / "clients"
    path.write_text(text.format(k=os.urandom(32).hex(), k2=os.urandom(32).hex()))
    with pytest.raises(UserError, match=error):
        load_clients(str(path))


def test_lend_command_line_errors_are_one_line(tmp_path: Path, secret_file) -> None:
    path = tmp_path / "clients"
    path.write_text("alice\n")
    r = memlend("lend", "--listen", "127.0.0.1:0", "--memory", "16M", "--clients", str(path),
                "--foreground", check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{path}:1" in r.stderr
    # Item 7: more memory than the host has is named, with what the host has.
    r = memlend("lend", "--listen", "127.0.0.1:0", "--memory", "100T", "--secret-file",
                str(secret_file), "--foreground", check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--memory 100T (102400.0 GiB) is more than this host has" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_sealer_rekeys_and_older_keys_become_misses() -> None:
    secret, epoch = os.urandom(32), os.urandom(8)
    s = RunSealer(secret, epoch, seals_per_key=3)
    first = [s.seal(b"key%d" % i, b"data%d" % i) for i in range(3)]
    assert s.generation == 0
    second = [s.seal(b"key%d" % i, b"data%d" % i) for i in range(3, 6)]
    assert s.generation == 1  # the 4th seal took a new key
    # Just before and after the rekey: both open.
    assert [s.open(b"key%d" % i, b) for i, b in enumerate(first + second)] == [
        b"data%d" % i for i in range(6)
    ]
    s.seal(b"key6", b"data6")
    assert s.generation == 2
    with pytest.raises(SealError):  # two generations back: a miss
        s.open(b"key0", first[0])
    assert s.open(b"key3", second[0]) == b"data3"
    # Another run (epoch) of the same mount cannot open this run's blocks.
    other = RunSealer(secret, os.urandom(8), seals_per_key=3)
    with pytest.raises(SealError):
        other.open(b"key3", second[0])
    # The same secret and epoch derive the same keys (nothing random but the nonces).
    again = RunSealer(secret, epoch)
    assert again.open(b"key0", first[0]) == b"data0"


def test_a_named_mount_is_served_and_counts_its_own_blocks(
    lender_factory, mount_factory, clients, tmp_path: Path, seal_key_file
) -> None:
    from test_mount_remote import all_active, make_files, read_pass, remote_opts, settle, stats

    lender = lender_factory("--clients", str(tmp_path / "clients"))
    with connect(lender.port, "bob", clients["bob"]) as bob:
        assert bob.put_many(blocks(b"B", 10)) == 10  # another client's blocks
    opts = remote_opts(lender.url, seal=seal_key_file, secret=tmp_path / "alice.key", cache="1M")
    m = mount_factory(*opts, "--client-name", "alice")
    data = make_files(m.backing, 4 << 20, 2, seed=3)
    all_active(m)
    read_pass(m, data, seed=1)
    settle(m)
    before = stats(m)["remote_hits"] - stats(m)["remote_queue_hits"]
    read_pass(m, data, seed=2)
    s = stats(m)
    assert s["remote_hits"] - s["remote_queue_hits"] > before, s  # served by the lender

    with connect(lender.port, "alice", clients["alice"]) as alice:
        own = alice.stats()["client_blocks"]
    assert own > 0
    # The mount's "blocks held" is its own count (as of the prober's last STATS), not
    # the lender's total, which includes bob's 10.
    end = time.monotonic() + 10
    while stats(m)["lenders"][0]["blocks_held"] != own and time.monotonic() < end:
        time.sleep(0.1)
    assert stats(m)["lenders"][0]["blocks_held"] == own, stats(m)["lenders"]


def test_client_name_needs_a_valid_name_and_a_secret(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "b", tmp_path / "m"
    backing.mkdir()
    mnt.mkdir()
    memlend_url = ["--lender", "memlend://127.0.0.1:9"]
    memcached_url = ["--lender", "memcached://127.0.0.1:9"]
    for extra, error in (
        ([*memlend_url, "--client-name", "a b", "--secret-file", str(tmp_path / "x")],
         "--client-name 'a b' must be"),
        ([*memcached_url, "--client-name", "alice"], "--client-name needs --secret-file"),
    ):  # fmt: skip
        r = memlend("mount", str(backing), str(mnt), *extra, check=False)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert error in r.stderr, r.stderr


def test_sighup_reads_the_clients_file_again(lender_factory, clients, tmp_path: Path) -> None:
    """An operator changes tenants without a restart: a removed client loses its
    connections and its blocks, a re-keyed one must use the new key, a new one may
    connect, a changed quota holds; a file that does not load changes nothing."""
    path = tmp_path / "clients"
    lender = lender_factory("--clients", str(path))
    log = tmp_path / "lender0.log"

    def reload(expect: str) -> None:
        seen = log.read_text().count(expect)
        lender.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 5
        while log.read_text().count(expect) == seen and time.monotonic() < end:
            time.sleep(0.05)
        assert log.read_text().count(expect) > seen, log.read_text()[-500:]

    alice = connect(lender.port, "alice", clients["alice"])
    bob = connect(lender.port, "bob", clients["bob"])
    try:
        assert alice.put_many(blocks(b"A", 8)) == 8
        assert bob.put_many(blocks(b"B", 4)) == 4
        # A file that does not load: the running list stays, nobody is cut off.
        text = path.read_text()
        path.write_text(text + "carol\n")
        reload("clients file not reloaded")
        assert alice.stats()["client_blocks"] == 8 and bob.stats()["client_blocks"] == 4
        # bob removed, alice's quota down to 2 blocks, carol added.
        carol = os.urandom(32)
        path.write_text(f"alice  alice.key  32K\ncarol  {carol.hex()}  -\n")
        reload("read again: 2 clients (1 added, 1 removed, 0 re-keyed)")
        with pytest.raises(RemoteError):
            bob.stats()  # its connection was closed
        with pytest.raises(RemoteAuthError):
            connect(lender.port, "bob", clients["bob"])
        alice.put_many([(b"new%d" % i, b"n" * BLOCK) for i in range(8)])
        assert alice.stats()["client_blocks"] == 2  # the new quota: 32K of 16K blocks
        with connect(lender.port, "carol", carol) as c:
            assert c.put_many(blocks(b"C", 1)) == 1
            assert c.stats()["blocks"] == 3  # bob's 4 went with him
        # alice re-keyed: her open connection goes, the new key works, the old does not.
        new = os.urandom(32)
        path.write_text(f"alice  {new.hex()}  -\ncarol  {carol.hex()}  -\n")
        reload("(0 added, 0 removed, 1 re-keyed)")
        with pytest.raises(RemoteError):
            alice.stats()
        with pytest.raises(RemoteAuthError):
            connect(lender.port, "alice", clients["alice"])
        with connect(lender.port, "alice", new) as a:
            assert a.stats()["client_blocks"] == 2
    finally:
        alice.close()
        bob.close()
