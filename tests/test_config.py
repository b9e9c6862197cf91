"""The TOML config file: round trip, one line per problem, flags over the file, and
real mounts and lenders started from it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MEMLEND, Mount, memlend
from memlend import config
from memlend.cli import _parse

GOOD = """\
[mount]
local_tier = "memlend"
writeback_cache = false
no_passthrough = false
cache_size = "12M"
block_size = "8K"
policy = "lru"
threads = 4
attr_timeout = 0.5
lenders = ["memlend://10.0.0.2:7070", "memcached://10.0.0.3:11211"]
secret_file = "/etc/memlend/secret"
seal_key_file = "/var/lib/memlend/seal.key"
remote_deadline = 3.0
remote_mode = "inclusive"
lender_streams = "always"
client_name = "vm-a"
nonempty = false
metrics = "127.0.0.1:9400"
log_file = "/var/log/memlend.log"
debug = true

[lend]
listen = "0.0.0.0:7070"
memory = "8G"
clients = "/etc/memlend/clients"
metrics = "127.0.0.1:9401"
reserve = "512M"
block_size = "16K"
policy = "s3fifo"
client_quota = "1G"
idle_timeout = 60
max_connections = 32
busy_poll_us = 0
log_file = "/var/log/memlend-lend.log"
debug = false
"""


def write(tmp_path: Path, text: str, name: str = "memlend.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_key_round_trips(tmp_path: Path) -> None:
    first, errors = config.read(str(write(tmp_path, GOOD)))
    assert errors == []
    assert set(first["mount"]) == set(config.SCHEMA["mount"])  # GOOD sets every key
    # every key but secret_file, which excludes clients
    assert set(first["lend"]) == set(config.SCHEMA["lend"]) - {"secret_file"}
    again, errors = config.read(str(write(tmp_path, config.dumps(first), "again.toml")))
    assert errors == []
    assert again == first


def test_config_show_prints_what_check_accepts(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    shown = memlend("config", "show", str(path)).stdout
    assert config.read(str(write(tmp_path, shown, "shown.toml")))[0] == config.read(str(path))[0]
    assert memlend("config", "check", str(path)).stdout == f"{path}: ok\n"


# One bad entry per class of error; each must give exactly one line naming it.
BAD = [
    ('[mount]\ncache_size = "12XB"\n', "[mount] cache_size: invalid size '12XB'"),
    ("[mount]\ncache_size = true\n", "[mount] cache_size: expected a size"),
    ('[mount]\ncach_size = "1G"\n', "[mount] unknown key 'cach_size'"),
    ('[mount]\nthreads = "16"\n', "[mount] threads: expected an integer, got a string"),
    ("[mount]\nthreads = 0\n", "[mount] threads: must be at least 1"),
    ("[mount]\nattr_timeout = -1\n", "[mount] attr_timeout: must be 0 or more"),
    ("[mount]\nremote_deadline = 0\n", "[mount] remote_deadline: must be positive"),
    ("[mount]\ndebug = 1\n", "[mount] debug: expected true or false"),
    ('[mount]\nlocal_tier = "disk"\n', "[mount] local_tier: 'disk' is not one of"),
    ('[mount]\npolicy = "nope"\n', "[mount] policy: 'nope' is not one of"),
    ('[mount]\nlenders = "memlend://a:1"\n', "[mount] lenders: expected a list"),
    ('[mount]\nlenders = ["http://a:1"]\n', "[mount] lenders: 'http://a:1' is not"),
    ('[mount]\nsecret_file = ""\n', "[mount] secret_file: expected a non-empty string"),
    ("[lend]\nbusy_poll_us = -1\n", "[lend] busy_poll_us: must be at least 0"),
    ('[lend]\nmemory = "lots"\n', "[lend] memory: invalid size 'lots'"),
    ("[lend]\nlenders = []\n", "[lend] unknown key 'lenders'"),
    ('[lend]\nsecret_file = "s"\nclients = "c"\n', "[lend] secret_file and clients exclude"),
    ("[mounts]\nx = 1\n", "unknown section [mounts]"),
    ("mount = 3\n", "mount must be a table"),
    ("[mount]\ncache_size = \n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_each_bad_entry_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    _, errors = config.read(str(path))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: ")
    assert message in errors[0]


def test_config_check_lists_every_error_and_fails(tmp_path: Path) -> None:
    picked = [BAD[0], BAD[2], BAD[3], BAD[17]]  # [mount] x3, then [mounts]
    text = "[mount]\n" + "".join(t.replace("[mount]\n", "") for t, _ in picked[:3])
    path = write(tmp_path, text + picked[3][0])
    proc = memlend("config", "check", str(path), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 4 and "Traceback" not in proc.stderr
    for (_, message), line in zip(picked, lines, strict=True):
        assert message in line


def test_a_bad_file_stops_mount_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, BAD[0][0] + 'policy = "nope"\n')
    proc = subprocess.run(
        [*MEMLEND, "--config", str(path), "mount", str(tmp_path), str(tmp_path / "m")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert "cache_size" in proc.stderr and "and 1 more" in proc.stderr


def test_secret_file_and_clients_together_are_one_line_everywhere(tmp_path: Path) -> None:
    path = write(tmp_path, '[lend]\nmemory = "16M"\nsecret_file = "s"\nclients = "c"\n')
    lend = ["--listen", "127.0.0.1:0", "--foreground"]
    for cmd in (
        [*MEMLEND, "config", "check", str(path)],
        [*MEMLEND, "lend", "--config", str(path), *lend],
        [sys.executable, "-m", "memlend.lender", "--config", str(path), *lend],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
        assert "[lend] secret_file and clients exclude each other" in proc.stderr


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = str(write(tmp_path, GOOD))
    args = _parse(["--config", path, "mount", "b", "m"])
    assert (args.cache_size, args.block_size, args.policy) == (12 << 20, 8 << 10, "lru")
    assert args.lender == ["memlend://10.0.0.2:7070", "memcached://10.0.0.3:11211"]
    args = _parse(["mount", "b", "m", "--config", path, "--policy", "lirs",
                   "--lender", "memlend://h:1", "--cache-size", "1M"])  # fmt: skip
    assert (args.cache_size, args.policy, args.lender) == (1 << 20, "lirs", ["memlend://h:1"])
    # The same through the helper form, config=FILE among the -o options.
    args = _parse(["/b", "/m", "-o", f"config={path},block_size=4K"])
    assert (args.block_size, args.cache_size, args.config) == (4 << 10, 12 << 20, path)
    # lend's required flags may come from the file.
    args = _parse(["--config", path, "lend", "--memory", "1G"])
    assert (args.listen, args.memory, args.reserve) == ("0.0.0.0:7070", "1G", "512M")


@pytest.mark.tiers("memlend")
def test_a_real_mount_takes_its_settings_from_the_file(
    tmp_path: Path, mount_factory: Callable[..., Mount]
) -> None:
    path = write(tmp_path, '[mount]\ncache_size = "12M"\nblock_size = "8K"\npolicy = "lru"\n')
    m = mount_factory("--config", str(path), "--policy", "s3fifo")
    (m.backing / "f").write_bytes(b"x" * 100_000)
    assert (m.mnt / "f").read_bytes() == b"x" * 100_000
    stats = m.stats()
    assert (stats["cache_size"], stats["block_size"]) == (12 << 20, 8 << 10)
    assert stats["policy"] == "s3fifo"  # the flag wins
