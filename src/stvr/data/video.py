"""Video decoding, resampling, clips, writing and the clip cache (PyAV).

Time axis
    Time ``0`` is the first presentation timestamp of the video stream
    (``stream.start_time``; the first decoded frame when the container does not
    state it), so second ``t`` of a file is ``[t, t+1)`` s after its first frame,
    as ffmpeg's input-side ``-ss`` counts it.

Resampling by timestamp (not by frame index)
    Output frame ``k`` of a request ``[start, end)`` at ``fps`` lies at
    ``t_k = start + k / fps`` and shows the *latest source frame whose
    timestamp is <= t_k* (timestamps within 1 ms of ``t_k`` count as at it, which
    absorbs container rounding such as Matroska's millisecond timestamps). This
    is what a player shows at ``t_k``; it is correct for any source rate and for
    variable frame rate. A request has ``ceil((end - start) * fps)`` frames.
    Output times before the first frame show the first frame. Frames whose
    timestamp does not increase are dropped (broken muxing); a frame without a
    timestamp is placed one nominal frame period after the previous one.

End of the video
    The video lasts until ``T_end`` = timestamp of its last frame + that frame's
    duration. Output times in ``[T_end, T_end + end_tolerance)`` (default 1 s)
    repeat the last frame (container durations and annotation ranges are often
    rounded up by a fraction of a second); a request whose ``end`` lies more
    than ``end_tolerance`` past ``T_end`` raises :class:`VideoError` naming the
    file and its real length. ``end=None`` reads up to ``T_end``, and raises
    :class:`VideoError` when decoding stops more than ``end_tolerance`` before
    the length the headers state (a truncated or damaged file). A range inside
    the readable part of a damaged file decodes normally.

Range decoding
    A request starting after 0 seeks (``container.seek``, backward, to the
    key frame at or before ``start``) and decodes forward from there; it never
    decodes the whole file. When a seek lands after ``start`` (imprecise
    indexes) it is retried further back, finally from the beginning, so the
    result always equals the same range cut out of a full decode.

Resizing and colour
    Frames are converted to RGB ``uint8`` (grayscale and any other pixel format
    included) and resized to ``S x S`` (or ``(h, w)``) with libswscale in the
    same pass, ``AREA`` when shrinking and ``BILINEAR`` when enlarging; the
    aspect ratio is not preserved, as in the official STVR preprocessing
    (reference-facts.md section 2). Only frames that are shown are converted.

Bad input
    A missing path raises ``FileNotFoundError``; a path that is not a readable
    video (garbage, truncated header, directory), a file without a video
    stream, a stream without frames, or a decoding error in the middle of the
    stream raise :class:`VideoError` (a ``ValueError``) with the file name and
    the problem. Decoding never blocks: every input is a local file read to
    its end at most once per attempt.

Clip cache
    :class:`ClipCache` keeps the resampled and resized frames of each video as
    ``uint8`` ``.npy`` files, memory-mapped when read; see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import av
import numpy as np

if TYPE_CHECKING:  # torch is imported lazily (video writing/decoding does not need it)
    from torch import Tensor

__all__ = [
    "VideoError",
    "VideoInfo",
    "probe",
    "iter_frames",
    "read_frames",
    "iter_clips",
    "frames_to_clips",
    "VideoWriter",
    "write_video",
    "default_codec",
    "ClipCache",
]

#: timestamps within this many seconds of an output time count as at it
TIME_EPS = 1e-3
#: output times up to this many seconds past the end of a video repeat its last frame
END_TOLERANCE = 1.0

Size = Union[None, int, Sequence[int]]


class VideoError(ValueError):
    """A video file that cannot be read: corrupt, truncated, no video stream, no frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` reads from a file's headers.

    Attributes:
        path: the file.
        width, height: frame size in pixels (the coded display size).
        fps: nominal frame rate (average rate of the stream; 0.0 when unknown).
        duration: length in seconds (stream duration, else container duration,
            else ``num_frames / fps``; 0.0 when unknown).
        num_frames: number of frames (header count; estimated as
            ``round(duration * fps)`` when the header lacks it; exact with
            ``probe(path, exact=True)``, which counts packets).
        codec: decoder name (``"h264"``, ``"mpeg4"``, ...).
        pix_fmt: pixel format of the stream (``"yuv420p"``, ``"gray"``, ...).
    """

    path: str
    width: int
    height: int
    fps: float
    duration: float
    num_frames: int
    codec: str
    pix_fmt: str


# ----------------------------------------------------------------------------- opening


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video file {p} does not exist")
    if not p.is_file():
        import stat

        mode = p.stat().st_mode
        what = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a socket or device")
        raise VideoError(f"{p}: is {what}, not a regular file (a video file)")
    return p


def _open(path: Path):
    """``(container, video stream)``; errors become :class:`VideoError`."""
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise FileNotFoundError(f"video file {path} does not exist") from None
    except (av.error.FFmpegError, OSError, EOFError, UnicodeDecodeError) as err:
        raise VideoError(f"{path}: not a readable video file ({_err_text(err)})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _err_text(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return f"{type(err).__name__}: {text}"


def _rate(stream) -> Fraction | None:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r:
            return Fraction(r)
    return None


def probe(path: str | os.PathLike, exact: bool = False) -> VideoInfo:
    """Header information of a video file (no decoding).

    Args:
        path: the file.
        exact: count the packets of the video stream for ``num_frames`` (reads
            the file once, no decoding) instead of trusting the header.

    Raises:
        FileNotFoundError: missing file.
        VideoError: unreadable file, no video stream, or a stream with no frames
            (known from the header, or from counting packets when the header
            states neither a frame count nor a duration).
    """
    p = _check_file(path)
    container, stream = _open(p)
    try:
        rate = _rate(stream)
        fps = float(rate) if rate else 0.0
        duration = 0.0
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = float(container.duration) / av.time_base  # may include other streams
        n = int(stream.frames or 0)
        if exact or n == 0:
            # count packets (exact), or make sure there is at least one when the header has no count
            count = 0
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        count += 1
                        if not exact:
                            break
            except (av.error.FFmpegError, OSError) as err:
                raise VideoError(f"{p}: cannot read packets ({_err_text(err)})") from None
            if count == 0:
                raise VideoError(f"{p}: the video stream has no frames")
            if exact:
                n = count
        if n == 0:
            n = max(int(round(duration * fps)), 1) if fps else 1
        if duration <= 0.0 and fps:
            duration = n / fps
        ctx = stream.codec_context
        return VideoInfo(
            path=str(p),
            width=int(ctx.width),
            height=int(ctx.height),
            fps=fps,
            duration=duration,
            num_frames=n,
            codec=str(ctx.name),
            pix_fmt=str(ctx.pix_fmt or ""),
        )
    finally:
        container.close()


# ----------------------------------------------------------------------------- decoding


def _out_hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = [int(v) for v in size]
        if len(vals) != 2:
            raise ValueError(f"size must be None, an int S or (height, width), got {size!r}")
        h, w = vals
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _num_out(start: float, end: float | None, fps: float) -> int | None:
    if end is None:
        return None
    if not end > start:
        raise ValueError(f"end ({end}) must be greater than start ({start})")
    return int(math.ceil((end - start) * fps - 1e-6))


class _Reseek(Exception):
    """The seek landed after the requested start; retry from further back."""


def _frame_converter(out_hw: tuple[int, int] | None):
    """``av.VideoFrame -> uint8 [H, W, 3]`` RGB (resized to ``out_hw`` when given)."""
    from av.video.reformatter import VideoReformatter

    state: dict = {}
    # one reformatter per decode: it keeps its libswscale context between frames
    # (frame.to_ndarray(format=...) builds a new one per frame, ~10x slower at 128 px)
    reformatter = VideoReformatter()

    def convert(frame) -> np.ndarray:
        if out_hw is None:
            if "hw" not in state:
                state["hw"] = (frame.height, frame.width)
            h, w = state["hw"]
        else:
            h, w = out_hw
        if (frame.height, frame.width) == (h, w):
            out = reformatter.reformat(frame, format="rgb24")
        else:
            interp = "AREA" if (h <= frame.height and w <= frame.width) else "BILINEAR"
            out = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation=interp)
        return np.ascontiguousarray(out.to_ndarray())

    return convert


def _decode_attempt(path: Path, start: float, end: float | None, fps: float, n: int | None,
                    convert, seek_to: float | None, pad: bool, end_tolerance: float,
                    info: dict) -> Iterator[np.ndarray]:
    """One decoding pass (see :func:`iter_frames`); raises :class:`_Reseek` when
    the seek to ``seek_to`` landed after ``start`` before anything was yielded."""
    container, stream = _open(path)
    try:
        tb = stream.time_base or Fraction(1, 1_000_000)
        rate = _rate(stream) or Fraction(fps)
        period = 1.0 / float(rate)
        origin = stream.start_time
        header_len = None  # length the headers state for the video stream
        if stream.duration is not None and stream.duration > 0:
            header_len = float(stream.duration * tb)
        elif container.duration is not None and container.duration > 0 and len(container.streams) == 1:
            header_len = float(container.duration) / av.time_base
        at_file_start = True
        if seek_to is not None and seek_to > 0 and origin is not None:
            try:
                container.seek(int(origin) + int(math.floor(seek_to / float(tb))), stream=stream,
                               backward=True, any_frame=False)
                at_file_start = False
            except (av.error.FFmpegError, OSError):
                container.close()
                container, stream = _open(path)  # not seekable: decode from the start
        k = 0
        cur = None
        cur_img = None
        cur_time = -math.inf
        last_period = period
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except (av.error.FFmpegError, OSError) as err:
                where = f"after {cur_time:.3f} s" if cur is not None else "at its first frame"
                raise VideoError(f"{path}: decoding failed {where} ({_err_text(err)})") from None
            if frame.pts is None:
                t = cur_time + period if cur is not None else 0.0
            else:
                if origin is None:
                    origin = frame.pts
                t = float((frame.pts - origin) * tb)
            if cur is not None and t <= cur_time + 1e-9:
                continue  # non-increasing timestamp
            # output times before this frame show the current frame
            while (n is None or k < n) and start + k / fps + TIME_EPS < t:
                if cur is None:
                    if not at_file_start:
                        raise _Reseek()
                    # before the first frame of the file: show the first frame
                    if cur_img is None:
                        cur_img = convert(frame)
                    yield cur_img
                else:
                    if cur_img is None:
                        cur_img = convert(cur)
                    yield cur_img
                k += 1
            if n is not None and k >= n:
                return
            if cur is not None:
                last_period = t - cur_time
            first_shown_is_this = cur is None and k > 0
            cur, cur_time = frame, t
            if not first_shown_is_this:
                cur_img = None
        # end of stream
        if cur is None:
            if not at_file_start:
                raise _Reseek()
            raise VideoError(f"{path}: the video stream has no frames")
        dur = float(cur.duration * tb) if getattr(cur, "duration", 0) else 0.0
        t_end = cur_time + (dur if dur > 0 else last_period)
        info["t_end"] = t_end
        if n is None and header_len is not None and t_end + end_tolerance < header_len:
            raise VideoError(
                f"{path}: truncated or corrupt: decoding stopped at {t_end:.3f} s but the header "
                f"states {header_len:.3f} s"
            )
        if end is not None and end > t_end + end_tolerance + TIME_EPS:
            raise VideoError(
                f"{path}: requested [{start:g}, {end:g}) s but the video ends at {t_end:.3f} s "
                f"(more than {end_tolerance:g} s before the requested end)"
            )
        while n is None or k < n:
            tk = start + k / fps
            if tk + TIME_EPS >= t_end and (n is None or not pad):
                return
            if cur_img is None:
                cur_img = convert(cur)
            yield cur_img
            k += 1
    finally:
        container.close()


def _decode(path: Path, start: float, end: float | None, fps: float, size: Size, pad: bool = True,
            end_tolerance: float = END_TOLERANCE, info: dict | None = None) -> Iterator[np.ndarray]:
    """Frames of ``[start, end)`` at ``fps`` with seek retries; ``pad=False`` stops at
    the end of the video instead of repeating the last frame (``info["t_end"]`` is
    then set when the end was reached)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    n = _num_out(start, end, fps)
    convert = _frame_converter(_out_hw(size))
    info = {} if info is None else info
    back = 0.0
    while True:
        seek_to = start - back if start - back > 0 else None
        gen = _decode_attempt(path, start, end, fps, n, convert, seek_to, pad, end_tolerance, info)
        try:
            first = next(gen)
        except StopIteration:
            return
        except _Reseek:
            back = 1.0 if back == 0.0 else back * 2
            continue
        yield first
        yield from gen
        return


def iter_frames(path: str | os.PathLike, start: float = 0.0, end: float | None = None, fps: float = 24,
                size: Size = None, end_tolerance: float = END_TOLERANCE) -> Iterator[np.ndarray]:
    """Frames of ``[start, end)`` s one by one, resampled to ``fps`` by timestamp.

    Yields ``uint8 [H, W, 3]`` RGB frames (the same array object is yielded again
    when a source frame is repeated; copy before modifying). See the module
    docstring for the time axis, resampling and end-of-video rules.
    """
    p = _check_file(path)
    return _decode(p, float(start), None if end is None else float(end), float(fps), size,
                   pad=True, end_tolerance=float(end_tolerance))


def read_frames(path: str | os.PathLike, start: float = 0.0, end: float | None = None, fps: float = 24,
                size: Size = None, end_tolerance: float = END_TOLERANCE) -> np.ndarray:
    """Decode ``[start, end)`` seconds of a video, resampled to ``fps`` by timestamp.

    Args:
        path: the video file.
        start: first output time in seconds (>= 0).
        end: end time (exclusive); ``None`` = the end of the video.
        fps: output frame rate (24 in STVR).
        size: ``None`` (native size), ``S`` (``S x S``) or ``(height, width)``.
        end_tolerance: seconds past the end of the video that repeat its last
            frame; a request ending later raises :class:`VideoError`.

    Returns:
        ``uint8 [F, H, W, 3]`` RGB with ``F = ceil((end - start) * fps)`` (or the
        frames up to the video's end when ``end`` is ``None``).

    Raises:
        FileNotFoundError, VideoError, ValueError (bad arguments).
    """
    p = _check_file(path)
    start_f = float(start)
    end_f = None if end is None else float(end)
    n = _num_out(start_f, end_f, float(fps))
    gen = _decode(p, start_f, end_f, float(fps), size, pad=True, end_tolerance=float(end_tolerance))
    if n is None:
        frames = list(gen)
        if not frames:
            raise VideoError(f"{p}: no frame at or after {start_f:g} s")
        return np.stack(frames)
    out = None
    k = 0
    for img in gen:
        if out is None:
            out = np.empty((n, *img.shape), dtype=np.uint8)
        out[k] = img
        k += 1
    if out is None or k != n:
        raise VideoError(f"{p}: decoded {k} of {n} frames of [{start_f:g}, {end_f:g}) s")
    return out


def iter_clips(path: str | os.PathLike, start: float = 0.0, end: float | None = None, fps: float = 24,
               size: Size = 128, clip_frames: int = 8, clips_per_chunk: int = 16,
               end_tolerance: float = END_TOLERANCE) -> Iterator[np.ndarray]:
    """Stream ``[start, end)`` as chunks of clips in bounded memory.

    Yields ``uint8 [n, clip_frames, H, W, 3]`` arrays with ``1 <= n <=
    clips_per_chunk`` (fresh arrays, safe to keep); their concatenation equals
    ``read_frames(...)`` cut into clips, the trailing frames that do not fill a
    clip being dropped (as :func:`frames_to_clips` does). At most one chunk of
    frames is held in memory.

    Raises:
        ValueError: the range is shorter than one clip.
        VideoError: the video (from ``start``) is shorter than one clip, or as
            :func:`read_frames`.
    """
    if clip_frames < 1 or clips_per_chunk < 1:
        raise ValueError("clip_frames and clips_per_chunk must be >= 1")
    p = _check_file(path)
    start_f = float(start)
    end_f = None if end is None else float(end)
    n = _num_out(start_f, end_f, float(fps))
    if n is not None and n < clip_frames:
        raise ValueError(f"[{start_f:g}, {end_f:g}) s at {fps:g} fps has {n} frames, fewer than one "
                         f"clip of {clip_frames}")
    gen = _decode(p, start_f, end_f, float(fps), size, pad=True, end_tolerance=float(end_tolerance))
    per_chunk = clip_frames * clips_per_chunk
    buf = None
    m = 0
    total_clips = 0
    for img in gen:
        if buf is None:
            buf = np.empty((per_chunk, *img.shape), dtype=np.uint8)
        buf[m] = img
        m += 1
        if m == per_chunk:
            yield buf.reshape(clips_per_chunk, clip_frames, *img.shape)
            total_clips += clips_per_chunk
            buf = np.empty_like(buf)
            m = 0
    c = m // clip_frames
    if c and buf is not None:
        total_clips += c
        yield buf[: c * clip_frames].reshape(c, clip_frames, *buf.shape[1:]).copy()
    if total_clips == 0:
        raise VideoError(f"{p}: fewer than {clip_frames} frames from {start_f:g} s at {fps:g} fps")


def frames_to_clips(frames: np.ndarray, clip_frames: int = 8) -> "Tensor":
    """``uint8 [F, S, S, 3]`` -> ``float32 [F // clip_frames, 3, clip_frames, S, S]`` in [-1, 1].

    Value ``v`` maps to ``v / 127.5 - 1``; trailing frames that do not fill a clip
    are dropped. (Works for any ``[F, H, W, 3]``.)
    """
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {a.dtype}")
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    import torch

    n = a.shape[0] // clip_frames
    f = torch.from_numpy(np.ascontiguousarray(a[: n * clip_frames]))
    f = f.reshape(n, clip_frames, *a.shape[1:]).permute(0, 4, 1, 2, 3)
    return f.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


# ----------------------------------------------------------------------------- writing

_DEFAULT_PIX_FMT = {"libx264": "yuv420p", "mpeg4": "yuv420p", "libx264rgb": "rgb24", "ffv1": "bgr0",
                    "mjpeg": "yuvj420p", "libvpx": "yuv420p", "libvpx-vp9": "yuv420p"}


def default_codec() -> str:
    """``"libx264"`` when this PyAV build has it, else ``"mpeg4"``."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _subsampling(pix_fmt: str) -> tuple[int, int]:
    """(x, y) chroma subsampling factors of a pixel format (``yuv420p`` -> (2, 2))."""
    try:
        comps = av.VideoFormat(pix_fmt, 16, 16).components
    except (ValueError, av.error.FFmpegError):
        return 1, 1
    fx = max(16 // max(c.width, 1) for c in comps)
    fy = max(16 // max(c.height, 1) for c in comps)
    return fx, fy


def _as_fps(fps: float | Fraction) -> Fraction:
    if isinstance(fps, Fraction):
        r = fps
    else:
        if not float(fps) > 0 or not math.isfinite(float(fps)):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        r = Fraction(float(fps)).limit_denominator(100_000)
    if r <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return r


#: RGB -> Y'CbCr, BT.601 limited range, as a 3x4 affine matrix (rows Y, Cb, Cr)
_BT601 = np.array([[65.481, 128.553, 24.966, 16.0 * 255.0],
                   [-37.797, -74.203, 112.0, 128.0 * 255.0],
                   [112.0, -93.786, -18.214, 128.0 * 255.0]], dtype=np.float32) / 255.0


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [n, H, W, 3]`` RGB (even H, W) -> ``uint8 [n, 3H/2, W]`` planar yuv420p.

    BT.601 limited range (what libswscale assumes when decoding untagged
    video), chroma = mean of each 2x2 block; the layout is the one
    ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes (Y plane, then
    the U and V planes flattened). Within 1 of libswscale's conversion and
    about 10x faster than its generic RGB24 input path at small sizes (OpenCV).
    """
    import cv2

    n, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {h}x{w}")
    out = np.empty((n, h * w * 3 // 2), dtype=np.uint8)
    q = h * w // 4
    for i in range(n):
        ycc = cv2.transform(rgb[i].astype(np.float32), _BT601)  # [h, w, 3] float
        out[i, : h * w] = np.clip(np.rint(ycc[..., 0]), 0, 255).ravel()
        uv = cv2.resize(ycc[..., 1:], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        uv = np.clip(np.rint(uv), 0, 255).astype(np.uint8)
        out[i, h * w: h * w + q] = uv[..., 0].ravel()
        out[i, h * w + q:] = uv[..., 1].ravel()
    return out.reshape(n, h * 3 // 2, w)


class VideoWriter:
    """Streaming video writer (PyAV), atomic: the file appears at ``path`` on :meth:`close`.

    Frames are ``uint8 [H, W, 3]`` RGB (or ``[H, W]`` gray, stacked to RGB), all of
    the size given at construction. When the pixel format subsamples chroma
    (``yuv420p``: even width and height needed), odd sizes are padded by
    repeating the last column / row, so the file is up to one pixel larger.

    Args:
        path: output file; the container follows the extension (``.mp4``, ``.mkv``...).
        fps: frame rate (time base ``1 / fps``) unless ``times`` are given to :meth:`write`.
        width, height: frame size of the input frames.
        codec: encoder; default :func:`default_codec` (libx264, else mpeg4).
        pix_fmt: encoder pixel format; default per codec (``yuv420p`` for libx264 /
            mpeg4, ``bgr0`` for the lossless ``ffv1``).
        crf: libx264 quality (0 = lossless luma/chroma, 18 = visually lossless).
        preset: libx264 preset.
        gop: key frame interval in frames (default: one per second, cheap seeks).
        deterministic: the same frames give the same encoded stream on every run
            and machine (libx264: one thread and no macroblock-tree lookahead,
            which was seen to make the first encodes of a process differ);
            ``False`` lets libx264 use all cores and its full lookahead.
        variable_rate: timestamps come from :meth:`write` ``times`` (seconds,
            increasing; time base 1/90000) instead of the frame index.
        options: extra encoder options (strings).
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, width: int, height: int,
                 codec: str | None = None, *, pix_fmt: str | None = None, crf: int = 18,
                 preset: str = "veryfast", gop: int | None = None, deterministic: bool = True,
                 variable_rate: bool = False, options: dict | None = None):
        self.path = Path(path)
        self.rate = _as_fps(fps)
        self.width, self.height = int(width), int(height)
        if self.width < 1 or self.height < 1:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.codec = codec or default_codec()
        if self.codec not in av.codecs_available:
            raise ValueError(f"codec {self.codec!r} is not available in this PyAV build")
        self.pix_fmt = pix_fmt or _DEFAULT_PIX_FMT.get(self.codec) or "yuv420p"
        fx, fy = _subsampling(self.pix_fmt)
        self.enc_width = -(-self.width // fx) * fx
        self.enc_height = -(-self.height // fy) * fy
        self.variable_rate = bool(variable_rate)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self.frames_written = 0
        self._last_pts = -1
        try:
            self._container = av.open(str(self._tmp), mode="w", format=_muxer_name(self.path))
            stream = self._container.add_stream(self.codec, rate=self.rate)
            stream.width, stream.height, stream.pix_fmt = self.enc_width, self.enc_height, self.pix_fmt
            if self.variable_rate:
                self.time_base = Fraction(1, 90_000)
                stream.codec_context.time_base = self.time_base
            else:  # PyAV derives 1 / rate itself (setting it explicitly made libx264 non-deterministic)
                self.time_base = 1 / self.rate
            opts = {}
            if self.codec in ("libx264", "libx264rgb"):
                opts.update({"crf": str(int(crf)), "preset": str(preset)})
            elif self.codec == "mpeg4":
                stream.codec_context.qscale = 2  # fixed quantizer 2: near-lossless
            g = int(gop) if gop else max(1, int(round(float(self.rate))))
            stream.codec_context.gop_size = g
            if deterministic:
                stream.codec_context.thread_count = 1
                if self.codec in ("libx264", "libx264rgb"):
                    opts.update({"threads": "1", "x264-params": "mbtree=0"})
            opts.update({str(k): str(v) for k, v in (options or {}).items()})
            stream.options = opts
            self._stream = stream
        except BaseException:
            self._abort()
            raise

    def write(self, frames: np.ndarray, times: Sequence[float] | None = None) -> None:
        """Append frames: ``uint8 [n, H, W, 3]`` RGB, one ``[H, W, 3]`` frame, or gray
        ``[n, H, W]``. ``times`` (seconds, one per frame) only with ``variable_rate=True``."""
        a = np.asarray(frames)
        if a.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {a.dtype}")
        if a.ndim == 3 and a.shape[-1] == 3 and a.shape[:2] == (self.height, self.width):
            a = a[None]
        if a.ndim == 3:  # [n, H, W] gray
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 4 or a.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [n, {self.height}, {self.width}, 3] uint8, got {a.shape}")
        if self.variable_rate:
            if times is None or len(times) != len(a):
                raise ValueError("variable_rate=True needs one time (seconds) per frame")
        elif times is not None:
            raise ValueError("times are only accepted with variable_rate=True")
        ph, pw = self.enc_height - self.height, self.enc_width - self.width
        if ph or pw:
            a = np.pad(a, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        yuv = rgb_to_yuv420p(a) if self.pix_fmt == "yuv420p" else None
        for i in range(a.shape[0]):
            if yuv is not None:
                vf = av.VideoFrame.from_ndarray(yuv[i], format="yuv420p")
            else:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(a[i]), format="rgb24")
            if self.variable_rate:
                pts = int(round(float(times[i]) / float(self.time_base)))
            else:
                pts = self.frames_written
            if pts <= self._last_pts:
                raise ValueError(f"frame times must increase (frame {self.frames_written} at pts {pts})")
            self._last_pts = pts
            vf.pts = pts
            vf.time_base = self.time_base
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder and move the file into place; returns the path."""
        if self._container is None:
            return self.path
        try:
            if self.frames_written == 0:
                raise ValueError(f"{self.path}: no frames written")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
            _user_mode(self._tmp)  # mkstemp made it 0600; outputs get the user's normal mode
            os.replace(self._tmp, self.path)
        except BaseException:
            self._abort()
            raise
        return self.path

    def _abort(self) -> None:
        c = getattr(self, "_container", None)
        self._container = None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - best effort clean-up of a failed write
                pass
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def _muxer_name(path: Path) -> str | None:
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
            ".avi": "avi"}.get(path.suffix.lower())


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str | None = None,
                **kwargs) -> Path:
    """Write ``uint8 [F, H, W, 3]`` RGB frames (or gray ``[F, H, W]``) as a video file.

    Atomic (temp file + ``os.replace``). ``codec`` defaults to libx264
    (``yuv420p``, crf 18, one key frame per second) or mpeg4 when libx264 is
    missing; odd sizes are padded to even for ``yuv420p`` (see
    :class:`VideoWriter`, which also documents the keyword arguments, e.g.
    ``times=`` for variable-frame-rate files, ``deterministic=False`` for multi-threaded
    output).

    Returns:
        The path written.
    """
    a = np.asarray(frames)
    if a.ndim == 3:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] (or gray [F, H, W]), got shape {np.shape(frames)}")
    if a.shape[0] == 0:
        raise ValueError(f"{path}: no frames to write")
    times = kwargs.pop("times", None)
    with VideoWriter(path, fps, a.shape[2], a.shape[1], codec, variable_rate=times is not None,
                     **kwargs) as w:
        w.write(a, times=times)
    return Path(path)


# ----------------------------------------------------------------------------- clip cache

_CACHE_VERSION = 1
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.\-]")


def _user_mode(path: str | os.PathLike) -> None:
    """``0666 & ~umask`` for a file made by ``mkstemp`` (0600)."""
    from ..guards import apply_default_mode

    apply_default_mode(path)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        _user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        _user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    7.4 MB at 320 px, 24 fps).

    Args:
        cache_dir: folder of the cache (created on demand).
        size: S, frames are ``S x S``.
        fps: frame rate of the cached frames.
        chunk_seconds: seconds per chunk file.
        end_tolerance: as in :func:`read_frames`: seconds past the end of the
            video that repeat its last frame; later ends raise :class:`VideoError`.

    Attributes:
        hits, misses: requests of this process served without / with decoding.
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

    def __repr__(self) -> str:
        return (f"ClipCache({str(self.cache_dir)!r}, size={self.size}, fps={self.fps}, "
                f"chunk_seconds={self.chunk_seconds})")

    def entry_dir(self, video_id: str, path: str | os.PathLike) -> Path:
        """The cache folder of a video in its current state (not created)."""
        p = _check_file(path)
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
        p = _check_file(path)
        d = self._entry(video_id, p, p.stat())
        if not d.is_dir():
            self._new_entry(d, p)
        C, fps = self.chunk_seconds, self.fps
        t_end = self._t_end(d)
        chunks = range(start // C, (end - 1) // C + 1)
        missing = [k for k in chunks if not self._chunk_path(d, k).is_file() and (t_end is None or k * C < t_end)]
        if missing:
            self.misses += 1
            t_end = self._fill(d, p, missing[0], missing[-1] + 1, t_end)
        else:
            self.hits += 1
        parts = []
        for k in chunks:
            cp = self._chunk_path(d, k)
            if not cp.is_file():
                break  # past the end of the video
            arr = np.load(cp, mmap_mode="r", allow_pickle=False)
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
            _atomic_json(meta, {"path": str(path.resolve()), "file_size": st.st_size,
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

    def _fill(self, d: Path, path: Path, k0: int, k1: int, t_end: float | None) -> float | None:
        """Decode chunks ``[k0, k1)`` in one pass and write them; returns the known end."""
        C, fps = self.chunk_seconds, self.fps
        info: dict = {}
        gen = _decode(path, float(k0 * C), float(k1 * C), float(fps), self.size, pad=False,
                      end_tolerance=math.inf, info=info)
        per = C * fps
        buf = np.empty((per, self.size, self.size, 3), dtype=np.uint8)
        k, m = k0, 0
        for img in gen:
            buf[m] = img
            m += 1
            if m == per:
                if not self._chunk_path(d, k).is_file():
                    _atomic_save(self._chunk_path(d, k), buf)
                k, m = k + 1, 0
        if "t_end" in info:
            t_end = float(info["t_end"])
            if m and not self._chunk_path(d, k).is_file():
                _atomic_save(self._chunk_path(d, k), buf[:m])
            _atomic_json(d / "end.json", {"t_end": t_end})
        return t_end

    def _last_frame(self, d: Path, path: Path, t_end: float) -> np.ndarray:
        """The last frame of the video (for requests that start after its end)."""
        C, fps = self.chunk_seconds, self.fps
        k = max(int(math.ceil(t_end - TIME_EPS)) - 1, 0) // C
        cp = self._chunk_path(d, k)
        if not cp.is_file():
            self._fill(d, path, k, k + 1, t_end)
        if cp.is_file():
            arr = np.load(cp, mmap_mode="r", allow_pickle=False)
            if arr.shape[0]:
                return np.array(arr[-1])
        raise VideoError(f"{path}: no frame before its end at {t_end:.3f} s")


def _int_second(value, name: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer number of seconds, got {value!r}")
