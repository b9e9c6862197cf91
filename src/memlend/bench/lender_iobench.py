"""Which server I/O model for the lender? 4 KiB GET round trips, measured.

    python -m memlend.bench.lender_iobench [--server-cpu 1] [--client-cpu 0] [--n 5000]

Servers (each a subprocess pinned to --server-cpu, loopback TCP):
  raw-blocking   baseline: a bare blocking-socket echo of 4 KiB, no protocol, no store
  threads        thread per connection, blocking sockets, memlend protocol + store
  epoll          the lender's LenderServer (epoll, one thread), no busy-poll
  epoll+spin50   same, polling 50 µs after each request before sleeping
  epoll+spin200  same, 200 µs
Clients (pinned to --client-cpu): LenderClient with busy_poll_us 0 (blocking) and 200.
Numbers are medians over --n round trips after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from memlend.lender.server import LenderServer, ServerConfig
from memlend.lender.store import Store
from memlend.remote import protocol as p
from memlend.remote.client import LenderClient

KEY = b"bench-key-000001"
AUTH = b"k" * 32
VALUE = os.urandom(4096 + 29)


def _serve_threads(sock: socket.socket, store: Store) -> None:
    lock = threading.Lock()

    def handle(s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = p.ServerConnection(AUTH)
        ns = None
        while data := s.recv(1 << 18):
            out = []
            for ev in conn.receive_data(data):
                if isinstance(ev, p.Hello):
                    out.append(conn.send_challenge())
                elif isinstance(ev, p.Authenticated):
                    ns = store.namespace(ev.client_id)
                    out.append(conn.send_auth_ok(store.max_value))
                elif isinstance(ev, p.GetRequest):
                    with lock:
                        vals = [store.get(ns, k) for k in ev.keys]
                        out.append(conn.send_get_reply(ev.request_id, vals))
                elif isinstance(ev, p.PutRequest):
                    with lock:
                        n = sum(store.put(ns, k, v) for k, v in ev.items)
                    out.append(conn.send_ack(ev.request_id, n))
            s.sendall(b"".join(out))
        s.close()

    while True:
        s, _ = sock.accept()
        threading.Thread(target=handle, args=(s,), daemon=True).start()


def _serve_raw(sock: socket.socket) -> None:
    reply = b"x" * 4096
    while True:
        s, _ = sock.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while s.recv(4096):
            s.sendall(reply)
        s.close()


def serve(mode: str, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    sock = socket.create_server(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    store = Store(64 << 20, 8192)
    if mode == "raw-blocking":
        _serve_raw(sock)
    elif mode == "threads":
        _serve_threads(sock, store)
    else:
        spin = int(mode.partition("spin")[2] or 0)
        LenderServer(sock, store, AUTH, ServerConfig(busy_poll_us=spin)).serve_forever()


def _raw_client(port: int, n: int) -> list[float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        s.sendall(b"g" * 32)
        got = 0
        while got < 4096:
            got += len(s.recv(65536))
        times.append(time.perf_counter_ns() - t)
    s.close()
    return times


def _client(port: int, n: int, spin: int) -> list[float]:
    with LenderClient(("127.0.0.1", port), AUTH, b"bench", busy_poll_us=spin) as c:
        c.put_many([(KEY, VALUE)])
        times = []
        for _ in range(n):
            t = time.perf_counter_ns()
            c.multi_get([KEY])
            times.append(time.perf_counter_ns() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.server_cpu)
        return
    os.sched_setaffinity(0, {args.client_cpu})
    print(
        f"server on CPU {args.server_cpu}, client on CPU {args.client_cpu}, 4 KiB GET, "
        f"median of {args.n} (p90)"
    )
    modes = ["raw-blocking", "threads", "epoll", "epoll+spin50", "epoll+spin200"]
    for mode in modes:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memlend.bench.lender_iobench",
                "--serve",
                mode,
                "--server-cpu",
                str(args.server_cpu),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(proc.stdout.readline())
            spins = [0] if mode == "raw-blocking" else [0, 200]
            for spin in spins:
                if mode == "raw-blocking":
                    _raw_client(port, 500)
                    t = sorted(_raw_client(port, args.n))
                else:
                    _client(port, 500, spin)
                    t = sorted(_client(port, args.n, spin))
                med, p90 = statistics.median(t) / 1e3, t[int(len(t) * 0.9)] / 1e3
                print(f"  server {mode:14} client spin {spin:3} µs: {med:7.1f} µs ({p90:.1f})")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
