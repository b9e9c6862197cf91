"""Where daemons put their default logs: a private directory per user.

root: /run/memlend. Others: $XDG_RUNTIME_DIR/memlend, else $XDG_STATE_HOME/memlend,
else /tmp/memlend-UID. A shared name such as /tmp/memlend lets the first user's 0700
lock out everyone else and invites a planted symlink, so the directory is made with
mkdir (never following a link), then checked: a real directory, owned by us, and
closed to others (we tighten it if it is ours; anything else is refused).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from memlend.errors import UserError


def _candidates() -> list[Path]:
    if os.geteuid() == 0:
        return [Path("/run/memlend")]
    out = []
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        base = os.environ.get(var)
        # Only a base that exists and is our own: a stale variable must not make us
        # create directories elsewhere.
        if base and os.path.isabs(base) and _owned_dir(base):
            out.append(Path(base) / "memlend")
    out.append(Path("/tmp") / f"memlend-{os.geteuid()}")
    return out


def _owned_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def private_dir(path: Path) -> Path:
    """`path` made (0700) or found safe to use; UserError otherwise."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link: refusing to use it (remove it)")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is not a directory: refusing to use it")
    if st.st_uid != os.geteuid():
        raise UserError(
            f"{path} belongs to uid {st.st_uid}, not to us ({os.geteuid()}): refusing to use it"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, but open to others: close it
    return path


def state_dir() -> Path:
    """This user's private directory for daemon logs (see the module's doc)."""
    return private_dir(_candidates()[0])
