"""Spatio-temporal re-localization on user videos: query clip + box -> tubelets in a reference.

::

    query video [start, end) --decode @24 fps, S x S--> 8-frame clips [Nq, 3, 8, S, S]
        + one box per clip (a box held for the whole span, or a box per second)
        --model.encode_query--> query features [Nq, C, 7, 7]
    reference [start, end) --video.iter_clips, chunk by chunk--> [n, 3, 8, S, S]
        --model.detect_clips(query features, chunk, state)--> per clip [K, 5]
        (the recurrent state, and the previous clip for the flow cell, carried across chunks)
    per-clip detections --stvr.tubes.link_detections--> tubelets (JSON, rendered video)

Memory does not grow with the reference's length except for the per-clip
detections themselves (at most ``det_per_clip`` boxes per clip).

Times are seconds of the video files (frame ``i`` of a video at ``fps`` is shown
at ``i / fps``). The model sees the videos resampled to 24 fps (3 clips of 8 frames
per second); tubelet boxes are given for every frame of the ORIGINAL video at its own
frame rate, interpolated between the clip centres (as :meth:`stvr.tubes.Tube.frame_boxes`).
Boxes are ``[x1, y1, x2, y2]``: normalized to [0, 1] (``"box"``) and in pixels of the
original frame (``"box_pixels"``).

Result layout (:func:`relocalize`, written as JSON by :func:`save_result`)::

    {"query": {"path", "fps", "width", "height", "duration", "start", "end",
               "num_clips", "boxes": [{"clip", "time", "box", "box_pixels"}, ...]},
     "reference": {"path", "fps", "width", "height", "duration", "start", "end",
                   "num_clips"},
     "model_fps": 24, "clip_frames": 8, "clips_per_second": 3,
     "tubelets": [{"rank", "score", "start_time", "end_time", "start_frame", "end_frame",
                   "start_clip", "end_clip", "clip_scores",
                   "frames": [{"time", "frame", "box", "box_pixels"}, ...]}, ...],
     "detections": [[[x1, y1, x2, y2, score], ...] per reference clip]   (optional)}

``end_time`` / ``end_frame`` / ``end_clip`` are exclusive (one past the last);
``start_clip`` / ``end_clip`` count the clips from the reference's ``start``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .guards import check_input_file
from .utils import atomic_write, resolve_device

__all__ = [
    "MODEL_FPS",
    "CLIP_FRAMES",
    "CLIPS_PER_SECOND",
    "parse_box",
    "load_box_file",
    "normalize_boxes",
    "check_span",
    "query_clip_boxes",
    "load_query",
    "relocalize",
    "tubes_to_tubelets",
    "save_result",
    "load_result",
    "render_tubelets",
    "resolve_device",
]

MODEL_FPS = 24
CLIP_FRAMES = 8
CLIPS_PER_SECOND = MODEL_FPS // CLIP_FRAMES
_EPS = 1e-6
#: smallest query box side (pixels of the query frame) that is accepted
MIN_BOX_PIXELS = 2.0
#: short names of the box units accepted on the command line
BOX_UNIT_ALIASES = {"px": "pixels", "norm": "normalized"}
_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null|NaN|-?Infinity)(?:,\s*(?:-?[\d.eE+-]+|null|NaN|-?Infinity))*)\s*\]")

# tab10 in RGB: one colour per tubelet rank
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# --------------------------------------------------------------------------- boxes
def parse_box(text: str | Sequence[float], where: str = "box") -> list[float]:
    """``"x1,y1,x2,y2"`` (or 4 numbers) -> 4 floats; ValueError naming ``where`` otherwise."""
    if isinstance(text, str):
        parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p != ""]
    else:
        parts = list(text)
    if len(parts) != 4:
        raise ValueError(f"{where}: expected 4 numbers x1,y1,x2,y2, got {text!r}")
    try:
        box = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected 4 numbers x1,y1,x2,y2, got {text!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: box {box} has non-finite values")
    return box


def load_box_file(path: str | Path) -> tuple[list[tuple[float, list[float]]], str]:
    """Read query boxes keyed by time from a JSON or CSV file.

    Accepted layouts (times in seconds of the query video, boxes ``x1, y1, x2, y2``,
    normalized or in pixels):

    * JSON list ``[{"time": t, "box": [x1, y1, x2, y2]}, ...]``;
    * JSON object ``{"units": "pixels"|"normalized"|"auto", "boxes": [...as above...]}``;
    * JSON object ``{"<time>": [x1, y1, x2, y2], ...}``;
    * CSV rows ``time,x1,y1,x2,y2`` (an optional header line, ``#`` comments).

    Returns ``(entries sorted by time, units)``; units is ``"auto"`` unless the JSON
    says otherwise. Raises FileNotFoundError / ValueError naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"query box file {p} does not exist")
    units = "auto"
    entries: list[tuple[float, list[float]]] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err})") from None
        if isinstance(data, dict) and "boxes" in data:
            units = str(data.get("units", "auto"))
            data = data["boxes"]
        if isinstance(data, dict):
            items = list(data.items())
            for k, v in items:
                try:
                    t = float(k)
                except ValueError:
                    raise ValueError(f"{p}: key {k!r} is not a time in seconds") from None
                entries.append((t, parse_box(v, f"{p} [time {k}]")))
        elif isinstance(data, list):
            for i, e in enumerate(data):
                if not isinstance(e, dict) or "box" not in e or "time" not in e:
                    raise ValueError(f"{p}: entry {i} must be an object with 'time' and 'box', got {e!r}")
                try:
                    t = float(e["time"])
                except (TypeError, ValueError):
                    raise ValueError(f"{p}: entry {i} has a bad time {e['time']!r}") from None
                entries.append((t, parse_box(e["box"], f"{p} entry {i}")))
        else:
            raise ValueError(f"{p}: expected a list of {{'time', 'box'}} objects or a {{time: box}} object")
    elif p.suffix.lower() in (".csv", ".txt"):
        with p.open(newline="") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                row = [c.strip() for c in row]
                if not row or not any(row) or row[0].startswith("#"):
                    continue
                try:
                    t = float(row[0])
                except ValueError:
                    if lineno == 1:  # header
                        continue
                    raise ValueError(f"{p} line {lineno}: bad time {row[0]!r}") from None
                if len(row) != 5:
                    raise ValueError(f"{p} line {lineno}: expected time,x1,y1,x2,y2, got {len(row)} fields")
                entries.append((t, parse_box(row[1:], f"{p} line {lineno}")))
    else:
        raise ValueError(f"{p}: query boxes must be a .json or .csv file")
    if not entries:
        raise ValueError(f"{p}: no query boxes in this file")
    if not all(math.isfinite(t) for t, _ in entries):
        raise ValueError(f"{p}: non-finite time")
    entries.sort(key=lambda e: e[0])
    return entries, units


