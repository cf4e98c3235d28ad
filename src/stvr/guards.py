"""Guards of the command line: output paths checked before any work, file modes,
signals.

Rules every ``stvr`` command follows (issue 12):

* an output path that is one of the command's inputs is refused before any work
  (:func:`check_output` compares with ``os.path.samefile`` and resolved paths);
* an output that is a directory, lies under a file, sits in a folder that cannot
  be written, or has an extension the writer does not know is refused up front;
* an existing output is replaced only where the command's help says so
  (``replace=True``) or with ``--force``;
* files written through a temporary file get the user's normal mode
  (``0666 & ~umask``, :func:`apply_default_mode`), not ``mkstemp``'s 0600;
* SIGTERM becomes :class:`Terminated` (a ``KeyboardInterrupt``), so every
  ``finally`` / ``with`` block removes its temporary files on the way out
  (:func:`install_signal_handlers`, called by the CLI entry point).
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "Terminated",
    "check_output",
    "check_distinct",
    "default_file_mode",
    "apply_default_mode",
    "install_signal_handlers",
    "check_input_file",
]

_MODE: int | None = None


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised by the handler of :func:`install_signal_handlers`)."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess test
    raise Terminated(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM raises :class:`Terminated` in the main thread (temporary files are
    then removed by the ``finally`` blocks that created them)."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread / platform without SIGTERM
        pass


def _umask() -> int:
    global _MODE
    if _MODE is None:
        mask = os.umask(0o022)
        os.umask(mask)
        _MODE = mask
    return _MODE


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """``0o777 & ~umask``: the mode ``mkdir`` gives a new folder (``mkdtemp`` gives 0700)."""
    return 0o777 & ~_umask()


def apply_default_mode(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the user's normal file mode."""
    try:
        os.chmod(path, default_file_mode())
    except OSError:
        pass


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: str | os.PathLike, what: str = "--out", *,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                 extensions: Sequence[str] | None = None, replace: bool = True) -> Path:
    """Check an output file path before any work is done; ``ValueError`` otherwise.

    Args:
        path: the output file.
        what: the option that named it (for the message).
        inputs: ``(name, path)`` of every input of the command; ``None`` paths
            are skipped. The output may not be any of them (same file through
            links, relative paths or hard links included).
        extensions: the known extensions (lower case, with the dot), or None.
        replace: whether an existing file may be replaced (else refused,
            naming ``--force``).
    Returns the output path.
    """
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{what}: empty path")
    for name, q in inputs:
        if q is None or str(q) == "":
            continue
        if _same(p, Path(q)):
            raise ValueError(f"{what} {p} is the same file as the input {name} {q}; "
                             f"refusing to overwrite an input: choose another output path")
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory; give a file name")
    if p.exists() or p.is_symlink():
        mode = p.stat().st_mode if p.exists() else 0
        if p.exists() and not stat.S_ISREG(mode):
            raise ValueError(f"{what} {p} exists and is not a regular file")
        if not replace:
            raise ValueError(f"{what} {p} already exists; pass --force to replace it")
    if extensions is not None and p.suffix.lower() not in extensions:
        raise ValueError(f"{what} {p}: unsupported extension {p.suffix or '(none)'!r}; "
                         f"use one of {', '.join(extensions)}")
    check_parent(p, what)
    return p


def check_parent(p: Path, what: str) -> None:
    """The folder of ``p`` exists and is writable, or can be created."""
    parent = p.parent if str(p.parent) else Path(".")
    anc = parent
    while not anc.exists():
        if anc.is_symlink():
            raise ValueError(f"{what} {p}: {anc} is a broken link")
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ValueError(f"{what} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p}: folder {anc} is not writable")


def check_distinct(*outputs: tuple[str, str | os.PathLike | None]) -> None:
    """Two outputs of one command may not be the same file."""
    given = [(n, Path(q)) for n, q in outputs if q is not None]
    for i, (na, a) in enumerate(given):
        for nb, b in given[i + 1:]:
            if _same(a, b):
                raise ValueError(f"{na} and {nb} are the same file ({a}); give them different paths")


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """An existing regular file; otherwise an error that says what the path is
    (missing: ``FileNotFoundError``; a directory, a named pipe, a device: ``ValueError``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    mode = p.stat().st_mode
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {p} is a directory, not a file")
    if stat.S_ISFIFO(mode):
        raise ValueError(f"{what} {p} is a named pipe (FIFO), not a regular file")
    if stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise ValueError(f"{what} {p} is a socket or device, not a regular file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {p} is not a regular file")
    return p
