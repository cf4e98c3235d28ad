"""Video decoding, writing and the clip cache: the names of :mod:`stvr.data.decode`
(decoding, resampling by timestamp, clips), :mod:`stvr.data.writer` (``VideoWriter``,
``write_video``) and :mod:`stvr.data.clip_cache` (``ClipCache``) in one place, as
before they were split. See :mod:`stvr.data.decode` for the time axis, resampling
and error rules.
"""

from __future__ import annotations

from .clip_cache import ClipCache
from .decode import (END_TOLERANCE, TIME_EPS, VideoError, VideoInfo, frames_to_clips, iter_clips, iter_frames,
                     probe, read_frames)
from .writer import VideoWriter, default_codec, rgb_to_yuv420p, write_video

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
