"""memlend's command line: mount, umount, stats, genkey, lend, sim, bench, demo.

Every user mistake ends as one line on stderr and a non-zero exit status:
UserError -> 2, other OSError -> 1. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from memlend import __version__
from memlend.errors import UserError
from memlend.sizes import parse_size

DEFAULT_CACHE = "256M"
DEFAULT_BLOCK = "16K"  # docs/benchmarks.md: block size
DEFAULT_POLICY = "lirs-lazy"  # the mount's; docs/policies.md
DEFAULT_TIER = "kernel"  # docs/design-choices.md: the testbed's matrix


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _log_path(mountpoint: str) -> Path:
    from memlend.statedir import state_dir

    name = os.path.realpath(mountpoint).strip("/").replace("/", "_") or "root"
    return state_dir() / f"mount-{name}.log"


# ---- mount ----------------------------------------------------------------


def _add_mount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount",
        help="mirror a directory through memlend's cache (FUSE)",
        description=(
            "Mount BACKING at MOUNTPOINT. The first tier is the kernel page cache "
            "(--local-tier kernel) or memlend's own block cache (--local-tier memlend); "
            "either way BACKING is read with O_DIRECT, so no second local copy is kept, and "
            "with --lender what the first tier cannot hold is lent to other machines. "
            "Writes go through to BACKING. Returns "
            "once the mount is ready; the daemon keeps running in the background and logs "
            "to /run/memlend/mount-<mountpoint>.log (non-root: $XDG_RUNTIME_DIR/memlend, "
            "else /tmp/memlend-UID). Stop it "
            "with `memlend umount MOUNTPOINT`, or SIGTERM/SIGINT to the daemon. For "
            "/etc/fstab (type fuse.memlend), every flag also has an -o form: "
            "`memlend BACKING MOUNTPOINT -o cache_size=4G,lender=URL,...`; defaults may come "
            "from /etc/memlend/memlend.toml ([mount])."
        ),
    )
    p.add_argument("backing", metavar="BACKING", help="the directory to mirror")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    p.add_argument(
        "--local-tier",
        choices=("kernel", "memlend"),
        default=DEFAULT_TIER,
        help="the first tier: `kernel`, the kernel page cache (hits at page-cache speed; "
        "memlend holds no copy and lends every block it reads from disk), or `memlend`, "
        "memlend's own block cache of --cache-size under --policy (direct I/O, "
        f"scan-resistant; every hit goes through the daemon). Default {DEFAULT_TIER}; "
        "docs/design-choices.md says which won where",
    )
    p.add_argument(
        "--writeback-cache",
        action="store_true",
        help="with --local-tier kernel: let the kernel absorb writes in its page cache and "
        "send them in batches, as a local file system does (fsync and close flush them)",
    )
    p.add_argument(
        "--no-passthrough",
        action="store_true",
        help="with --local-tier kernel as root: serve every write and read of written files "
        "through the daemon, instead of letting the kernel do small written files' I/O on "
        "the backing file itself (FUSE passthrough, Linux 6.9+; the default when granted)",
    )
    p.add_argument(
        "--cache-size",
        type=_size,
        default=DEFAULT_CACHE,
        metavar="SIZE",
        help=f"memlend's own cache (--local-tier memlend): memory for cached blocks, "
        f"bookkeeping included, a hard limit (e.g. 512M, 1.5G; default {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--block-size",
        type=_size,
        default=DEFAULT_BLOCK,
        metavar="SIZE",
        help=f"cache block size, a power of two from 4K to 1M (default {DEFAULT_BLOCK}; "
        "see docs/design-choices.md)",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        metavar="NAME",
        help=f"replacement policy (default {DEFAULT_POLICY}; `memlend sim --help` lists them)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=16,
        help="FUSE worker threads: concurrent requests (default 16)",
    )
    p.add_argument(
        "--attr-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long the kernel may cache attributes and names (default 1.0); data "
        "changes outside the mount are always seen at the next open",
    )
    remote = p.add_argument_group("lending (the remote tier)")
    remote.add_argument(
        "--lender",
        action="append",
        default=[],
        metavar="URL",
        help="send evicted blocks to this lender and read them back from it: "
        "memlend://HOST:PORT (a `memlend lend` daemon) or memcached://HOST:PORT; repeat "
        "for several (rendezvous hashing spreads blocks over them)",
    )
    remote.add_argument(
        "--secret-file",
        metavar="PATH",
        help="the secret shared with memlend:// lenders (`memlend genkey PATH`)",
    )
    remote.add_argument(
        "--client-name",
        metavar="NAME",
        help="this client's name in the lenders' --clients files; --secret-file is then "
        "this client's own key, and the lenders keep its blocks apart from everyone else's",
    )
    remote.add_argument(
        "--seal-key-file",
        metavar="PATH",
        help="key that encrypts and authenticates lent blocks; never give it to lenders "
        "(default: created at first use in /var/lib/memlend/seal.key, or under "
        "$XDG_STATE_HOME for non-root)",
    )
    remote.add_argument(
        "--remote-deadline",
        type=float,
        default=2.0,
        metavar="MS",
        help="give up on lenders after this many milliseconds and read the disk (default 2); "
        "while the disk itself has been slower than that, a read waits for the lenders as long "
        "as a disk read has been taking (up to 50 ms)",
    )
    remote.add_argument(
        "--remote-mode",
        choices=("inclusive", "exclusive"),
        default="inclusive",
        help="inclusive (default): a block read back stays on the lender, and is not sent "
        "again; exclusive (--local-tier memlend only): it is deleted from the lender "
        "(docs/remote.md)",
    )
    remote.add_argument(
        "--lender-streams",
        choices=("auto", "always"),
        default="auto",
        help="whether sequential reads (read-ahead) ask the lenders: auto "
        "(default) while they deliver a block faster than the disk, as measured; always, "
        "even when the disk is faster (spares a metered disk's IOPS)",
    )
    p.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even if MOUNTPOINT has entries (they are hidden while mounted); "
        "without it a non-empty mountpoint is refused",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics over HTTP here, e.g. 127.0.0.1:9400 (docs/operations.md)",
    )
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--log-file", metavar="PATH", help="daemon log (default under /run/memlend)")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # Forces the fallback for backing stores that refuse O_DIRECT (tests use it).
    p.add_argument("--buffered-backing", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)


def _mount_config(args: argparse.Namespace):  # -> MountConfig
    from memlend.fs.daemon import MountConfig, check_config

    cfg = MountConfig(
        backing=args.backing,
        mountpoint=args.mountpoint,
        cache_size=args.cache_size,
        block_size=args.block_size,
        policy=args.policy,
        threads=args.threads,
        attr_timeout=args.attr_timeout,
        direct_io=not args.buffered_backing,
        local_tier=args.local_tier,
        writeback_cache=args.writeback_cache,
        passthrough=not args.no_passthrough,
        lenders=args.lender,
        secret_file=args.secret_file,
        seal_key_file=args.seal_key_file,
        client_name=args.client_name,
        nonempty=args.nonempty,
        remote_deadline=args.remote_deadline / 1000,
        remote_mode=args.remote_mode,
        lender_streams=args.lender_streams,
        metrics=args.metrics,
    )
    return check_config(cfg)


def cmd_mount(args: argparse.Namespace) -> int:
    from memlend.fs.daemon import mount_warnings, serve

    _remove_dead_mount(args.mountpoint)
    cfg = _mount_config(args)  # refuse bad input here, before any daemon exists
    if args.ready_fd is None:
        for warning in mount_warnings(cfg):
            print(f"memlend: warning: {warning}", file=sys.stderr)
    if args.foreground or args.ready_fd is not None:
        from memlend.service import setup_logging

        setup_logging(args.log_file, args.debug)
        ready = _print_ready if args.ready_fd is None else _pipe_ready(args.ready_fd)
        return serve(cfg, ready)
    return _spawn_daemon(args)


def _remove_dead_mount(mountpoint: str) -> None:
    """A memlend daemon that died (kill -9, OOM killer) leaves a dead mount behind:
    remove it, so that mounting again just works."""
    from memlend.fuse.mount import is_dead_mount, mount_type, unmount_dead

    if not is_dead_mount(mountpoint) or mount_type(mountpoint) != "fuse.memlend":
        return  # anything else is check_config's to refuse
    unmount_dead(os.path.realpath(mountpoint))
    print(
        f"memlend: warning: {mountpoint} was a dead mount (its daemon was gone): unmounted it",
        file=sys.stderr,
    )


def _print_ready(error: str | None) -> None:
    from memlend.service import notify

    if error:
        print(f"memlend: {error}", file=sys.stderr)
    else:
        notify("READY=1")  # Type=notify units: the mount is up
        print("memlend: mounted; Ctrl-C to unmount", file=sys.stderr)


def _pipe_ready(fd: int):  # -> Callable[[str | None], None]
    def ready(error: str | None) -> None:
        nonlocal fd
        if fd < 0:
            return
        os.write(fd, (f"error {error}\n" if error else "ok\n").encode())
        os.close(fd)
        fd = -1

    return ready


def _spawn_daemon(args: argparse.Namespace) -> int:
    log_file = args.log_file or str(_log_path(args.mountpoint))
    r, w = os.pipe()
    # The daemon gets the user's own arguments (every flag, whatever is added later),
    # plus where to log and the pipe to say "ready" on; it runs in our directory.
    cmd = [sys.executable, "-m", "memlend", *args.argv, "--log-file", log_file]
    cmd += ["--ready-fd", str(w)]
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=devnull, stdout=log, stderr=log, pass_fds=[w], start_new_session=True
        )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode().strip()
    if line == "ok":
        from memlend.service import notify

        notify(f"READY=1\nMAINPID={proc.pid}")  # systemd then watches the daemon
        return 0
    if line.startswith("error "):
        raise UserError(line[6:])
    code = proc.wait()
    raise UserError(f"the mount daemon exited ({code}) before the mount was ready; see {log_file}")


# ---- umount / stats ---------------------------------------------------------


def read_stats(mountpoint: str) -> dict:
    """The live counters of the memlend mount at `mountpoint`."""
    from memlend.fs.passthrough import STATS_XATTR
    from memlend.fuse.mount import is_dead_mount

    dead = UserError(
        f"{mountpoint}: the memlend daemon is gone (dead mount); run `memlend umount {mountpoint}`"
    )
    if is_dead_mount(mountpoint):  # before isdir(), which says no there
        raise dead
    if not os.path.isdir(mountpoint):
        raise UserError(f"{mountpoint} is not a directory")
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR.decode())
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise UserError(f"{mountpoint} is not a memlend mount") from None
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise dead from None
        raise
    return json.loads(raw)


def cmd_umount(args: argparse.Namespace) -> int:
    from memlend.fuse.mount import is_dead_mount, mount_type, unmount, unmount_dead

    if is_dead_mount(args.mountpoint):
        if mount_type(args.mountpoint) != "fuse.memlend":
            raise UserError(f"{args.mountpoint} is in a dead mount but is not a memlend mount")
        unmount_dead(os.path.realpath(args.mountpoint))
        print(
            f"memlend: {args.mountpoint}: the daemon was gone; removed the dead mount",
            file=sys.stderr,
        )
        return 0
    pid = read_stats(args.mountpoint)["pid"]
    try:
        unmount(os.path.realpath(args.mountpoint), lazy=args.lazy)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UserError(
                f"{args.mountpoint} is busy: files are open there (close them, or use --lazy)"
            ) from None
        raise
    # After a lazy unmount the daemon serves the files still open and ends at their
    # last close, which may be much later: do not wait for that.
    deadline = time.monotonic() + (2 if args.lazy else 30)
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break
        except OSError:
            break
        time.sleep(0.05)
    return 0


def lender_stats(address: str, secret_file: str) -> dict:
    """A lender's own counters, over an authenticated connection."""
    from memlend.remote.client import LenderClient, RemoteError, parse_address
    from memlend.remote.secret import auth_key, hkdf, load_secret

    try:
        host, port = parse_address(address)
    except ValueError as e:
        raise UserError(f"--lender: {e}") from None
    secret = load_secret(secret_file)
    try:
        # An id of its own: asking for stats must not touch any mount's namespace.
        with LenderClient((host, port), auth_key(secret), hkdf(secret, b"stats", 16)) as c:
            return c.stats()
    except (RemoteError, OSError) as e:
        raise UserError(f"lender {address}: {e}") from None