def normalize_boxes(boxes: Any, width: int, height: int, units: str = "auto",
                    where: str = "box", tolerance: float = 1e-3,
                    min_pixels: float = MIN_BOX_PIXELS) -> np.ndarray:
    """Check boxes and return them normalized.

    Args:
        boxes: ``[N, 4]`` (or ``[4]``) ``x1, y1, x2, y2``.
        width, height: the frame size in pixels (for pixel boxes).
        units: ``"normalized"``, ``"pixels"`` or ``"auto"`` (pixels when any
            coordinate exceeds 1, else normalized; decided for all boxes together).
        where: what to name in error messages (argument or file).
        tolerance: slack (in normalized units) for boxes touching the border.
        min_pixels: smallest box side in pixels of the frame; a smaller box is
            refused with a message on how the units were decided (a box like
            ``1.2,1.3,1.5,1.9`` meant as normalized is otherwise a sub-pixel box).

    Returns float64 ``[N, 4]`` normalized boxes clipped to [0, 1].
    Raises ValueError when ``x1 >= x2`` or ``y1 >= y2`` or a box lies outside the frame.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    units = BOX_UNIT_ALIASES.get(units, units)
    if units not in ("auto", "normalized", "pixels"):
        raise ValueError(f"{where}: units must be 'auto', 'normalized' (norm) or 'pixels' (px), got {units!r}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: boxes must be finite")
    bad = ~((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3]))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: box {b[i].tolist()} must have x1 < x2 and y1 < y2")
    pixels = units == "pixels" or (units == "auto" and b.max() > 1.0 + _EPS)
    if pixels:
        b = b / np.array([width, height, width, height], dtype=np.float64)
    outside = (b.min(1) < -tolerance) | (b.max(1) > 1.0 + tolerance)
    if outside.any():
        i = int(np.argmax(outside))
        shown = (b[i] * np.array([width, height, width, height])).round(1).tolist() if pixels else b[i].tolist()
        raise ValueError(f"{where}: box {shown} ({'pixels' if pixels else 'normalized'}) lies outside "
                         f"the {width}x{height} frame")
    b = np.clip(b, 0.0, 1.0)
    if np.any((b[:, 2] - b[:, 0] <= 0) | (b[:, 3] - b[:, 1] <= 0)):
        raise ValueError(f"{where}: a box has no area inside the {width}x{height} frame")
    side = np.minimum((b[:, 2] - b[:, 0]) * width, (b[:, 3] - b[:, 1]) * height)
    if np.any(side < min_pixels):
        i = int(np.argmin(side))
        px = (b[i] * np.array([width, height, width, height])).round(2).tolist()
        how = ("read as pixels because a coordinate exceeds 1 (--box-units auto: pixels when any "
               "coordinate exceeds 1, else normalized [0, 1])" if units == "auto" and pixels
               else "read as normalized [0, 1] (--box-units auto: no coordinate exceeds 1)"
               if units == "auto" else f"read as {units} (--box-units {units})")
        raise ValueError(f"{where}: box {np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[i].tolist()} "
                         f"was {how} and is only {px[2] - px[0]:.2f} x {px[3] - px[1]:.2f} pixels of "
                         f"the {width}x{height} frame (smallest allowed: {min_pixels:g} px a side); "
                         f"if the units are wrong, say which with --box-units px or --box-units norm")
    return b


def check_span(start: float | None, end: float | None, duration: float, what: str,
               path: str | Path, min_seconds: float = CLIP_FRAMES / MODEL_FPS) -> tuple[float, float]:
    """Validate a time span ``[start, end)`` of a video of ``duration`` seconds.

    ``None`` means the video's start / end. Raises ValueError naming ``what``
    (e.g. "query") and the file when the span is empty, reversed, outside the
    video or shorter than ``min_seconds`` (one clip).
    """
    s = 0.0 if start is None else float(start)
    e = float(duration) if end is None else float(end)
    if not (math.isfinite(s) and math.isfinite(e)):
        raise ValueError(f"{what} span [{start}, {end}) of {path} must be finite")
    slack = 1e-3
    if s >= duration:
        raise ValueError(f"{what} span starts at {s:g} s, at or after the end of {path} "
                         f"(duration {duration:.3f} s)")
    if s < 0 or e > duration + slack:
        raise ValueError(f"{what} span [{s:g}, {e:g}) s lies outside {path} (duration {duration:.3f} s)")
    if e <= s:
        raise ValueError(f"{what} span of {path}: end ({e:g} s) must be after start ({s:g} s)")
    e = min(e, float(duration))
    if e - s + _EPS < min_seconds:
        raise ValueError(f"{what} span [{s:g}, {e:g}) s of {path} is shorter than one clip "
                         f"({min_seconds:.3f} s = {CLIP_FRAMES} frames at {MODEL_FPS} fps)")
    return s, e


def _num_clips(start: float, end: float) -> int:
    return int(math.floor((end - start) * MODEL_FPS / CLIP_FRAMES + _EPS))


def query_clip_boxes(entries: Sequence[tuple[float, Sequence[float]]], clip_centres: np.ndarray) -> np.ndarray:
    """Box of each clip from boxes keyed by time.

    Each clip takes the box of the latest entry at or before its centre time (the
    box of second ``s`` holds for the clips of ``[s, s + 1)``, as in training);
    clips before the first entry take the first box.

    Args:
        entries: ``(time, normalized box)`` sorted by time.
        clip_centres: ``[N]`` clip centre times (s).
    Returns ``[N, 4]`` float64.
    """
    times = np.array([t for t, _ in entries], dtype=np.float64)
    boxes = np.asarray([b for _, b in entries], dtype=np.float64).reshape(-1, 4)
    idx = np.searchsorted(times, np.asarray(clip_centres, dtype=np.float64) + _EPS, side="right") - 1
    return boxes[np.clip(idx, 0, len(times) - 1)]


def _info_dict(path: Path, info: Any, start: float, end: float) -> dict:
    return {"path": str(path), "fps": float(info.fps), "width": int(info.width),
            "height": int(info.height), "duration": float(info.duration),
            "start": float(start), "end": float(end)}


def check_link_parameters(*, link_iou: float = 0.3, score_threshold: float = 0.0,
                          top_k: int | None = None, max_gap: int = 0, min_length: int = 1,
                          tube_nms_iou: float | None = None) -> None:
    """``ValueError`` (naming the option) for linking parameters that cannot be meant:
    IoUs outside (0, 1], a NaN or out-of-range score threshold (scores lie in [0, 1]),
    negative counts."""
    for name, v in (("--link-iou", link_iou), ("tube_nms_iou", tube_nms_iou)):
        if v is not None and not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    if not (math.isfinite(score_threshold) and 0 <= score_threshold <= 1):
        raise ValueError(f"--score-threshold must be in [0, 1] (scores are probabilities), got {score_threshold}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (0 on the command line: all), got {top_k}")
    if max_gap < 0:
        raise ValueError(f"--max-gap must be >= 0, got {max_gap}")
    if min_length < 1:
        raise ValueError(f"--min-length must be >= 1 clip, got {min_length}")


def load_query(query_path: str | Path, query_boxes: Any, image_size: int, *,
               query_box_time: float | None = None, query_start: float | None = None,
               query_end: float | None = None, box_units: str = "auto") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Decode the query span and attach a box to every clip.

    Args:
        query_path: the query video.
        query_boxes: one box ``[x1, y1, x2, y2]`` (list / ``"x1,y1,x2,y2"``) held for the
            whole span (drawn at ``query_box_time``, which must lie in the span), or a
            JSON/CSV file of boxes per second (:func:`load_box_file`), or a list of
            ``(time, box)`` pairs, or a ``{time: box}`` mapping.
        image_size: the model's input size S.
        query_start, query_end: the span in seconds (default: the whole video).
        box_units: "auto" | "normalized" | "pixels".

    Returns ``(clips [Nq, 3, 8, S, S] float32 in [-1, 1], boxes [Nq, 4] float32
    normalized, info dict)``.
    """
    from .data import video

    path = check_input_file(query_path, "query video")
    info = video.probe(path)
    start, end = check_span(query_start, query_end, info.duration, "query", path)
    n = _num_clips(start, end)
    where = "--query-box"
    if isinstance(query_boxes, Path) or (isinstance(query_boxes, str)
                                         and query_boxes.lower().endswith((".json", ".csv", ".txt"))):
        entries, file_units = load_box_file(query_boxes)
        units = box_units if box_units != "auto" else file_units
        where = str(query_boxes)
    elif isinstance(query_boxes, Mapping):
        entries = sorted((float(t), parse_box(b, f"query box at {t}")) for t, b in query_boxes.items())
        units = box_units
    elif (isinstance(query_boxes, (list, tuple)) and query_boxes
          and isinstance(query_boxes[0], (list, tuple)) and len(query_boxes[0]) == 2):
        entries = sorted((float(t), parse_box(b, f"query box at {t}")) for t, b in query_boxes)
        units = box_units
    else:
        box = parse_box(query_boxes, where)
        t = start if query_box_time is None else float(query_box_time)
        if query_box_time is not None and not (start - _EPS <= t <= end + _EPS):
            raise ValueError(f"--query-box-time {t:g} s lies outside the query span [{start:g}, {end:g}) s of {path}")
        entries, units = [(t, box)], box_units
    if entries[0][0] >= end - _EPS:
        raise ValueError(f"{where}: the first query box (at {entries[0][0]:g} s) comes after the query "
                         f"span [{start:g}, {end:g}) s of {path}")
    norm = normalize_boxes([b for _, b in entries], info.width, info.height, units, where=where)
    entries = [(t, b) for (t, _), b in zip(entries, norm.tolist())]
    centres = start + (np.arange(n) * CLIP_FRAMES + (CLIP_FRAMES - 1) / 2.0) / MODEL_FPS
    boxes = query_clip_boxes(entries, centres)
    frames = video.read_frames(path, start=start, end=start + n * CLIP_FRAMES / MODEL_FPS,
                               fps=MODEL_FPS, size=image_size)
    clips = video.frames_to_clips(np.asarray(frames)[: n * CLIP_FRAMES], clip_frames=CLIP_FRAMES)
    if clips.shape[0] != n:
        raise ValueError(f"{path}: decoded {clips.shape[0]} query clips, expected {n} "
                         f"for [{start:g}, {end:g}) s")
    scale = np.array([info.width, info.height, info.width, info.height], dtype=np.float64)
    qinfo = _info_dict(path, info, start, end)
    qinfo["num_clips"] = n
    qinfo["boxes"] = [{"clip": j, "time": float(start + j * CLIP_FRAMES / MODEL_FPS),
                       "box": boxes[j].round(6).tolist(), "box_pixels": (boxes[j] * scale).round(2).tolist()}
                      for j in range(n)]
    return clips, torch.from_numpy(boxes).float(), qinfo


