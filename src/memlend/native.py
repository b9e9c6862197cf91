"""Which implementation of the remote tier's hot path runs: C or Python.

The C extension (memlend._native, docs/native.md) is used when it was built and
not turned off with MEMLEND_NATIVE=0; the Python code in memlend.remote is the
definition it follows and the fallback. `memlend stats` and the lender's stats
name the one running.
"""

from __future__ import annotations

import os
from types import ModuleType

ENV = "MEMLEND_NATIVE"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "no", "false", "off"):
        return None, f"python ({ENV}=0)"
    try:
        from memlend import _native
    except ImportError as e:  # not compiled on this machine: the Python path serves
        return None, f"python (the C extension is not built: {e})"
    return _native, "native"


lib, description = _load()
