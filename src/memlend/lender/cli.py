"""Command-line glue for `memlend lend` and `memlend genkey`.

memlend.cli wires these in (add_*_arguments / run_*); `python -m memlend.lender` is
`memlend lend` under another name. Bad input raises UserError (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

from memlend.errors import UserError
from memlend.service import notify, setup_logging
from memlend.sizes import parse_size

# The lender's own default (docs/remote.md), not the mount's: `memlend lend` and
# `python -m memlend.lender` both take it from here. LRU: a lender sees each block put
# once and asked for about once (a client's page-cache misses), so s3fifo's rule (two
# hits to leave its small queue) kept a client's old, dead data in its main queue and
# dropped what the client wrote since (Postmark after the other workloads: 0.854x the
# page cache against 1.305x with lru; docs/benchmarks.md, seventh session).
DEFAULT_POLICY = "lru"
DEFAULT_BLOCK = "16K"  # the mount's default block size: one block per slot


def add_genkey_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a new random secret (32 bytes, as 64 hex digits) to FILE with mode 0600. "
        "Give the same file to `memlend lend --secret-file` and to the mounts that use "
        "that lender; give mounts a second, separate one as --seal-key-file so the "
        "lender cannot read what it stores."
    )
    parser.add_argument("file", metavar="FILE", help="where to write the secret")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def run_genkey(args: argparse.Namespace) -> int:
    from memlend.remote.secret import write_secret

    write_secret(args.file, force=args.force)
    print(f"wrote a new secret to {args.file} (mode 0600)")
    return 0


def add_lend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Lend this machine's spare memory to memlend mounts elsewhere. Stores clean, "
        "sealed blocks for authenticated clients, at most --memory of them (a hard limit, "
        "bookkeeping included), and gives memory back to this host within a second when "
        "its available memory falls below --reserve."
    )
    from memlend import __version__

    parser.add_argument("--version", action="version", version=f"memlend {__version__}")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve")
    parser.add_argument("--memory", required=True, metavar="SIZE", help="memory to lend, e.g. 2G")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--secret-file",
        metavar="PATH",
        help="one secret shared by all clients (memlend genkey); any holder may use any "
        "namespace: prefer --clients",
    )
    who.add_argument(
        "--clients",
        metavar="FILE",
        help="the allowed clients, one `NAME KEY QUOTA` line each: KEY is a secret file "
        "(memlend genkey) or its 64 hex digits, QUOTA a size or - (none beyond the fair "
        "share); a mount connects with --client-name NAME --secret-file KEY, and can only "
        "reach the blocks of its own name; over its quota a client's own oldest blocks make "
        "room (docs/remote.md)",
    )
    parser.add_argument(
        "--reserve",
        metavar="SIZE",
        help="keep at least this much of the host's memory available "
        "(default 10%% of the host's memory, between 64M and 1G)",
    )
    parser.add_argument(
        "--block-size",
        default=DEFAULT_BLOCK,
        metavar="SIZE",
        help=f"slot size, a power of two from 4K to 1M; use the mounts' block size "
        f"(default {DEFAULT_BLOCK})",
    )
    parser.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        metavar="NAME",
        help=f"replacement policy (default {DEFAULT_POLICY})",
    )
    parser.add_argument(
        "--client-quota",
        metavar="SIZE",
        help="most memory one client may hold (default: an equal share of --memory among "
        "the clients holding data)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close connections idle this long (default 300)",
    )
    parser.add_argument("--max-connections", type=int, default=64, metavar="N", help="default 64")
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=200,
        metavar="US",
        help="after a request, poll this long before sleeping: catches a client's next "
        "request without a wake-up (default 200: a remote hit through a mount took 69 "
        "instead of 100 µs without it, docs/benchmarks.md), at the price of lender CPU "
        "while clients are busy (a client asking every 100 µs keeps it spinning: a whole "
        "core); it pauses when spins stop catching requests; 0 disables",
    )
    parser.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP here, e.g. 127.0.0.1:9401 (docs/operations.md)",
    )
    parser.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="log here, rotated at 10 MiB (default: stderr in the foreground, the journal "
        "under systemd, else /run/memlend/lend-PORT.log, or a private per-user directory "
        "for non-root)",
    )
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    # Tests fake the host's available memory with a file holding a byte count.
    parser.add_argument("--memory-source-file", help=argparse.SUPPRESS)
    parser.add_argument("--watch-interval", type=float, default=0.1, help=argparse.SUPPRESS)


def _bind(listen: str) -> socket.socket:
    from memlend.remote.client import parse_address

    try:
        host, port = parse_address(listen)
    except ValueError as e:
        raise UserError(f"--listen: {e}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--listen: cannot resolve {host!r}: {e.strerror}") from None
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"--listen {listen}: {e.strerror}") from None
    return sock


def _size_arg(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_memory(text: str, memory: int, host_memory: int) -> None:
    """--memory must fit in what the host (or the lender's cgroup) has at all."""
    if memory > host_memory:
        raise UserError(
            f"--memory {text} ({_gib(memory)}) is more than this host has: "
            f"{_gib(host_memory)} (MemTotal, or the memory cgroup's limit if lower)"
        )


def run_lend(args: argparse.Namespace) -> int:
    from memlend.lender import server as srv
    from memlend.lender import watcher as w
    from memlend.lender.clients import load_clients
    from memlend.lender.store import Store
    from memlend.policies import POLICIES
    from memlend.remote.secret import auth_key, load_secret
    from memlend.stackcurve import advice_budget

    memory = _size_arg("--memory", args.memory)
    block = _size_arg("--block-size", args.block_size)
    if block < 4096 or block > 1 << 20 or block & (block - 1):
        raise UserError(f"--block-size {args.block_size}: must be a power of two from 4K to 1M")
    if args.policy not in POLICIES:
        raise UserError(f"unknown policy {args.policy!r} (known: {', '.join(sorted(POLICIES))})")
    quota = _size_arg("--client-quota", args.client_quota) if args.client_quota else None
    for name, value in (
        ("--idle-timeout", args.idle_timeout),
        ("--max-connections", args.max_connections),
    ):
        if value <= 0:
            raise UserError(f"{name} must be positive")
    if args.busy_poll_us < 0:
        raise UserError("--busy-poll-us must be 0 or more")
    keys = load_clients(args.clients) if args.clients else auth_key(load_secret(args.secret_file))
    host_memory = w.host_limit()
    check_memory(args.memory, memory, host_memory)
    reserve = (
        _size_arg("--reserve", args.reserve) if args.reserve else w.default_reserve(host_memory)
    )
    try:
        store = Store(memory, block, args.policy, quota, advice_bytes=advice_budget(memory))
    except ValueError as e:
        raise UserError(f"--memory {args.memory}: {e}") from None
    except OSError as e:  # the mapping itself: overcommit refused it
        raise UserError(
            f"--memory {args.memory} ({_gib(memory)}): {e.strerror}; "
            f"this host has {_gib(host_memory)}"
        ) from None
    endpoint = None
    if args.metrics:
        from memlend.metrics.endpoint import MetricsEndpoint

        endpoint = MetricsEndpoint(args.metrics)  # bound before the fork: errors reach the user
    sock = _bind(args.listen)
    host, port = sock.getsockname()[:2]

    log_file = args.log_file
    if not args.foreground:
        log_file = log_file or _default_log(port)
        pid = os.fork()
        if pid:
            # The socket listens already: a Type=notify unit may go on, watching the child.
            notify(f"READY=1\nMAINPID={pid}")
            print(f"memlend lend: listening on {host}:{port} (pid {pid}, log {log_file})")
            if endpoint is not None:
                print(f"memlend lend: metrics on http://{endpoint.address}/metrics")
            return 0
        os.setsid()
        _redirect(log_file, daemon=True)
    elif log_file:
        _redirect(log_file, daemon=False)  # tracebacks, if ever, land next to the log
    setup_logging(log_file, args.debug, fmt="%(asctime)s %(levelname)s %(message)s")
    source = (
        w.file_source(args.memory_source_file) if args.memory_source_file else w.system_source()
    )
    cfg = srv.ServerConfig(
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        busy_poll_us=args.busy_poll_us,
        watch_interval=args.watch_interval,
        clients_file=args.clients,
    )
    server = srv.LenderServer(
        sock,
        store,
        keys,
        cfg,
        w.Watcher(store, source, reserve),
        watcher_events=not args.memory_source_file,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    # SIGHUP (systemctl reload): the clients file again; without one, nothing to do.
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    if endpoint is not None:
        from memlend.metrics.lender_collector import LenderCollector

        endpoint.start(LenderCollector(server.stats, store.blocks_per_client))
    logging.getLogger("memlend.lender").info(
        "lending %d MiB (%d slots of %d KiB) on %s:%d, reserve %d MiB, policy %s",
        memory >> 20,
        store.slots,
        block >> 10,
        host,
        port,
        reserve >> 20,
        args.policy,
    )
    if args.foreground:
        print(f"memlend lend: listening on {host}:{port}", flush=True)
        notify("READY=1")
        if endpoint is not None:
            print(f"memlend lend: metrics on http://{endpoint.address}/metrics", flush=True)
    try:
        server.serve_forever()
    finally:
        if endpoint is not None:
            endpoint.close()  # before the store's arena goes: no scrape reads a closed one
        store.close()
    return 0


def _default_log(port: int) -> str:
    from memlend.statedir import state_dir

    return str(state_dir() / f"lend-{port}.log")


def _redirect(log_file: str, *, daemon: bool) -> None:
    """stderr (and, for a daemon, stdin/stdout) to the log file."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    if daemon:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.close(null)
    os.close(fd)