# --------------------------------------------------------------------------- tubelets
def tubes_to_tubelets(tubes: Sequence[Any], reference: Mapping[str, Any]) -> list[dict]:
    """JSON tubelets of :class:`stvr.tubes.Tube` objects linked over a reference.

    ``reference`` needs ``fps``, ``width``, ``height``, ``start`` (s) and ``duration``;
    tube clip indices count from ``reference["start"]``. Each tubelet covers the
    original frames ``start_frame <= i < end_frame`` whose times ``i / fps`` fall in
    ``[start_time, end_time)``; the box of a frame is interpolated linearly at the
    frame's time between the clip boxes placed at the clip centres (held before the
    first and after the last centre): at a 24 fps reference this is exactly
    :meth:`Tube.frame_boxes`.
    """
    fps = float(reference["fps"])
    w, h = int(reference["width"]), int(reference["height"])
    t0 = float(reference["start"])
    last_frame = int(math.floor(float(reference["duration"]) * fps + _EPS))  # frame count
    scale = np.array([w, h, w, h], dtype=np.float64)
    out = []
    for rank, tube in enumerate(tubes):
        start_time = t0 + tube.start_clip / CLIPS_PER_SECOND
        end_time = t0 + tube.end_clip / CLIPS_PER_SECOND
        f0 = int(math.ceil(start_time * fps - _EPS))
        f1 = min(int(math.ceil(end_time * fps - _EPS)), last_frame)
        frames = np.arange(f0, max(f1, f0), dtype=np.int64)
        times = frames / fps
        pos = (times - t0) * MODEL_FPS - tube.start_clip * CLIP_FRAMES  # 24-fps frame position
        centres = np.arange(tube.num_clips, dtype=np.float64) * CLIP_FRAMES + (CLIP_FRAMES - 1) / 2.0
        boxes = np.stack([np.interp(pos, centres, tube.boxes[:, c]) for c in range(4)], axis=1) \
            if frames.size else np.zeros((0, 4))
        pix = boxes * scale
        out.append({
            "rank": rank,
            "score": float(tube.score),
            "start_time": float(start_time),
            "end_time": float(end_time),
            "start_frame": int(f0),
            "end_frame": int(max(f1, f0)),
            "start_clip": int(tube.start_clip),
            "end_clip": int(tube.end_clip),
            "clip_scores": [float(s) for s in tube.scores],
            "frames": [{"time": float(t), "frame": int(i), "box": b, "box_pixels": p}
                       for t, i, b, p in zip(times.tolist(), frames.tolist(),
                                             boxes.round(6).tolist(), pix.round(2).tolist())],
        })
    return out


@torch.no_grad()
def relocalize(model: torch.nn.Module, query_path: str | Path, query_boxes: Any,
               reference_path: str | Path, query_start: float | None = None,
               query_end: float | None = None, reference_start: float | None = None,
               reference_end: float | None = None, device: str | torch.device | None = "auto",
               progress: bool = True, *, query_box_time: float | None = None,
               box_units: str = "auto", chunk_clips: int = 12, top_k: int | None = 10,
               link_iou: float = 0.3, max_gap: int = 2, min_length: int = 3,
               tube_nms_iou: float | None = 0.5, score_threshold: float = 0.0,
               include_detections: bool = False) -> dict:
    """Find the tubelets of ``reference_path`` that match the query.

    Args:
        model: an :class:`stvr.model.STVRModel` (moved to ``device``, eval mode); clips
            are given to it in the dtype of its parameters.
        query_path, query_boxes, query_start, query_end, query_box_time, box_units:
            see :func:`load_query`.
        reference_path: the reference video; ``reference_start`` / ``reference_end``
            (seconds) restrict the search (default: the whole video).
        device: "auto" (CUDA when available), "cpu", "cuda:0", ...
        progress: tqdm progress bar over reference clips.
        chunk_clips: reference clips decoded and detected per step (bounds memory); rounded up
            to a multiple of ``model.match_clips`` (whose groups a chunk must not split).
        top_k: keep at most this many tubelets (None: all).
        link_iou, max_gap, min_length, tube_nms_iou, score_threshold: the
            :func:`stvr.tubes.link_detections` parameters (min_length in clips).
        include_detections: also return the per-clip detections.

    Returns the result dict described in the module docstring.
    """
    from tqdm import tqdm

    from .data import video
    from .tubes import link_detections

    if chunk_clips < 1:
        raise ValueError(f"chunk_clips must be >= 1, got {chunk_clips}")
    check_link_parameters(link_iou=link_iou, score_threshold=score_threshold, top_k=top_k,
                          max_gap=max_gap, min_length=min_length, tube_nms_iou=tube_nms_iou)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    group = max(1, int(getattr(model.cfg, "match_clips", 1)))
    chunk_clips = -(-int(chunk_clips) // group) * group
    size = int(model.cfg.image_size)
    if int(getattr(model.cfg, "clip_frames", CLIP_FRAMES)) != CLIP_FRAMES:
        raise ValueError(f"the model expects {model.cfg.clip_frames}-frame clips; relocalize uses {CLIP_FRAMES}")
    ref_path = check_input_file(reference_path, "reference video")
    ref_info = video.probe(ref_path)
    r_start, r_end = check_span(reference_start, reference_end, ref_info.duration, "reference", ref_path)
    q_clips, q_boxes, q_info = load_query(query_path, query_boxes, size, query_box_time=query_box_time,
                                          query_start=query_start, query_end=query_end, box_units=box_units)
    dtype = next(model.parameters()).dtype      # float32, or float64 for exact comparisons
    query_features = model.encode_query(q_clips.to(dev, dtype), q_boxes.to(dev, dtype))
    del q_clips

    expected = _num_clips(r_start, r_end)
    detections: list[np.ndarray] = []
    state = None
    bar = tqdm(total=expected, desc="relocalize", unit="clip", disable=not progress, dynamic_ncols=True)
    try:
        for chunk in video.iter_clips(ref_path, start=r_start, end=r_end, fps=MODEL_FPS, size=size,
                                      clip_frames=CLIP_FRAMES, clips_per_chunk=chunk_clips):
            chunk = np.asarray(chunk)
            if chunk.shape[0] == 0:
                continue
            clips = video.frames_to_clips(chunk.reshape(-1, *chunk.shape[2:]), clip_frames=CLIP_FRAMES)
            dets, state = model.detect_clips(query_features, clips.to(dev, dtype), state=state)
            detections.extend(d.detach().cpu().numpy().astype(np.float64) for d in dets)
            bar.update(len(dets))
    finally:
        bar.close()
    if not detections:
        raise ValueError(f"{ref_path}: no clip could be decoded in [{r_start:g}, {r_end:g}) s")

    tubes = link_detections(detections, iou_threshold=link_iou, max_gap=max_gap, min_length=min_length,
                            tube_nms_iou=tube_nms_iou, score_threshold=score_threshold, max_tubes=top_k)
    ref = _info_dict(ref_path, ref_info, r_start, r_end)
    ref["num_clips"] = len(detections)
    result = {
        "query": q_info,
        "reference": ref,
        "model_fps": MODEL_FPS,
        "clip_frames": CLIP_FRAMES,
        "clips_per_second": CLIPS_PER_SECOND,
        "model": {"cell": str(model.cfg.cell), "image_size": size},
        "tubelets": tubes_to_tubelets(tubes, ref),
    }
    result["warnings"] = score_warnings(detections)
    if include_detections:
        result["detections"] = [d.round(6).tolist() for d in detections]
    return result


#: all detection scores within this range of each other count as near-uniform
UNIFORM_SCORE_RANGE = 0.1


def score_warnings(detections: Sequence[np.ndarray]) -> list[str]:
    """A warning when every detection score lies in a narrow band (the model tells
    nothing apart in this reference: no tubelet is more likely than another)."""
    scores = [np.asarray(d, dtype=np.float64).reshape(-1, 5)[:, 4] for d in detections]
    scores = np.concatenate(scores) if scores else np.zeros(0)
    if scores.size < 10:
        return []
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < UNIFORM_SCORE_RANGE:
        return [f"all {scores.size} detection scores lie within {lo:.2f}-{hi:.2f} (near-uniform): "
                f"the model does not single out anything in this reference; the tubelets are "
                f"not meaningful matches"]
    return []


def training_data_warnings(dataset: Mapping[str, Any] | None, reference: Mapping[str, Any]) -> list[str]:
    """Warnings when the reference does not look like the model's training data.

    ``dataset`` is a checkpoint's ``"dataset"`` record (:func:`stvr.checkpoint.dataset_provenance`),
    ``reference`` the result's ``"reference"`` dict. A cheap heuristic: a model trained on
    the synthetic benchmark (square rendered videos of one size) given a reference of
    another size; any model given a reference whose aspect ratio is far from its
    training videos'."""
    if not dataset or not dataset.get("name"):
        return []
    name, v = str(dataset["name"]), dataset.get("video") or None
    w, h = int(reference.get("width", 0)), int(reference.get("height", 0))
    if not (w > 0 and h > 0):
        return []
    where = f" ({dataset.get('root')})" if dataset.get("root") else ""
    if name == "synthetic":
        size = (int(v["width"]), int(v["height"])) if v else None
        if (size is not None and (w, h) != size) or (size is None and w != h):
            shown = f"{size[0]}x{size[1]} " if size else ""
            return [f"this model was trained only on the synthetic benchmark{where}, {shown}rendered "
                    f"videos; the reference {reference.get('path')} ({w}x{h}) does not look like that "
                    f"data, so its matches are unlikely to mean anything (train on data like it)"]
        return []
    if v and v.get("width") and v.get("height"):
        ratio = (w / h) / (float(v["width"]) / float(v["height"]))
        if ratio > 1.5 or ratio < 1 / 1.5:
            return [f"the reference {reference.get('path')} ({w}x{h}) has a very different shape from "
                    f"the {name} videos this model was trained on ({v['width']}x{v['height']})"]
    return []


def save_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a :func:`relocalize` result as JSON (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    # one line per list of numbers (boxes, detections) instead of one line per number
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    atomic_write(p, text + "\n")
    return p


def load_result(path: str | Path) -> dict:
    """Read a tubelets JSON written by :func:`save_result`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tubelets file {p} does not exist")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or "tubelets" not in data:
        raise ValueError(f"{p}: not a tubelets JSON (no 'tubelets')")
    return data


# --------------------------------------------------------------------------- rendering
RENDER_EXTENSIONS = (".mp4", ".mkv", ".mov", ".m4v", ".avi", ".webm")


def _output_codec(path: Path) -> str | None:
    """Encoder for an output container (None: the video module's default, libx264)."""
    ext = path.suffix.lower()
    if ext in (".mp4", ".mov", ".mkv", ".m4v"):
        return None
    if ext == ".avi":
        return "mpeg4"
    if ext == ".webm":
        return "libvpx"
    raise ValueError(f"{path}: unsupported output container {ext!r}; use {', '.join(RENDER_EXTENSIONS)}")


def _draw(frame: np.ndarray, boxes: Iterable[tuple[int, float, np.ndarray]]) -> np.ndarray:
    """Draw ``(rank, score, normalized box)`` on an RGB uint8 frame (in place)."""
    import cv2

    h, w = frame.shape[:2]
    thick = max(1, int(round(min(h, w) / 240)))
    font_scale = max(0.3, min(h, w) / 600)
    for rank, score, box in boxes:
        color = _PALETTE[rank % len(_PALETTE)]
        # the same pixel box as the JSON's box_pixels (normalized x size), clipped to the frame
        px = np.clip(np.asarray(box, dtype=np.float64) * [w, h, w, h], 0, [w - 1, h - 1, w - 1, h - 1])
        x1, y1, x2, y2 = px.round().astype(int).tolist()
        cv2.rectangle(frame, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        label = f"#{rank + 1} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + 2, h - base)
        cv2.rectangle(frame, (x1, ty - th - 1), (x1 + tw + 2, ty + base - 1), color, -1)
        cv2.putText(frame, label, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return frame


def _source_frames(path: Path) -> Iterable[np.ndarray]:
    """The decoded frames of a video one by one, as RGB uint8, without resampling: one
    item per frame of the file (frames whose timestamp does not increase are dropped, as
    :mod:`stvr.data.video` does). Rendering writes one output frame per source frame, so
    a video whose first timestamp is not 0 (or with a gap) keeps its frame count and
    every box lands on its own frame (issue 12: resampling by time gave 271 for 270)."""
    import av

    from .data import video

    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as err:
        raise video.VideoError(f"{path}: not a readable video file ({err})") from None
    try:
        if not container.streams.video:
            raise video.VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = None
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except (StopIteration, av.error.EOFError):
                break
            except (av.error.FFmpegError, OSError) as err:
                raise video.VideoError(f"{path}: decoding failed ({err})") from None
            if frame.pts is not None:
                if last is not None and frame.pts <= last:
                    continue
                last = frame.pts
            yield frame.to_ndarray(format="rgb24")
    finally:
        container.close()


def render_tubelets(reference_path: str | Path, result: Mapping[str, Any], out_path: str | Path, *,
                    top_k: int | None = None, progress: bool = True, crf: int = 20,
                    codec: str | None = None) -> Path:
    """Write the reference video with the tubelets of ``result`` drawn on it.

    The reference is decoded frame by frame at its own size, one output frame per
    source frame (no resampling, :func:`_source_frames`), and re-encoded at its rate with
    :class:`stvr.data.video.VideoWriter`, so the output has the reference's frame
    count and duration. Each tubelet gets a colour (by rank) and a ``#rank score``
    label; its boxes are the tubelets' per-frame normalized ``"box"`` at each frame
    index. Streaming: memory does not depend on the video's length.

    Args:
        reference_path: the reference video.
        result: a :func:`relocalize` result (only ``"tubelets"`` is read).
        out_path: output video; the container follows the extension (.mp4, .mkv,
            .mov: H.264; .avi: MPEG-4; .webm: VP8) unless ``codec`` is given.
        top_k: draw only the first ``top_k`` tubelets.
    Returns the output path.
    """
    from tqdm import tqdm

    from .data import video

    src = check_input_file(reference_path, "reference video")
    info = video.probe(src)
    if not info.fps > 0:
        raise video.VideoError(f"{src}: unknown frame rate, cannot render at the reference's rate")
    out = Path(out_path)
    codec = codec or _output_codec(out)
    tubelets = list(result.get("tubelets", []))[: top_k if top_k is not None else None]
    # frame index -> list of (rank, score, box)
    per_frame: dict[int, list[tuple[int, float, np.ndarray]]] = {}
    for k, tl in enumerate(tubelets):
        rank, score = int(tl.get("rank", k)), float(tl["score"])
        for fr in tl["frames"]:
            per_frame.setdefault(int(fr["frame"]), []).append(
                (rank, score, np.asarray(fr["box"], dtype=np.float64)))
    extra = {"crf": int(crf)} if codec in (None, "libx264") else {}
    bar = tqdm(total=int(info.num_frames) or None, desc="render", unit="frame", disable=not progress,
               dynamic_ncols=True)
    try:
        with video.VideoWriter(out, info.fps, info.width, info.height, codec, **extra) as writer:
            for index, img in enumerate(_source_frames(src)):
                if img.shape[:2] != (info.height, info.width):
                    raise video.VideoError(f"{src}: frame {index} is {img.shape[1]}x{img.shape[0]}, "
                                           f"the stream says {info.width}x{info.height}")
                if index in per_frame:
                    img = _draw(img.copy(), per_frame[index])
                writer.write(img)
                bar.update(1)
    finally:
        bar.close()
    return out
