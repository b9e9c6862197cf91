"""The Prometheus endpoints of a real mount and a real lender, scraped while 16
threads read: they agree with `memlend stats --json` and with the reads done."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MEMLEND, force_unmount, is_mounted, memlend
from memlend.stats import COUNTERS

NFILES, FILE_SIZE, BS = 16, 1 << 20, 16384

# stats --json key -> (metric sample name, labels)
MOUNT_SAMPLES = {
    "local_hits": ("memlend_hits_total", {"tier": "local"}),
    "local_misses": ("memlend_misses_total", {"tier": "local"}),
    "remote_hits": ("memlend_hits_total", {"tier": "remote"}),
    "remote_misses": ("memlend_misses_total", {"tier": "remote"}),
    "disk_reads": ("memlend_disk_reads_total", {}),
    "disk_read_bytes": ("memlend_disk_read_bytes_total", {}),
    "evictions": ("memlend_evictions_total", {}),
    "invalidated_blocks": ("memlend_invalidated_blocks_total", {}),
    "writes": ("memlend_writes_total", {}),
    "write_bytes": ("memlend_write_bytes_total", {}),
    "passthrough_opens": ("memlend_passthrough_opens_total", {}),
    "written_lent_blocks": ("memlend_written_lent_blocks_total", {}),
    "native_read_hits": ("memlend_native_read_hits_total", {}),
    "remote_put_blocks": ("memlend_remote_puts_total", {}),
    "remote_dropped_puts": ("memlend_remote_dropped_puts_total", {}),
    "remote_queue_hits": ("memlend_remote_queue_hits_total", {}),
    "remote_errors": ("memlend_remote_errors_total", {}),
    "seal_failures": ("memlend_remote_seal_failures_total", {}),
}
LENDER_SAMPLES = {
    "hits": "memlend_lend_hits_total",
    "misses": "memlend_lend_misses_total",
    "puts": "memlend_lend_puts_total",
    "refused": "memlend_lend_refused_total",
    "evictions": "memlend_lend_evictions_total",
    "given_back_bytes": "memlend_lend_given_back_bytes_total",
    "blocks": "memlend_lend_blocks",
    "bytes_used": "memlend_lend_used_bytes",
    "memory_cap": "memlend_lend_memory_cap_bytes",
}


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def family(samples: dict, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def quiet_stats(m, timeout: float = 10.0) -> dict:
    """The mount's stats once the put queue is empty and nothing moves any more."""
    end = time.monotonic() + timeout
    last = m.stats()
    while time.monotonic() < end:
        time.sleep(0.3)
        now = m.stats()
        if now.get("remote_queued_blocks", 0) == 0 and _counters(now) == _counters(last):
            return now
        last = now
    raise AssertionError("the mount's counters kept moving with no reads")


def _counters(s: dict) -> dict:
    return {k: s[k] for k in MOUNT_SAMPLES} | {"lenders": s.get("lenders")}


