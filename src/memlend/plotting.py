"""matplotlib, which only plots need, is an optional dependency (the `bench` extra):
a mount or a lender never imports it."""

from __future__ import annotations

from typing import Any

from memlend.errors import UserError

HINT = "plots need matplotlib: pip install 'memlend[bench]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files (Agg), or a one-line UserError."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
