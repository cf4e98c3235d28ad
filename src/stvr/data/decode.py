"""Video decoding, resampling by timestamp and clips (PyAV).

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

Writing is :mod:`stvr.data.writer`, the clip cache :mod:`stvr.data.clip_cache`.
"""

from __future__ import annotations

import math
import os
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
    "check_video_file",
    "decode_frames",
    "TIME_EPS",
    "END_TOLERANCE",
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


def check_video_file(path: str | os.PathLike) -> Path:
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
    p = check_video_file(path)
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


def decode_frames(path: Path, start: float, end: float | None, fps: float, size: Size, pad: bool = True,
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
    p = check_video_file(path)
    return decode_frames(p, float(start), None if end is None else float(end), float(fps), size,
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
    p = check_video_file(path)
    start_f = float(start)
    end_f = None if end is None else float(end)
    n = _num_out(start_f, end_f, float(fps))
    gen = decode_frames(p, start_f, end_f, float(fps), size, pad=True, end_tolerance=float(end_tolerance))
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
    p = check_video_file(path)
    start_f = float(start)
    end_f = None if end is None else float(end)
    n = _num_out(start_f, end_f, float(fps))
    if n is not None and n < clip_frames:
        raise ValueError(f"[{start_f:g}, {end_f:g}) s at {fps:g} fps has {n} frames, fewer than one "
                         f"clip of {clip_frames}")
    gen = decode_frames(p, start_f, end_f, float(fps), size, pad=True, end_tolerance=float(end_tolerance))
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
