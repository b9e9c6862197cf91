"""Whether a sequential stream asks the lenders: while they deliver a block faster than
the disk, as measured on both (issue 9: no blanket bypass of the lenders for streams).

A 100 MB/s cloud volume streams from lenders; a local NVMe disk does not wait for them.
Both local tiers use one gate per mount: the kernel tier for its multi-block requests,
memlend's own tier for its read-ahead windows.
"""

from __future__ import annotations

ALPHA = 0.1  # weight of the newest sample in the moving averages
PROBE_EVERY = 16  # a skipped lender is asked again after this many requests


class StreamGate:
    """Moving averages of the time per block from the lenders and from the disk."""

    def __init__(self) -> None:
        self.remote_block_seconds = 0.0  # a multi-get's time per block it found
        self.disk_block_seconds = 0.0  # a disk read's time per block
        self.always = False  # --lender-streams always: no measuring, always ask
        self._skipped = 0

    def ask(self) -> bool:
        """Ask the lenders for this stream request? While they have been faster than the
        disk, before either is measured, and on every PROBE_EVERY-th request they would
        otherwise be skipped for, to measure again. (Races between threads only shift
        a probe: no lock.)"""
        if self.always or self.remote_block_seconds <= self.disk_block_seconds:
            return True
        if not self.disk_block_seconds:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    def remote_took(self, seconds: float, blocks: int) -> None:
        if blocks:
            self.remote_block_seconds += ALPHA * (seconds / blocks - self.remote_block_seconds)

    def disk_took(self, seconds: float, blocks: int) -> None:
        if blocks:
            self.disk_block_seconds += ALPHA * (seconds / blocks - self.disk_block_seconds)
