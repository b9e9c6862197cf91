"""`python -m memlend.lender ...`: the lender alone (same options as `memlend lend`)."""

from __future__ import annotations

import argparse
import sys

from memlend.errors import UserError
from memlend.lender.cli import add_lend_arguments, run_lend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m memlend.lender")
    add_lend_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_lend(args)
    except UserError as e:
        print(f"memlend: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
