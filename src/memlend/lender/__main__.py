"""`python -m memlend.lender ...`: the lender alone, exactly `memlend lend ...`."""

from __future__ import annotations

import sys

from memlend.cli import main as memlend_main


def main(argv: list[str] | None = None) -> int:
    # memlend's own parsing, so the config file, defaults, errors and exit statuses
    # are those of `memlend lend`.
    args = sys.argv[1:] if argv is None else list(argv)
    return memlend_main(["lend", *args], prog="python -m memlend.lender")


if __name__ == "__main__":
    sys.exit(main())
