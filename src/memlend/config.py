"""The TOML config file: defaults for `memlend mount` ([mount]) and `memlend lend` ([lend]).

    [mount]
    cache_size = "4G"
    lenders = ["memlend://10.0.0.2:7070"]
    secret_file = "/etc/memlend/secret"

    [lend]
    listen = "0.0.0.0:7070"
    memory = "8G"
    secret_file = "/etc/memlend/secret"

Keys are the commands' long flags with _ for - (`lenders` is the list behind --lender).
Flags given on the command line win. read() reports every problem, one line each.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable
from typing import Any

from memlend.errors import UserError
from memlend.sizes import parse_size

DEFAULT_PATH = "/etc/memlend/memlend.toml"

Checker = Callable[[Any], Any]  # returns the value for argparse, or raises ValueError


def _size(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f'expected a size such as "4G", got {_tname(v)}')
    try:
        parse_size(str(v))
    except UserError as e:
        raise ValueError(str(e)) from None
    return str(v)


def _int(minimum: int) -> Checker:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {_tname(v)}")
        if v < minimum:
            raise ValueError(f"must be at least {minimum}, got {v}")
        return v

    return check


def _float(positive: bool) -> Checker:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {_tname(v)}")
        if v < 0 or (positive and v == 0):
            raise ValueError(f"must be {'positive' if positive else '0 or more'}, got {v}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_tname(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {_tname(v)}")
    return v


def _choice(*names: str) -> Checker:
    def check(v: Any) -> str:
        if _str(v) not in names:
            raise ValueError(f"{v!r} is not one of {', '.join(names)}")
        return v

    return check


def _policy(v: Any) -> str:
    from memlend.policies import POLICIES

    return _choice(*sorted(POLICIES))(v)


def _lenders(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list of URLs, got {_tname(v)}")
    for url in v:
        scheme, sep, rest = _str(url).partition("://")
        if not sep or scheme not in ("memlend", "memcached") or ":" not in rest:
            raise ValueError(f"{url!r} is not memlend://HOST:PORT or memcached://HOST:PORT")
    return list(v)


def _tname(v: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "a table"}  # fmt: skip
    return names.get(type(v), type(v).__name__)


# section -> key -> (argparse dest, checker)
SCHEMA: dict[str, dict[str, tuple[str, Checker]]] = {
    "mount": {
        "local_tier": ("local_tier", _choice("kernel", "memlend")),
        "writeback_cache": ("writeback_cache", _bool),
        "no_passthrough": ("no_passthrough", _bool),
        "cache_size": ("cache_size", _size),
        "block_size": ("block_size", _size),
        "policy": ("policy", _policy),
        "threads": ("threads", _int(1)),
        "attr_timeout": ("attr_timeout", _float(positive=False)),
        "lenders": ("lender", _lenders),
        "secret_file": ("secret_file", _str),
        "seal_key_file": ("seal_key_file", _str),
        "remote_deadline": ("remote_deadline", _float(positive=True)),
        "remote_mode": ("remote_mode", _choice("inclusive", "exclusive")),
        "lender_streams": ("lender_streams", _choice("auto", "always")),
        "client_name": ("client_name", _str),
        "nonempty": ("nonempty", _bool),
        "metrics": ("metrics", _str),
        "log_file": ("log_file", _str),
        "debug": ("debug", _bool),
    },
    "lend": {
        "listen": ("listen", _str),
        "memory": ("memory", _size),
        "secret_file": ("secret_file", _str),
        "clients": ("clients", _str),
        "metrics": ("metrics", _str),
        "reserve": ("reserve", _size),
        "block_size": ("block_size", _size),
        "policy": ("policy", _policy),
        "client_quota": ("client_quota", _size),
        "idle_timeout": ("idle_timeout", _float(positive=True)),
        "max_connections": ("max_connections", _int(1)),
        "busy_poll_us": ("busy_poll_us", _int(0)),
        "log_file": ("log_file", _str),
        "debug": ("debug", _bool),
    },
}


# Keys that exclude each other, as their flags do (argparse's mutually exclusive groups).
EXCLUSIVE: dict[str, list[tuple[str, str]]] = {"lend": [("secret_file", "clients")]}


def read(path: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The checked sections of the file at `path` and one line per problem found."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        return {}, [f"{path}: {e.strerror}"]
    except tomllib.TOMLDecodeError as e:
        return {}, [f"{path}: not valid TOML: {e}"]
    out: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for section, table in raw.items():
        if section not in SCHEMA:
            errors.append(f"{path}: unknown section [{section}] (known: mount, lend)")
            continue
        if not isinstance(table, dict):
            errors.append(f"{path}: {section} must be a table ([{section}])")
            continue
        out[section] = {}
        for key, value in table.items():
            spec = SCHEMA[section].get(key)
            if spec is None:
                errors.append(f"{path}: [{section}] unknown key {key!r}")
                continue
            try:
                out[section][key] = spec[1](value)
            except ValueError as e:
                errors.append(f"{path}: [{section}] {key}: {e}")
        for a, b in EXCLUSIVE.get(section, []):
            if a in table and b in table:
                errors.append(
                    f"{path}: [{section}] {a} and {b} exclude each other "
                    f"(as --{a.replace('_', '-')} and --{b.replace('_', '-')} do): keep one"
                )
    return out, errors


def load(path: str) -> dict[str, dict[str, Any]]:
    """The sections of a valid file; UserError (one line) naming every problem."""
    sections, errors = read(path)
    if errors:
        more = f" (and {len(errors) - 1} more; run `memlend config check {path}`)"
        raise UserError(errors[0] + (more if len(errors) > 1 else ""))
    return sections


def default_path() -> str | None:
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def dumps(sections: dict[str, dict[str, Any]]) -> str:
    """TOML text for checked sections (strings, numbers, booleans, lists of strings)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    parts = []
    for section, table in sections.items():
        lines = [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def apply(parser: argparse.ArgumentParser, section: dict[str, Any]) -> None:
    """Make a section's values `parser`'s defaults: flags given still win, and a
    required flag the file supplies is no longer required."""
    by_dest = {a.dest: a for a in parser._actions}  # argparse keeps no public index
    for key, value in section.items():
        dest = SCHEMA_DEST[key]
        action = by_dest[dest]
        action.required = False
        for group in parser._mutually_exclusive_groups:  # e.g. lend's --secret-file|--clients
            if action in group._group_actions:
                group.required = False
        if isinstance(action, argparse._AppendAction):
            # append would add the flags to the file's list; flags replace it instead
            parser.set_defaults(**{f"config_{dest}": value})
        else:
            action.default = value


def finish(args: argparse.Namespace) -> None:
    """After parsing: lists from the file where no flag gave any."""
    for name in [n for n in vars(args) if n.startswith("config_")]:
        dest = name[len("config_") :]
        if not getattr(args, dest, None):
            setattr(args, dest, getattr(args, name))


SCHEMA_DEST = {key: spec[0] for table in SCHEMA.values() for key, spec in table.items()}


def add_config_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="check or show a config file",
        description=f"memlend reads defaults for `mount` and `lend` from {DEFAULT_PATH} "
        "(or --config FILE); flags override them. `check` lists every problem, one line "
        "each; `show` prints the checked file back as TOML.",
    )
    p.add_argument("action", choices=("check", "show"))
    p.add_argument("file", metavar="FILE", nargs="?", help=f"default {DEFAULT_PATH}")
    p.set_defaults(func=run_config_command)


def run_config_command(args: argparse.Namespace) -> int:
    import sys

    path = args.file or args.config or DEFAULT_PATH
    sections, errors = read(path)
    for line in errors:
        print(f"memlend: {line}", file=sys.stderr)
    if errors:
        return 2
    if args.action == "show":
        print(dumps(sections), end="")
    else:
        print(f"{path}: ok")
    return 0


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """--config on a command too (and so config=FILE as a mount -o option)."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML defaults (default {DEFAULT_PATH})")


def config_argument(argv: list[str]) -> str | None:
    """The --config FILE given anywhere in `argv`, else the default file if it exists."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return default_path()


def command_index(argv: list[str]) -> int | None:
    """Where the command word (or the mount helper's SRC) is, past global options."""
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return i
    return None
