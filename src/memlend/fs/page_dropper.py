"""Dropping the backing store's copy of written pages, later rather than at close.

Writes through the mount go to the backing file through its page cache, so its pages
are a second local copy (DESIGN.md: none should be kept). Dropping them at close
(fadvise DONTNEED) costs the close path: the dirty pages cannot be dropped yet, and
DONTNEED starts their write-back there and then, one small file at a time (about 1 ms
per created file, issue 10 item 3) instead of letting the flusher batch it. So a
written file's descriptor is handed over here at release and dropped DELAY seconds
later, once the flusher has written it back (vm.dirty_expire_centisecs: 30 s), from
a thread of its own. A bounded number of descriptors wait; beyond that the oldest is
dropped at once, as before. A file removed meanwhile is let go at once (forget), or its
held descriptor would keep its blocks allocated on the backing store.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import deque

DELAY = 35.0  # seconds: the flusher writes pages back 30 s after they were dirtied
MAX_WAITING = 1024  # descriptors held at most (also at most 1/8 of the fd limit)


def _drop(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    os.close(fd)


class PageDropper:
    def __init__(self, delay: float = DELAY, limit: int | None = None) -> None:
        if limit is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = MAX_WAITING if soft == resource.RLIM_INFINITY else soft // 8
            limit = max(0, min(MAX_WAITING, limit))
        self.delay, self.limit = delay, limit
        # Entries [due, fd, key], oldest first; fd -1 once let go early (forget). By key
        # too, so that an unlink costs O(1), not a scan of up to `limit` entries.
        self._waiting: deque[list] = deque()
        self._by_key: dict[object, list[list]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memlend-drop", daemon=True)
        self._thread.start()

    def later(self, fd: int, key: object) -> None:
        """Take `fd` (a written backing file, `key` its identity): fadvise DONTNEED and
        close it later."""
        try:
            gone = os.fstat(fd).st_nlink == 0  # removed before its release reached us
        except OSError:
            gone = True
        if gone:
            os.close(fd)
            return
        oldest = -1
        with self._lock:
            if self._stop.is_set() or self.limit == 0:
                oldest = fd
            else:
                if len(self._waiting) >= self.limit:
                    oldest = self._pop()
                entry = [time.monotonic() + self.delay, fd, key]
                self._waiting.append(entry)
                self._by_key.setdefault(key, []).append(entry)
        if oldest >= 0:
            _drop(oldest)

    def _pop(self) -> int:
        """The oldest entry's descriptor (-1 if let go already); under the lock."""
        _, fd, key = self._waiting.popleft()
        entries = self._by_key.get(key)
        if entries:
            entries.pop(0)
            if not entries:
                del self._by_key[key]
        return fd

    def waiting(self) -> int:
        return len(self._waiting)

    def forget(self, key: object) -> None:
        """The file `key` may be gone: close its waiting descriptors now (no drop
        needed: a removed file's pages go with its last descriptor)."""
        with self._lock:
            fds = [e[1] for e in self._by_key.get(key, ()) if e[1] >= 0]
            for e in self._by_key.get(key, ()):
                e[1] = -1
        for fd in fds:
            os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            due = []
            with self._lock:
                while self._waiting and self._waiting[0][0] <= now:
                    due.append(self._pop())
                nxt = self._waiting[0][0] - now if self._waiting else self.delay
            for fd in due:
                if fd >= 0:
                    _drop(fd)
            self._stop.wait(max(0.05, nxt))

    def close(self) -> None:
        """Drop and close everything still waiting (at unmount)."""
        with self._lock:
            self._stop.set()
            fds = [e[1] for e in self._waiting if e[1] >= 0]
            self._waiting.clear()
            self._by_key.clear()
        self._thread.join(5)
        for fd in fds:
            _drop(fd)
