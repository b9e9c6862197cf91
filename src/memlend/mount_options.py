"""The mount helper convention: `memlend SRC MNT -o opt[=val],...` as flags.

mount(8) and mount.fuse3 run `memlend SRC MNT -o OPTIONS` for an fstab line of type
fuse.memlend. Every `memlend mount` flag has an -o form (cache_size=4G or cache-size=4G,
lender=URL repeated, writeback_cache for a switch); the generic options mount(8),
mount.fuse3 and systemd add are accepted and ignored, the ones memlend cannot honour
are refused with one line.
"""

from __future__ import annotations

import argparse
import os

from memlend.errors import UserError

# Accepted and ignored: mount(8)/fstab bookkeeping, and what memlend always does
# anyway (it mounts nosuid,nodev, and allow_other where it may).
IGNORED = frozenset(
    {
        "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
        "_netdev", "_rnetdev", "nofail", "dev", "nodev", "suid", "nosuid", "exec",
        "async", "atime", "noatime", "relatime", "strictatime", "nodiratime", "diratime",
        "allow_other", "default_permissions", "loud", "silent",
    }
)  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")
REFUSED = {
    "ro": "read-only mounts are not supported (writes go through to BACKING)",
    "noexec": "noexec is not supported",
    "sync": "sync is not supported (writes already go through to BACKING)",
    "dirsync": "dirsync is not supported",
}
_TRUE = ("", "1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


def is_helper_call(argv: list[str], commands: set[str]) -> bool:
    """`memlend SRC MNT ...` (no command word): the mount helper convention. SRC must
    look like a path, so that a mistyped command stays a usage error."""
    if len(argv) < 2 or argv[0].startswith("-") or argv[0] in commands:
        return False
    return "/" in argv[0] or os.path.isdir(argv[0])


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """-o name (with _ and with -) -> the long flag's action, hidden flags left out."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or longs[0] == "--help":
            continue
        name = longs[0][2:]
        out[name] = out[name.replace("-", "_")] = action
    return out


def expand(options: str, parser: argparse.ArgumentParser) -> list[str]:
    """One -o argument ('a=1,b,c=2') as the flags of `parser` it stands for."""
    flags = _flags(parser)
    argv: list[str] = []
    for item in options.split(","):
        item = item.strip()
        name, has_value, value = item.partition("=")
        if not item or name in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        if name in REFUSED:
            raise UserError(f"-o {name}: {REFUSED[name]}")
        action = flags.get(name)
        if action is None:
            raise UserError(f"-o {item}: unknown mount option {name!r}")
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # a switch: name, name=yes or name=no
            if value.lower() in _TRUE:
                argv.append(flag)
            elif value.lower() not in _FALSE:
                raise UserError(f"-o {item}: {name} takes no value, or yes/no")
        elif not has_value or not value:
            raise UserError(f"-o {item}: {name} needs a value ({name}=...)")
        else:
            argv += [flag, value]
    return argv


def expand_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` of `memlend mount` with every -o OPTIONS / -oOPTIONS replaced by flags."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            value = next(it, None)
            if value is None:
                raise UserError("-o needs options (-o name=value,...)")
            out += expand(value, parser)
        elif arg.startswith("-o") and not arg.startswith("--"):
            out += expand(arg[2:], parser)
        else:
            out.append(arg)
    return out