def cmd_stats(args: argparse.Namespace) -> int:
    if args.lender:
        if args.mountpoint:
            raise UserError("give a MOUNTPOINT or --lender, not both")
        if not args.secret_file:
            raise UserError("--lender needs --secret-file")
        if args.watch:
            return _watch(f"memlend lender {args.lender}", args,
                          lambda: lender_stats(args.lender, args.secret_file))  # fmt: skip
        stats = lender_stats(args.lender, args.secret_file)
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            from memlend.report import dict_table, lender_advice_lines

            dict_table(f"memlend lender {args.lender}", stats)
            for line in lender_advice_lines(stats):
                print(line)
        return 0
    if not args.mountpoint:
        raise UserError("which mount? give a MOUNTPOINT (or --lender HOST:PORT)")
    if args.watch:
        return _watch(f"memlend {args.mountpoint}", args, lambda: read_stats(args.mountpoint))
    stats = read_stats(args.mountpoint)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    from memlend.report import stats_table

    stats_table(stats)
    return 0


def _watch(title: str, args: argparse.Namespace, read) -> int:
    from memlend.watch import watch

    if args.json:
        raise UserError("--watch draws a table: use --json alone for one JSON object")
    if args.count is not None and args.count < 1:
        raise UserError("--count must be 1 or more")
    if args.interval <= 0:
        raise UserError("--interval must be positive")
    read()  # a wrong mountpoint or lender: one line, before the screen is taken
    return watch(title, read, interval=args.interval, count=args.count)


