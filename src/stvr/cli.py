"""The ``stvr`` command line: one sub-command module per stage (see ``stvr.commands``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    """The full ``stvr`` parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="stvr",
        description="Spatio-temporal video re-localization by warp LSTM.",
    )
    parser.add_argument("--version", action="version", version=f"stvr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"stvr.commands.{name}")
        except ModuleNotFoundError as err:  # a stage not built into this install
            if err.name == f"stvr.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stvr`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
