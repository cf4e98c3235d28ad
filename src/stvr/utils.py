"""Small helpers with one home: atomic file writes and device resolution.

Atomic writes go to a uniquely named temp file in the target's folder
(``.<name>.<random>.tmp``) that is moved into place with ``os.replace``, so a
reader (another process, a DataLoader worker) sees either the old file or the
complete new one, never a partial file, and two writers of the same path do
not share a temp file. A failed write removes its temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_open", "atomic_write", "write_json", "resolve_device"]


def _default_mode() -> int:
    from .guards import default_file_mode

    return default_file_mode()


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = False,
                mkdir: bool = True) -> Iterator[IO]:
    """Open a temp file next to ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. ``fsync=True`` flushes the data
    to disk before the rename. ``mkdir`` creates the parent folders.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp's 0600 -> the user's normal mode (umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int | None = None,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as JSON (plus a final newline) atomically; returns the path.

    Without ``indent`` the JSON is compact (no spaces after separators).
    ``default`` is passed to :func:`json.dumps` (e.g. ``str`` for paths).
    """
    text = json.dumps(obj, indent=indent, default=default,
                      separators=None if indent is not None else (",", ":"))
    return atomic_write(path, text + "\n")


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """``"auto"`` / None -> CUDA when available, else CPU; anything else as given
    (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`)."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":  # fail here with one line, not deep in the first .to(device)
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available on this machine; "
                             f"use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    return dev