def cmd_doctor(args: argparse.Namespace) -> int:
    from memlend.doctor import run_checks

    failed = False
    for state, what, detail in run_checks(args.backing, args.lender, args.secret_file):
        print(f"{state:<4}  {what}: {detail}", flush=True)
        failed |= state == "FAIL"
    return 1 if failed else 0


def cmd_sim(args: argparse.Namespace) -> int:
    from memlend import sim

    return sim.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from memlend.demo import run_demo

    return run_demo(args)


# ---- entry point -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def cmd_bench(args: argparse.Namespace) -> int:
    from memlend.bench import run as bench_run  # the testbed: only for this command

    return bench_run.run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memlend",
        description="memlend: a user-space, scan-resistant file cache for VMs (FUSE). "
        "Start with `memlend demo`.",
    )
    parser.add_argument("--version", action="version", version=f"memlend {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML defaults for mount and lend (default /etc/memlend/memlend.toml if present)",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    _add_mount(sub)

    p = sub.add_parser("umount", help="unmount a memlend mount and stop its daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--lazy", action="store_true", help="detach now even if files are open (as umount -l)"
    )
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "stats",
        help="live counters of a running mount, or of a lender",
        description="`memlend stats MOUNTPOINT` shows a mount's counters; `memlend stats "
        "--lender HOST:PORT --secret-file PATH` asks a lender for its own view (memory cap, "
        "bytes used, clients, blocks, hits, evictions, memory given back).",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--lender", metavar="HOST:PORT", help="ask this lender instead of a mount")
    p.add_argument("--secret-file", metavar="PATH", help="the lender's secret (with --lender)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--watch", action="store_true", help="redraw every second, with rates (Ctrl-C ends)"
    )
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N redraws")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "doctor",
        help="check this host for memlend, one line per check",
        description="Checks FUSE (a real handshake in a temporary mount: protocol version "
        "and the flags the kernel grants), allow_other in /etc/fuse.conf, cgroups, the clock "
        "(clocksource and the cost of reading it), O_DIRECT "
        "on each --backing directory, and that each --lender is reachable and accepts "
        "--secret-file. Exit status 1 if a check fails.",
    )
    p.add_argument("--backing", action="append", default=[], metavar="DIR",
                   help="a backing directory to check for O_DIRECT (repeatable)")  # fmt: skip
    p.add_argument("--lender", action="append", default=[], metavar="URL",
                   help="memlend://HOST:PORT or memcached://HOST:PORT (repeatable)")  # fmt: skip
    p.add_argument("--secret-file", metavar="PATH", help="the lenders' shared secret")
    p.set_defaults(func=cmd_doctor)

    from memlend import sim
    from memlend.lender import cli as lender_cli

    p = sub.add_parser("genkey", help="write a new random secret file (for lenders and mounts)")
    lender_cli.add_genkey_arguments(p)
    p.set_defaults(func=lender_cli.run_genkey)

    p = sub.add_parser("lend", help="lend this machine's spare memory to memlend mounts")
    lender_cli.add_lend_arguments(p)
    p.set_defaults(func=lender_cli.run_lend)

    p = sub.add_parser(
        "sim",
        help="replay block traces through the cache policies",
        description="Replay block traces through the very policy code the mount uses "
        "and print miss ratios.",
    )
    sim.add_arguments(p)
    p.set_defaults(func=cmd_sim)

    from memlend.bench import matrix

    p = sub.add_parser(
        "bench",
        help="the testbed: kernel page cache vs memlend's local cache vs lenders (root)",
        description="Builds 'VMs' on this machine (memory/blkio/cpuset cgroups, network "
        "namespaces for the lenders), runs the workload x configuration matrix on the same "
        "data and memory, writes results.json, report.md and PNG plots to --out, and removes "
        "everything it set up, also on failure and Ctrl-C. Needs root.",
    )
    matrix.add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "demo",
        help="the project in one table: page cache vs memlend vs memlend with a lender",
        description="Builds a small testbed (like `memlend bench --quick`): a client 'VM' "
        "(a memory cgroup of --client-memory holding the workload and the mount, its disk "
        "throttled like a cloud volume) reads a data set 4x its memory at random, 4 KiB at a "
        "time, with the kernel page cache alone, with memlend's cache, and with memlend plus "
        "a `memlend lend` daemon in a second 'VM' (own cgroup and network namespace). fio "
        "checks every byte. Prints the three with the speed-up over the page cache; removes "
        "everything it set up, also on failure and Ctrl-C. Needs root, cgroup v1 memory/"
        "blkio/cpuset, /dev/fuse, fio, 2 CPUs; takes about 2 minutes.",
    )
    p.add_argument(
        "--client-memory", type=_size, default="192M", help="the client VM's memory (192M)"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="reads per configuration (8 s)")
    p.add_argument("--disk", default="cloud", help="disk profile: cloud (default), hdd, none")
    p.add_argument("--out", metavar="DIR", help="keep results.json and report.md here")
    p.set_defaults(func=cmd_demo)

    from memlend.config import add_config_command

    add_config_command(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parse(raw: list[str], prog: str | None = None) -> argparse.Namespace:
    """Parse, after the mount helper form (`memlend SRC MNT -o ...`) is turned into
    `memlend mount SRC MNT --flags` and the config file's values became defaults.
    `prog` names the command in usage and errors instead of `memlend COMMAND`."""
    from memlend import config as config_file
    from memlend import mount_options

    parser = build_parser()
    subs = _subcommands(parser)
    for name in ("mount", "lend"):
        config_file.add_config_option(subs[name])
    at = config_file.command_index(raw)
    if at is not None and mount_options.is_helper_call(raw[at:], set(subs)):
        raw = [*raw[:at], "mount", *raw[at:]]
    if at is not None and raw[at] == "mount":
        raw = [*raw[: at + 1], *mount_options.expand_argv(raw[at + 1 :], subs["mount"])]
    path = config_file.config_argument(raw)
    if prog is not None and at is not None and raw[at] in subs:
        subs[raw[at]].prog = prog
    if at is not None and raw[at] in ("mount", "lend"):  # the commands the file is for
        sections = config_file.load(path) if path else {}
        for name in ("mount", "lend"):
            config_file.apply(subs[name], sections.get(name, {}))
    for p in (parser, subs["mount"], subs["lend"]):
        p.set_defaults(config=path)
    args = parser.parse_args(raw)
    config_file.finish(args)
    args.argv = raw
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run `memlend ARGV`; `prog` is what usage and errors call the command given
    (`python -m memlend.lender` runs `lend` under its own name)."""
    raw = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(raw, prog)
        return args.func(args)
    except UserError as e:
        print(f"memlend: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"memlend: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memlend: interrupted", file=sys.stderr)
        return 130
