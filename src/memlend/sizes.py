"""Parsing human byte sizes: 4096, 4K, 64M, 1.5G, 2T, 64MiB, 64MB (binary units)."""

from __future__ import annotations

import math
import re

from memlend.errors import UserError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; UserError unless it is a positive size like 64M."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise UserError(
            f"invalid size {text!r} (expected a number with an optional K, M, G or T "
            "suffix, e.g. 64M)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise UserError(f"invalid size {text!r} (must be at least 1 byte)")
    return int(value)
