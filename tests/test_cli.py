"""The `stvr` entry point: logging level from -v/-q, warnings and logs on one path."""

from __future__ import annotations

import logging
import warnings

from stvr.cli import build_parser, logging_to_stderr


def test_verbosity_flags_parse():
    args = build_parser().parse_args(["-vv", "evaluate", "p.json", "d.json"])
    assert args.log_verbose == 2 and args.log_quiet == 0
    args = build_parser().parse_args(["-q", "evaluate", "p.json", "d.json"])
    assert args.log_verbose == 0 and args.log_quiet == 1


def test_logs_and_warnings_share_one_path_and_level(capsys):
    log = logging.getLogger("stvr.some.module")
    before = logging.getLogger("stvr").level
    with logging_to_stderr(0):
        log.info("an info line")
        log.warning("a log warning")
        warnings.warn("a python warning")
    err = capsys.readouterr().err
    assert "warning: a log warning" in err and "warning: a python warning" in err
    assert "an info line" not in err
    with logging_to_stderr(1):                       # -v
        log.info("an info line")
    assert "info: an info line" in capsys.readouterr().err
    with logging_to_stderr(-1):                      # -q: errors only
        log.warning("hidden")
        warnings.warn("hidden too")
        log.error("an error")
    err = capsys.readouterr().err
    assert "hidden" not in err and "error: an error" in err
    # restored afterwards: the package logger's level and no extra handler
    assert logging.getLogger("stvr").level == before and not logging.getLogger("stvr").handlers
