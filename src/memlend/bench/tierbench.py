"""Benchmark: 4 KiB reads through RemoteTier from a lender and from memcached.

    python -m memlend.bench.tierbench [--n 2000] [--client-cpu 0] [--server-cpu 1]

Starts a memlend lender (`python -m memlend.lender`, 4K slots) and a memcached,
both pinned to --server-cpu, pins itself to --client-cpu, stores 4 KiB blocks
through RemoteTier, then times `get_many` of 1 key and of 32 keys and `get_one`
(the mount's one-block call) against each, in the same run, with the baselines
measured alongside: the raw clients alone (LenderClient and memlend.remote.memcached:
no tier, no unsealing), a bare memcached GET of the same sealed value over one raw
socket, and pymemcache's get / get_many (if installed: it is how the memcached client
was chosen). Prints median / p90 / p99 in µs, the lender / memcached throughput ratios
(memcached's median over the lender's), the lender's CPU per key and which hot path
(native or Python, memlend.native) each side ran. Lender and memcached run with their
defaults.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from memlend import native
from memlend.remote.client import LenderClient
from memlend.remote.memcached import MemcachedClient
from memlend.remote.sealing import client_id_for
from memlend.remote.secret import auth_key, load_secret, write_secret
from memlend.remote.tier import RemoteTier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str = "server", timeout: float = 10) -> None:
    """Wait until `proc` accepts connections on loopback `port`; RuntimeError if it
    exits or does not within `timeout` (also used by memlend.bench.remote_latency)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} on port {port} did not start (status {proc.poll()})")