def test_metrics_match_stats_and_reads(
    mount_factory, lender_factory, secret_file: Path, seal_key_file: Path, tmp_path: Path
) -> None:
    lender = lender_factory("--metrics", "127.0.0.1:0")
    assert lender.proc.stdout is not None
    lender_metrics = lender.proc.stdout.readline().split("http://")[1].split("/")[0]

    data = tmp_path / "data"
    data.mkdir()
    for i in range(NFILES):
        (data / f"f{i}").write_bytes(os.urandom(FILE_SIZE))
    m = mount_factory(
        "--cache-size", "2M", "--block-size", "16K", "--lender", lender.url,
        "--secret-file", str(secret_file), "--seal-key-file", str(seal_key_file),
        "--metrics", "127.0.0.1:0", backing=data,
    )  # fmt: skip
    mount_metrics = m.stats()["metrics"]
    before = scrape(mount_metrics)
    assert value(before, "memlend_hits_total", tier="local") == 0

    read = [0] * NFILES

    def reader(i: int) -> None:
        with open(m.mnt / f"f{i}", "rb", buffering=0) as f:
            while chunk := f.read(128 << 10):
                read[i] += len(chunk)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(NFILES)]
    for t in threads:
        t.start()
    looked_up = []  # scrapes during the reads: they answer, and never go back
    while any(t.is_alive() for t in threads):
        s = scrape(mount_metrics)
        scrape(lender_metrics)
        looked_up.append(
            value(s, "memlend_hits_total", tier="local")
            + value(s, "memlend_misses_total", tier="local")
        )
    for t in threads:
        t.join()
    assert read == [FILE_SIZE] * NFILES
    assert looked_up == sorted(looked_up)

    # The mount: the endpoint says what `memlend stats --json` says.
    stats = quiet_stats(m)
    samples = scrape(mount_metrics)
    assert _counters(m.stats()) == _counters(stats)  # nothing moved during the scrape
    for key, (name, labels) in MOUNT_SAMPLES.items():
        assert value(samples, name, **labels) == stats[key], key
    assert set(COUNTERS) <= MOUNT_SAMPLES.keys()

    # ... and what the 16 readers did: every block looked up once in the local tier
    # (cold files, one pass, reads aligned to blocks); what missed it and the lenders
    # came from the disk.
    blocks = NFILES * FILE_SIZE // BS
    assert stats["local_hits"] + stats["local_misses"] == blocks
    assert stats["disk_read_bytes"] == (stats["local_misses"] - stats["remote_hits"]) * BS
    assert stats["writes"] == 0
    assert value(samples, "memlend_cache_used_bytes") == stats["resident_blocks"] * BS

    url = lender.url
    (ld,) = stats["lenders"]
    assert value(samples, "memlend_lender_hits_total", lender=url) == ld["hits"]
    assert value(samples, "memlend_lender_misses_total", lender=url) == ld["misses"]
    assert value(samples, "memlend_lender_puts_total", lender=url) == ld["put_blocks"]
    assert value(samples, "memlend_lender_dropped_puts_total", lender=url) == ld["dropped_puts"]
    states = family(samples, "memlend_lender_state")
    assert sorted(states.values()) == [0, 0, 1]
    assert states[frozenset({"lender": url, "state": ld["state"]}.items())] == 1
    assert value(samples, "memlend_remote_deadline_seconds") == stats["remote_deadline_us"] / 1e6

    hist = stats["remote_latency_histogram"]
    buckets = [v for (n, _), v in samples.items() if n == "memlend_remote_latency_seconds_bucket"]
    assert sorted(buckets) == sorted(hist["cumulative"]) and buckets == sorted(buckets)
    assert value(samples, "memlend_remote_latency_seconds_count") == hist["cumulative"][-1]
    # Each round trip that answered in time asked for one block or more (late ones are
    # counted as timeouts, not here).
    assert hist["cumulative"][-1] <= ld["hits"] + ld["misses"]
    assert value(samples, "memlend_remote_timeouts_total") == stats["remote_timeouts"]

    # The lender: its endpoint says what `memlend stats --lender --json` says, and what
    # it stored and returned is what the mount sent and got.
    lstats = json.loads(
        memlend("stats", "--lender", f"127.0.0.1:{lender.port}", "--secret-file",
                str(secret_file), "--json").stdout
    )  # fmt: skip
    lsamples = scrape(lender_metrics)
    for key, name in LENDER_SAMPLES.items():
        assert value(lsamples, name) == lstats[key], key
    assert lstats["puts"] == stats["remote_put_blocks"]
    assert lstats["hits"] == stats["remote_hits"] - stats["remote_queue_hits"]
    per_client = family(lsamples, "memlend_lend_client_blocks")
    assert sum(per_client.values()) == lstats["blocks"]
    assert len([v for v in per_client.values() if v]) == (1 if lstats["blocks"] else 0)
    assert value(lsamples, "process_cpu_seconds_total") > 0


@pytest.mark.tiers("memlend")
def test_stats_watch_redraws_and_exits(mount_factory) -> None:
    m = mount_factory("--cache-size", "8M", "--block-size", "4K")
    (m.backing / "f").write_bytes(os.urandom(1 << 16))
    (m.mnt / "f").read_bytes()
    out = memlend("stats", str(m.mnt), "--watch", "--count", "2", "--interval", "0.1")
    assert out.stdout.count("local misses") >= 1 and "per second" in out.stdout
    assert out.stderr == ""

    # Ctrl-C is the usual way out: exit 0, no traceback; also when started with SIGINT
    # ignored, as a background job of a script is (it used to hang there).
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen([*MEMLEND, "stats", str(m.mnt), "--watch", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint)  # fmt: skip
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "local misses" in stdout and "Traceback" not in stderr

    bad = memlend("stats", str(m.mnt), "--watch", "--json", check=False)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_bad_metrics_address_and_port_in_use(tmp_path: Path, secret_file: Path) -> None:
    b, mnt = tmp_path / "b", tmp_path / "m"
    b.mkdir()
    mnt.mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    in_use = f"127.0.0.1:{taken.getsockname()[1]}"
    mount = ["mount", str(b), str(mnt), "--log-file", str(tmp_path / "log")]
    lend = ["lend", "--listen", "127.0.0.1:0", "--memory", "16M", "--reserve", "16M",
            "--secret-file", str(secret_file), "--foreground"]  # fmt: skip
    try:
        for cmd in (mount, lend):
            for address, what in (("nonsense", "expected ADDR:PORT"), (in_use, "in use")):
                r = memlend(*cmd, "--metrics", address, check=False, timeout=30)
                assert r.returncode == 2, (cmd[0], address, r.stderr)
                assert len(r.stderr.strip().splitlines()) == 1, r.stderr
                assert what in r.stderr and "Traceback" not in r.stderr
                assert not is_mounted(mnt)
    finally:
        taken.close()
        force_unmount(mnt)


def test_one_version_and_one_lender_default_policy() -> None:
    from memlend.cli import build_parser
    from memlend.lender.cli import DEFAULT_POLICY

    want = f"memlend {importlib.metadata.version('memlend')}"
    for args in (["--version"], ["lend", "--version"]):
        assert memlend(*args).stdout.strip() == want
    r = subprocess.run([sys.executable, "-m", "memlend.lender", "--version"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert r.stdout.strip() == want
    need = ["--listen", "127.0.0.1:0", "--memory", "16M", "--secret-file", "s"]
    # the lender's own default, not the mount's (`python -m memlend.lender` is `memlend lend`)
    assert build_parser().parse_args(["lend", *need]).policy == DEFAULT_POLICY
