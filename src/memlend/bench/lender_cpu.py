"""Benchmark: what a lender costs its host in CPU, idle and per remote hit.

    python -m memlend.bench.lender_cpu [--rates 1000,10000,0] [--seconds 5] [--idle 10]
    python -m memlend.bench.lender_cpu --puts 2000 [--put-batch 32] [--rounds 3]

Starts two lenders on --server-cpu, one on the native hot path and one with
MEMLEND_NATIVE=0 (the same code otherwise), a memcached as the baseline, each
holding 256 blocks of 16 KiB, and the floor under them all: floor_server.c, an epoll
loop in C that answers every GET frame with one prebuilt 16 KiB reply (no handshake,
no lookup, no spin). From one client on --client-cpu:
- leaves a connected client idle for --idle seconds and reads the server's CPU time
  over it, as a share of one core;
- sends one-key GETs paced at each rate of --rates (0: back to back) for --seconds,
  and reports the lender's CPU µs per GET and the GETs/s reached.
With --puts RATE it measures the other half of a lender's work instead: the two
lenders only (native and MEMLEND_NATIVE=0), each sent PUTs of sealed 16 KiB blocks
(16 KiB + the 29-byte seal) at RATE blocks/s, --put-batch per frame as the remote
tier sends them, each under a new key (64M holds about 3,800 slots: past those every
PUT evicts, as on a full lender); reported as lender CPU seconds per
thousand PUTs, in --rounds alternating rounds, and the ratio of the medians.
CPU time is the scheduler's own account of every thread of the server
(/proc/PID/task/*/schedstat, ns), not testbed.proc_cpu_seconds's 10 ms ticks: an idle
lender's share is a fraction of a percent.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memlend.bench.tierbench import _free_port, wait_port
from memlend.remote import protocol as p
from memlend.remote.client import LenderClient
from memlend.remote.memcached import MemcachedClient
from memlend.remote.secret import auth_key, load_secret, write_secret


def cpu_seconds(pid: int) -> float:
    """Time all threads of process `pid` ran, in ns precision (the scheduler's own
    account; /proc/PID/stat's ticks are sampled and split user/system by sampling)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


VALUE = 16384 + 29  # a sealed 16 KiB block: the slot, and the seal in the tail


def paced_puts(client: LenderClient, rate: int, batch: int, seconds: float, first: int) -> int:
    """PUTs of `batch` blocks per frame, `rate` blocks per second, for `seconds`, under
    keys numbered from `first`; count (each frame waits for its ACK, as the tier's)."""
    values = [os.urandom(VALUE) for _ in range(8)]
    n, t0 = 0, time.perf_counter()
    end, gap = t0 + seconds, batch / rate
    while True:
        now = time.perf_counter()
        if now >= end:
            return n
        while now < t0 + n / batch * gap:  # the client spins on its own CPU
            now = time.perf_counter()
        items = [(b"p%d" % (first + n + i), values[i % 8]) for i in range(batch)]
        if client.put_many(items) != batch:
            raise RuntimeError("the lender refused a put")
        n += batch


def measure_puts(servers: dict, key: bytes, args: argparse.Namespace) -> None:
    print(f"PUTs of {VALUE}-byte values, {args.put_batch} per frame, paced at {args.puts}/s "
          f"for {args.seconds} s; lender CPU per thousand PUTs")  # fmt: skip
    print(f"{'server':10} {'round':>5} {'PUTs/s':>8} {'CPU s/1000 PUTs':>16} "
          f"{'CPU % of a core':>16}")  # fmt: skip
    per: dict[str, list[float]] = {name: [] for name in servers}
    first = 0
    for rnd in range(1, args.rounds + 1):
        for name, (port, proc) in servers.items():
            c = LenderClient(("127.0.0.1", port), key, b"cpu-bench", timeout=10.0)
            assert c.stats()["hot_path"].startswith(name)
            a, t0 = cpu_seconds(proc.pid), time.perf_counter()
            n = paced_puts(c, args.puts, args.put_batch, args.seconds, first)
            took = time.perf_counter() - t0
            used = cpu_seconds(proc.pid) - a
            c.close()
            per[name].append(used / n * 1000)
            print(f"{name:10} {rnd:>5} {n / took:>8.0f} {used / n * 1000:>16.4f} "
                  f"{used / took * 100:>15.1f}%")  # fmt: skip
        first += 1 << 24  # new keys each round: every round evicts alike
    med = {name: statistics.median(v) for name, v in per.items()}
    ratio = med["python"] / med["native"]
    print(f"median CPU s per 1000 PUTs: native {med['native']:.4f}, python "
          f"{med['python']:.4f}: python / native = {ratio:.2f}x")  # fmt: skip


def paced(client: LenderClient, key: bytes, rate: int, seconds: float) -> int:
    """GETs at `rate` per second (0: as fast as they come) for `seconds`; count."""
    n, t0 = 0, time.perf_counter()
    end, gap = t0 + seconds, (1.0 / rate if rate else 0.0)
    far = time.monotonic() + 3600
    while True:
        now = time.perf_counter()
        if now >= end:
            return n
        if gap:
            due = t0 + n * gap
            while now < due:  # the client spins on its own CPU, not the lender's
                now = time.perf_counter()
        client.get_one(key, far)
        n += 1


class FloorClient:
    """floor_server.c's client: one-key GET frames, each whole reply read back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = p.HEADER_SIZE + 7 + 16384

    def get_one(self, key: bytes, deadline: float) -> None:
        payload = b"\0\1" + bytes((len(key),)) + key
        self.sock.sendall(p.HEADER.pack(p.MAGIC, p.VERSION, p.MsgType.GET, 0, 0, len(payload)))
        self.sock.sendall(payload)
        need = self.reply
        while need:
            need -= len(self.sock.recv(need))

    def close(self) -> None:
        self.sock.close()


def _start(cmd: list[str], port: int, procs: list, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    wait_port(port, proc, cmd[3])
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,10000,0", help="GETs/s to pace at (0: unpaced)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--busy-poll-us", help="passed to the lenders (default: theirs)")
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--puts", type=int, metavar="RATE", help="measure PUTs at RATE blocks/s")
    ap.add_argument("--put-batch", type=int, default=32, help="blocks per PUT frame")
    ap.add_argument("--rounds", type=int, default=3, help="--puts: rounds per lender")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    os.sched_setaffinity(0, {args.client_cpu})
    pin = ["taskset", "-c", str(args.server_cpu)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        sf = os.path.join(tmp, "secret")
        write_secret(sf)
        key = auth_key(load_secret(sf))
        try:
            servers = {}
            for name, env in (("native", "1"), ("python", "0")):
                port = _free_port()
                cmd = [*pin, sys.executable, "-m", "memlend.lender", "--listen",
                             f"127.0.0.1:{port}", "--memory", "64M", "--secret-file", sf,
                             "--reserve", "64M", "--foreground"]  # fmt: skip
                if args.busy_poll_us is not None:
                    cmd += ["--busy-poll-us", args.busy_poll_us]
                env = {**os.environ, "MEMLEND_NATIVE": env}
                servers[name] = (port, _start(cmd, port, procs, env))
            if args.puts:
                measure_puts(servers, key, args)
                return 0
            port = _free_port()
            mc = [*pin, "memcached", "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-m", "64"]
            mc += ["-u", "root"] if os.geteuid() == 0 else []
            servers["memcached"] = (port, _start(mc, port, procs))
            floor = os.path.join(tmp, "floor_server")
            src = Path(__file__).with_name("floor_server.c")
            subprocess.run(["gcc", "-O2", "-Wall", "-o", floor, str(src)], check=True)
            port = _free_port()
            servers["C floor"] = (port, _start([*pin, floor, str(port)], port, procs))
            spin = "their default" if args.busy_poll_us is None else args.busy_poll_us
            print(f"client on CPU {args.client_cpu}, servers on CPU {args.server_cpu}; "
                  f"16 KiB values; lenders' --busy-poll-us {spin}; memcached defaults")  # fmt: skip
            print(f"{'server':10} {'case':16} {'GETs/s':>8} {'CPU µs/GET':>11} "
                  f"{'CPU % of a core':>16}")  # fmt: skip
            for name, (port, proc) in servers.items():
                if name == "C floor":
                    c = FloorClient(port)
                elif name == "memcached":
                    c = MemcachedClient(("127.0.0.1", port), b"cpu-bench")
                else:
                    c = LenderClient(("127.0.0.1", port), key, b"cpu-bench")
                    assert c.stats()["hot_path"].startswith(name)
                if name != "C floor":
                    c.put_many([(b"k%d" % i, os.urandom(16384)) for i in range(256)])
                time.sleep(1)
                a = cpu_seconds(proc.pid)
                time.sleep(args.idle)
                used = cpu_seconds(proc.pid) - a
                print(f"{name:10} {'idle, 1 client':16} {0:>8} {'-':>11} "
                      f"{used / args.idle * 100:>15.1f}%")  # fmt: skip
                for rate in rates:
                    a, t0 = cpu_seconds(proc.pid), time.perf_counter()
                    n = paced(c, b"k7", rate, args.seconds)
                    took = time.perf_counter() - t0
                    used = cpu_seconds(proc.pid) - a
                    label = f"paced {rate}/s" if rate else "back to back"
                    print(f"{name:10} {label:16} {n / took:>8.0f} {used / n * 1e6:>11.1f} "
                          f"{used / took * 100:>15.1f}%")  # fmt: skip
                c.close()
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
