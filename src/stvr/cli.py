"""The ``stvr`` command line: one sub-command module per stage (see ``stvr.commands``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

from . import __version__
from .commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    """The full ``stvr`` parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="stvr",
        description="Spatio-temporal video re-localization by warp LSTM.",
    )
    parser.add_argument("--version", action="version", version=f"stvr {__version__}")
    parser.add_argument("-v", "--verbose", dest="log_verbose", action="count", default=0,
                        help="more log messages on stderr: -v info, -vv debug (before the command, "
                             "e.g. stvr -v train ...)")
    parser.add_argument("-q", "--quiet-logs", dest="log_quiet", action="count", default=0,
                        help="errors only on stderr: no log warnings (before the command)")
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
    with logging_to_stderr(args.log_verbose - args.log_quiet):
        return run_command(args)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the record."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    """``warning: message`` (the level in lower case, as the commands' own messages)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.message}"


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the CLI: a Python warning becomes a log record of ``stvr.warnings``."""
    name = getattr(category, "__name__", "Warning")
    text = str(message) if issubclass(category, UserWarning) else f"{message} ({name}, {filename}:{lineno})"
    logging.getLogger("stvr.warnings").warning("%s", text)


@contextmanager
def logging_to_stderr(verbosity: int = 0) -> Iterator[None]:
    """Logging of one ``stvr`` command: the ``stvr`` loggers print ``level: message`` lines
    on stderr at WARNING (``verbosity`` 0), INFO (1, ``-v``), DEBUG (2, ``-vv``) or ERROR
    (-1, ``-q``); Python warnings (``warnings.warn``) are routed through the same logger
    (``stvr.warnings``), so both obey the level and look alike. Restored on exit."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR)
    logger = logging.getLogger("stvr")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    old_level, old_show = logger.level, warnings.showwarning
    logger.addHandler(handler)
    logger.setLevel(level)
    warnings.showwarning = _log_warning
    try:
        yield
    finally:
        warnings.showwarning = old_show
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _command_name(args: argparse.Namespace) -> str:
    parts = [getattr(args, k, None) for k in ("command", "data_command", "model_command",
                                               "viz_command", "bench")]
    return " ".join(["stvr", *[p for p in parts if isinstance(p, str)]])


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: SIGTERM and Ctrl-C end with one line (exit 143 / 130) after
    the commands' ``finally`` blocks removed their temporary files; a ``ValueError`` or
    ``OSError`` that a command did not handle is one line on stderr, exit 2 (the
    traceback with ``STVR_DEBUG=1``)."""
    import os

    from .guards import Terminated, install_signal_handlers

    install_signal_handlers()
    name = _command_name(args)
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"{name}: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{name}: interrupted; temporary files removed", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if os.environ.get("STVR_DEBUG"):
            raise
        text = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
            text = f"{err.filename}: {text}"
        print(f"{name}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
