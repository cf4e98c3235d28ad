"""The clip cache: :class:`ClipCache` keeps the resampled and resized frames of
each video as ``uint8`` ``.npy`` files, memory-mapped when read; see its docstring.
Decoding rules are those of :mod:`stvr.data.decode`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..utils import atomic_open, write_json
from .decode import END_TOLERANCE, TIME_EPS, VideoError, check_video_file, decode_frames, read_frames

__all__ = ["ClipCache"]

log = logging.getLogger(__name__)


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` atomically (temp file + rename, the user's normal file mode)."""
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


_CACHE_VERSION = 1
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.\-]")


class ClipCache:
    """Per-video cache of resampled, resized ``uint8`` frames, memory-mapped.

    Layout: ``<cache_dir>/<video_id>/<S>px-<fps>fps-<key>/`` holds chunk files
    ``chunk_<k>.npy`` (``uint8 [n, S, S, 3]``, the frames of seconds
    ``[k*C, (k+1)*C)``, ``C = chunk_seconds``; shorter for the chunk where the
    video ends) and ``end.json`` (``{"t_end": seconds}``, written once a decode
    reached the end of the video). ``<key>`` hashes the resolved path, file
    size and modification time, ``S``, ``fps``, ``C`` and a format version, so a
    replaced or edited video gets a fresh entry; stale entries of the same video
    and size are deleted when a new one is made.

    Filling: a request decodes (with seeking, :func:`read_frames` rules) only the
    missing chunks it touches, in one pass, and writes each chunk once; later
    requests read the memory-mapped chunks and never decode again. Chunks are
    written to a temp file and moved into place with ``os.replace``, so DataLoader
    workers (or several processes) can share one cache: at worst two of them
    decode the same chunk and write identical files. The object holds no open
    files and pickles to workers.

    Disk use is ``S * S * 3 * fps`` bytes per cached second (1.2 MB at 128 px,
    7.4 MB at 320 px, 24 fps). When the cache cannot be written (a full disk, a
    read-only folder) the object says so once (a logged warning naming the folder,
    the error and the free space) and from then on serves decoded frames from
    memory without writing: slower, but a training run does not fail on it.

    Args:
        cache_dir: folder of the cache (created on demand).
        size: S, frames are ``S x S``.
        fps: frame rate of the cached frames.
        chunk_seconds: seconds per chunk file.
        end_tolerance: as in :func:`read_frames`: seconds past the end of the
            video that repeat its last frame; later ends raise :class:`VideoError`.

    Attributes:
        hits, misses: requests of this process served without / with decoding.
        writable: False once a write failed (this process no longer writes).
    """

    def __init__(self, cache_dir: str | os.PathLike, size: int, fps: int = 24, chunk_seconds: int = 10,
                 end_tolerance: float = END_TOLERANCE):
        if int(size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        if int(fps) < 1 or int(fps) != fps:
            raise ValueError(f"fps must be a positive integer, got {fps}")
        if int(chunk_seconds) < 1:
            raise ValueError(f"chunk_seconds must be >= 1, got {chunk_seconds}")
        self.cache_dir = Path(cache_dir)
        self.size = int(size)
        self.fps = int(fps)
        self.chunk_seconds = int(chunk_seconds)
        self.end_tolerance = float(end_tolerance)
        self.hits = 0
        self.misses = 0
        self.writable = True

    def __repr__(self) -> str:
        return (f"ClipCache({str(self.cache_dir)!r}, size={self.size}, fps={self.fps}, "
                f"chunk_seconds={self.chunk_seconds})")

    def entry_dir(self, video_id: str, path: str | os.PathLike) -> Path:
        """The cache folder of a video in its current state (not created)."""
        p = check_video_file(path)
        return self._entry(video_id, p, p.stat())

    def _entry(self, video_id: str, path: Path, st: os.stat_result) -> Path:
        key_src = "|".join(str(v) for v in (path.resolve(), st.st_size, st.st_mtime_ns, self.size, self.fps,
                                             self.chunk_seconds, _CACHE_VERSION))
        key = hashlib.sha1(key_src.encode("utf-8")).hexdigest()[:16]
        safe = _SAFE_ID.sub("_", str(video_id)) or "video"
        if safe != str(video_id):
            safe += "-" + hashlib.sha1(str(video_id).encode("utf-8")).hexdigest()[:8]
        return self.cache_dir / safe / f"{self.size}px-{self.fps}fps-{key}"

    def _chunk_path(self, d: Path, k: int) -> Path:
        return d / f"chunk_{k:06d}.npy"

    def frames(self, video_id: str, path: str | os.PathLike, start_second: int, end_second: int) -> np.ndarray:
        """``uint8 [(end - start) * fps, S, S, 3]`` RGB frames of seconds ``[start, end)``.

        Args:
            video_id: the video's id (names its cache folder).
            path: the video file.
            start_second, end_second: integer seconds, ``0 <= start < end``.

        Raises:
            FileNotFoundError: missing video; VideoError: unreadable video or a
            range ending more than ``end_tolerance`` after the video's end.
        """
        start, end = _int_second(start_second, "start_second"), _int_second(end_second, "end_second")
        if start < 0 or end <= start:
            raise ValueError(f"need 0 <= start_second < end_second, got [{start}, {end})")
        p = check_video_file(path)
        d = self._entry(video_id, p, p.stat())
        if not d.is_dir():
            self._try_write(self._new_entry, d, p)
        C, fps = self.chunk_seconds, self.fps
        t_end = self._t_end(d)
        chunks = range(start // C, (end - 1) // C + 1)
        missing = [k for k in chunks if not self._chunk_path(d, k).is_file() and (t_end is None or k * C < t_end)]
        held: dict[int, np.ndarray] = {}     # decoded chunks that could not be written
        if missing:
            self.misses += 1
            t_end = self._fill(d, p, missing[0], missing[-1] + 1, t_end, held)
        else:
            self.hits += 1
        parts = []
        for k in chunks:
            cp = self._chunk_path(d, k)
            if k in held:
                arr = held[k]
            elif cp.is_file():
                arr = np.load(cp, mmap_mode="r", allow_pickle=False)
            else:
                break  # past the end of the video
            a = max(start - k * C, 0) * fps
            b = min(end - k * C, C) * fps
            piece = arr[a:b]
            if piece.shape[0]:
                parts.append(piece)
            if arr.shape[0] < C * fps:
                break  # the video ends in this chunk
        n = (end - start) * fps
        out = np.empty((n, self.size, self.size, 3), dtype=np.uint8)
        m = 0
        for piece in parts:
            out[m: m + piece.shape[0]] = piece
            m += piece.shape[0]
        if m < n:
            if t_end is None:
                raise VideoError(f"{p}: cache for {video_id!r} is inconsistent (no end recorded); "
                                 f"delete {d}")
            if end > t_end + self.end_tolerance + TIME_EPS:
                raise VideoError(
                    f"{p}: requested seconds [{start}, {end}) but the video ends at {t_end:.3f} s "
                    f"(more than {self.end_tolerance:g} s before the requested end)"
                )
            out[m:] = out[m - 1] if m else self._last_frame(d, p, t_end)
        return out

    # -- internals

    def _new_entry(self, d: Path, path: Path) -> None:
        parent = d.parent
        parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{self.size}px-{self.fps}fps-"
        for old in parent.glob(prefix + "*"):
            if old.name != d.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)  # stale: the video file changed
        d.mkdir(exist_ok=True)
        meta = d / "meta.json"
        if not meta.is_file():
            st = path.stat()
            write_json(meta, {"path": str(path.resolve()), "file_size": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "size": self.size, "fps": self.fps,
                                "chunk_seconds": self.chunk_seconds, "version": _CACHE_VERSION})

    def _t_end(self, d: Path) -> float | None:
        f = d / "end.json"
        if not f.is_file():
            return None
        try:
            return float(json.loads(f.read_text(encoding="utf-8"))["t_end"])
        except (ValueError, KeyError, TypeError, OSError):
            return None

    def _fill(self, d: Path, path: Path, k0: int, k1: int, t_end: float | None,
              held: dict[int, np.ndarray]) -> float | None:
        """Decode chunks ``[k0, k1)`` in one pass and write them (into ``held`` when they cannot
        be written); returns the known end."""
        C, fps = self.chunk_seconds, self.fps
        info: dict = {}
        gen = decode_frames(path, float(k0 * C), float(k1 * C), float(fps), self.size, pad=False,
                      end_tolerance=math.inf, info=info)
        per = C * fps
        buf = np.empty((per, self.size, self.size, 3), dtype=np.uint8)
        k, m = k0, 0
        for img in gen:
            buf[m] = img
            m += 1
            if m == per:
                self._store(d, k, buf, held)
                k, m = k + 1, 0
        if "t_end" in info:
            t_end = float(info["t_end"])
            if m:
                self._store(d, k, buf[:m], held)
            self._try_write(write_json, d / "end.json", {"t_end": t_end})
        return t_end

    def _store(self, d: Path, k: int, frames: np.ndarray, held: dict[int, np.ndarray]) -> None:
        """Write chunk ``k`` unless it exists; keep a copy in ``held`` when it cannot be written."""
        path = self._chunk_path(d, k)
        if not path.is_file() and not self._try_write(_save_array, path, frames):
            held[k] = frames.copy()

    def _try_write(self, write, *args) -> bool:
        """``write(*args)`` while the cache is writable; on ``OSError`` warn once and stop
        writing (the cache's disk is full or read-only). Returns whether it wrote."""
        if not self.writable:
            return False
        try:
            write(*args)
            return True
        except OSError as error:
            err = error
        self.writable = False
        where = self.cache_dir if self.cache_dir.exists() else self.cache_dir.parent
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        log.warning("clip cache %s cannot be written (%s; %s on its disk): frames are decoded without "
                    "the cache from now on, which is slower; free some space or point data.cache at "
                    "another folder", self.cache_dir, err, free)
        return False

    def _last_frame(self, d: Path, path: Path, t_end: float) -> np.ndarray:
        """The last frame of the video (for requests that start after its end)."""
        C, fps = self.chunk_seconds, self.fps
        k = max(int(math.ceil(t_end - TIME_EPS)) - 1, 0) // C
        cp = self._chunk_path(d, k)
        held: dict[int, np.ndarray] = {}
        if not cp.is_file():
            self._fill(d, path, k, k + 1, t_end, held)
        if k in held or cp.is_file():
            arr = held[k] if k in held else np.load(cp, mmap_mode="r", allow_pickle=False)
            if arr.shape[0]:
                return np.array(arr[-1])
        raise VideoError(f"{path}: no frame before its end at {t_end:.3f} s")


def _int_second(value, name: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer number of seconds, got {value!r}")