def _time(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(200, n // 5)):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    out.sort()
    return out


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="timed calls per case")
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=0.002)
    args = ap.parse_args(argv)

    os.sched_setaffinity(0, {args.client_cpu})
    pin = ["taskset", "-c", str(args.server_cpu)]
    procs: list[subprocess.Popen] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        sf = os.path.join(tmp.name, "secret")
        write_secret(sf)
        secret, seal = load_secret(sf), os.urandom(32)
        lport, mport = _free_port(), _free_port()
        cmd = [sys.executable, "-m", "memlend.lender", "--listen", f"127.0.0.1:{lport}"]
        cmd += ["--memory", "64M", "--block-size", "4K", "--secret-file", sf, "--foreground"]
        cmd += ["--reserve", "64M"]
        procs.append(
            subprocess.Popen(pin + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        mc = ["memcached", "-p", str(mport), "-l", "127.0.0.1", "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            mc += ["-u", "root"]
        procs.append(
            subprocess.Popen(pin + mc, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        try:
            wait_port(lport, procs[0], "lender")
            wait_port(mport, procs[1], "memcached")
        except RuntimeError as e:
            raise SystemExit(str(e)) from None

        keys = [b"E" * 8 + b"F" * 8 + b"\0" * 8 + i.to_bytes(8, "big") for i in range(256)]
        block = os.urandom(4096)
        tiers = {
            "lender": RemoteTier(
                [f"memlend://127.0.0.1:{lport}"], secret, seal, deadline=args.deadline
            ),
            "memcached": RemoteTier(
                [f"memcached://127.0.0.1:{mport}"], None, seal, deadline=args.deadline
            ),
        }
        rows: list[tuple[str, list[float]]] = []
        for name, tier in tiers.items():
            for k in keys:
                tier.put(k, block)
            if not tier.flush(10):
                raise SystemExit(f"{name}: puts not flushed")
            it = iter(range(1 << 62))

            def one(tier: RemoteTier = tier, it=it) -> None:
                tier.get_many([keys[next(it) % 256]])

            def batch(tier: RemoteTier = tier, it=it) -> None:
                i = next(it) % 8 * 32
                tier.get_many(keys[i : i + 32])

            out = memoryview(bytearray(len(block)))

            def get_one(tier: RemoteTier = tier, it=it, out=out) -> None:
                tier.get_one(keys[next(it) % 256], out)

            rows.append((f"RemoteTier -> {name}, 1 key", _time(one, args.n)))
            rows.append((f"RemoteTier.get_one -> {name}", _time(get_one, args.n)))
            rows.append((f"RemoteTier -> {name}, 32 keys", _time(batch, args.n // 4)))

        # Baselines on memcached: the same sealed values, no tier.
        raw = MemcachedClient(("127.0.0.1", mport), client_id_for(seal))
        ek = raw.encode_key(keys[0])
        rows.append(
            ("raw client (memcached.py), 1 key", _time(lambda: raw.multi_get([keys[0]]), args.n))
        )
        rows.append(
            (
                "raw client (memcached.py), 32 keys",
                _time(lambda: raw.multi_get(keys[:32]), args.n // 4),
            )
        )
        raw.close()
        # The lender's raw client (no tier, no unsealing), as the memcached one above.
        lc = LenderClient(("127.0.0.1", lport), auth_key(secret), client_id_for(seal))
        far = time.monotonic() + 1e6
        rows.append(("raw client (LenderClient), 1 key", _time(lambda: lc.get_one(keys[0], far),
                                                               args.n)))  # fmt: skip
        rows.append(
            (
                "raw client (LenderClient), 32 keys",
                _time(lambda: lc.multi_get(keys[:32]), args.n // 4),
            )
        )
        lender_stats = lc.stats()
        lc.close()
        s = socket.create_connection(("127.0.0.1", mport))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def bare() -> None:
            s.sendall(b"get " + ek + b"\r\n")
            buf = b""
            while not buf.endswith(b"END\r\n"):
                buf += s.recv(65536)

        rows.append(("bare blocking socket GET (baseline), 1 key", _time(bare, args.n)))
        s.close()
        try:
            from pymemcache.client.base import Client as PyMemcache
        except ImportError:
            PyMemcache = None
        if PyMemcache is not None:
            pm = PyMemcache(("127.0.0.1", mport), no_delay=True, timeout=1)
            eks = [raw.encode_key(k).decode() for k in keys[:32]]
            rows.append(("pymemcache get, 1 key", _time(lambda: pm.get(eks[0]), args.n)))
            rows.append(
                ("pymemcache get_many, 32 keys", _time(lambda: pm.get_many(eks), args.n // 4))
            )
            pm.close()

        print(
            f"4 KiB blocks, client on CPU {args.client_cpu}, lender and memcached on CPU "
            f"{args.server_cpu}; deadline {args.deadline * 1e3:g} ms; µs"
        )
        print(f"{'case':48} {'median':>8} {'p90':>8} {'p99':>8}")
        med = {}
        for name, xs in rows:
            med[name] = _pct(xs, 0.5)
            print(f"{name:48} {med[name]:8.1f} {_pct(xs, 0.9):8.1f} {_pct(xs, 0.99):8.1f}")
        print(f"hot path: this client {native.description}, lender {lender_stats['hot_path']}")
        print("throughput ratios, lender / memcached (= memcached's median / the lender's):")
        for case in (
            "RemoteTier -> {}, 1 key",
            "RemoteTier.get_one -> {}",
            "RemoteTier -> {}, 32 keys",
        ):
            a, b = med[case.format("lender")], med[case.format("memcached")]
            print(f"  {case.format('X')}: {b / a:.2f}")
        for n in ("1 key", "32 keys"):
            a, b = med[f"raw client (LenderClient), {n}"], med[f"raw client (memcached.py), {n}"]
            print(f"  raw client, {n}: {b / a:.2f}")
        print(
            f"  lender CPU: {lender_stats['cpu_seconds']} s for {lender_stats['get_keys']} keys "
            f"({lender_stats['cpu_us_per_get']} µs per key, spinning included)"
        )
        base = med["bare blocking socket GET (baseline), 1 key"]
        for name in ("RemoteTier -> lender, 1 key", "RemoteTier -> memcached, 1 key"):
            print(f"  {name} / bare socket baseline = {med[name] / base:.2f}")
        for name, tier in tiers.items():
            snap = tier.snapshot()
            ld = snap["lenders"][0]
            print(
                f"  {name}: timeouts {snap['remote_timeouts']}, misses {snap['remote_misses']}, "
                f"errors {snap['remote_errors']}, suspensions {ld['suspensions']}, "
                f"now {ld['state']} {ld['last_error']}"
            )
            tier.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
