"""Running under systemd: readiness (sd_notify) and where logs go.

sd_notify is one datagram to $NOTIFY_SOCKET (systemd's protocol, sd_notify(3));
no library needed. Logs go to stderr in journald's format when stderr is the
journal ($JOURNAL_STREAM matches it), else to a rotating log file, else to stderr.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

log = logging.getLogger("memlend.service")

LOG_MAX_BYTES = 10 << 20  # then memlend.log -> memlend.log.1 ...
LOG_BACKUPS = 3
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:  # systemd gone or a bad variable: not worth failing for
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e)
        return False


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=DEV:INODE of the stream it connected to stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _JournalFormatter(logging.Formatter):
    """journald reads a <priority> prefix per line; it adds the time itself."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 2)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """Log files are 0600 whatever the umask (the mount daemon runs with umask 0)."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def setup_logging(
    log_file: str | None,
    debug: bool,
    *,
    fmt: str = FORMAT,
    max_bytes: int = LOG_MAX_BYTES,
) -> logging.Handler:
    """The root logger's one handler: journal, rotating `log_file`, or stderr."""
    if stderr_is_journal() and not log_file:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    elif log_file:
        handler = _PrivateRotatingFile(log_file, maxBytes=max_bytes, backupCount=LOG_BACKUPS)
        handler.setFormatter(logging.Formatter(fmt))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler
