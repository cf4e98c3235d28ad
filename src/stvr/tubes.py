"""Linking per-clip detections into spatio-temporal tubes.

A reference video is cut into 8-frame clips (3 per second at 24 fps); the model
predicts, for every clip, boxes ``[x1, y1, x2, y2]`` (normalized to [0, 1]) with
a query-match score. :func:`link_detections` links them online across
consecutive clips into :class:`Tube` objects, and :func:`tube_iou` /
:func:`tube_iou_matrix` give the spatio-temporal IoU used by video-mAP
(:func:`stvr.evaluation.video_map`).

Clip indices are relative to the first clip of the sequence that was linked
(for a reference: clip 0 is the first clip of second ``reference["start"]``).
A tube covers the clips ``start_clip <= j < end_clip`` (``end_clip`` exclusive,
like the ``end`` of a pair file's reference).

All box arithmetic is float64 numpy: IoU = inter / (area_a + area_b - inter),
0 where the union is empty (two zero-area boxes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Tube",
    "box_iou",
    "iou_broadcast",
    "link_detections",
    "link_ground_truth",
    "tube_iou",
    "tube_iou_matrix",
    "tube_nms",
]


# --------------------------------------------------------------------------- boxes
def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` boxes ``[x1, y1, x2, y2]`` -> ``[N, M]`` float64.

    Computed as ``inter / (area_a + area_b - inter)`` in float64 (same formula as
    ``torchvision.ops.box_iou``); pairs whose union is 0 get IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return iou_broadcast(a[:, None, :], b[None, :, :])


def iou_broadcast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable ``[..., 4]`` float64 box arrays -> ``[...]`` (0 for empty unions)."""
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# --------------------------------------------------------------------------- Tube
@dataclass(eq=False)
class Tube:
    """A predicted (or ground-truth) tube: one box per consecutive clip.

    Attributes:
        start_clip: index of the first clip (relative to the linked sequence).
        boxes: ``[n, 4]`` float64 normalized ``[x1, y1, x2, y2]``, one per clip
            ``start_clip .. end_clip - 1``.
        scores: ``[n]`` float64 per-clip scores (0 for clips bridged by
            interpolation, see :func:`link_detections`).
        detected: ``[n]`` bool, False for clips whose box was interpolated over
            a gap (default: all True).
    """

    start_clip: int
    boxes: np.ndarray
    scores: np.ndarray
    detected: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.start_clip = int(self.start_clip)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        n = self.boxes.shape[0]
        if n == 0:
            raise ValueError("a Tube needs at least one clip")
        if self.scores.shape[0] != n:
            raise ValueError(f"Tube has {n} boxes but {self.scores.shape[0]} scores")
        if self.detected is None:
            self.detected = np.ones(n, dtype=bool)
        else:
            self.detected = np.asarray(self.detected, dtype=bool).reshape(-1)
            if self.detected.shape[0] != n:
                raise ValueError(f"Tube has {n} boxes but {self.detected.shape[0]} detected flags")

    # ---- extent
    @property
    def num_clips(self) -> int:
        """Number of clips covered (including interpolated gap clips)."""
        return int(self.boxes.shape[0])

    def __len__(self) -> int:
        return self.num_clips

    @property
    def end_clip(self) -> int:
        """One past the last clip (exclusive)."""
        return self.start_clip + self.num_clips

    @property
    def score(self) -> float:
        """Tube score: mean of the scores of the detected clips.

        Clips bridged by interpolation (``detected`` False) carry no detection
        and are left out; a tube without any detected clip uses all its scores.
        """
        if self.detected.any():
            return float(self.scores[self.detected].mean())
        return float(self.scores.mean())

    def clip_indices(self) -> np.ndarray:
        """``[n]`` int64 clip indices ``start_clip .. end_clip - 1``."""
        return np.arange(self.start_clip, self.end_clip, dtype=np.int64)

    # ---- time
    def clip_times(self, clips_per_second: int = 3) -> np.ndarray:
        """``[n]`` start time in seconds of each clip (relative to the sequence start)."""
        return self.clip_indices() / float(clips_per_second)

    def time_span(self, clips_per_second: int = 3) -> tuple[float, float]:
        """``(start, end)`` in seconds (end exclusive) relative to the sequence start."""
        return self.start_clip / float(clips_per_second), self.end_clip / float(clips_per_second)

    # ---- frames
    def frame_indices(self, clip_frames: int = 8) -> np.ndarray:
        """``[n * clip_frames]`` frame indices covered (relative to the sequence start)."""
        return np.arange(self.start_clip * clip_frames, self.end_clip * clip_frames, dtype=np.int64)

    def frame_boxes(self, clip_frames: int = 8) -> np.ndarray:
        """Per-frame boxes ``[n * clip_frames, 4]`` by linear interpolation.

        Each clip's box is placed at the clip's temporal centre (frame
        ``j * clip_frames + (clip_frames - 1) / 2`` within the tube); frames
        between two centres are interpolated linearly, frames before the first
        / after the last centre keep the first / last box.
        """
        n = self.num_clips
        frames = np.arange(n * clip_frames, dtype=np.float64)
        centres = np.arange(n, dtype=np.float64) * clip_frames + (clip_frames - 1) / 2.0
        out = np.empty((n * clip_frames, 4), dtype=np.float64)
        for c in range(4):
            out[:, c] = np.interp(frames, centres, self.boxes[:, c])
        return out

    # ---- (de)serialization
    def to_dict(self) -> dict:
        """JSON-ready dictionary (``start_clip``, ``end_clip``, ``score``, ``boxes``, ``scores``, ``detected``)."""
        return {
            "start_clip": self.start_clip,
            "end_clip": self.end_clip,
            "score": self.score,
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "detected": self.detected.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Tube":
        """Inverse of :meth:`to_dict` (``end_clip`` and ``score`` are derived, not read)."""
        return cls(int(d["start_clip"]), d["boxes"], d["scores"], d.get("detected"))


# --------------------------------------------------------------------------- tube IoU
def _dense(tubes: Sequence[Tube], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[R, hi - lo, 4]`` and validity ``[R, hi - lo]`` of tubes on clips ``lo..hi-1``."""
    boxes = np.zeros((len(tubes), hi - lo, 4), dtype=np.float64)
    valid = np.zeros((len(tubes), hi - lo), dtype=bool)
    for r, t in enumerate(tubes):
        boxes[r, t.start_clip - lo : t.end_clip - lo] = t.boxes
        valid[r, t.start_clip - lo : t.end_clip - lo] = True
    return boxes, valid


def _one_to_many(t: Tube, boxes: np.ndarray, valid: np.ndarray, lengths: np.ndarray, lo: int) -> np.ndarray:
    """ST-IoU of tube ``t`` against densely stored tubes (see :func:`_dense`) -> ``[R]``."""
    s = max(t.start_clip, lo)
    e = min(t.end_clip, lo + boxes.shape[1])
    out_sum = np.zeros(boxes.shape[0], dtype=np.float64)
    inter_len = np.zeros(boxes.shape[0], dtype=np.int64)
    if e > s:
        own = t.boxes[s - t.start_clip : e - t.start_clip]  # [n, 4]
        v = valid[:, s - lo : e - lo]  # [R, n]
        iou = iou_broadcast(boxes[:, s - lo : e - lo], own[None])  # [R, n]
        out_sum = np.where(v, iou, 0.0).sum(axis=1)
        inter_len = v.sum(axis=1)
    union_len = t.num_clips + lengths - inter_len
    return out_sum / union_len


def tube_iou(a: Tube, b: Tube) -> float:
    """Spatio-temporal IoU of two tubes.

    ``temporal IoU x mean box IoU over the temporally shared clips``, where the
    temporal IoU is ``|shared clips| / |clips covered by either|``; equal to
    ``sum of box IoUs over shared clips / |union of clips|``. 0 without overlap.

    A clip's box holds for all of its frames (a detection is made per 8-frame
    clip, a ground-truth box per second), so this is exactly the per-frame
    definition (temporal IoU of the frame spans x mean per-frame box IoU over
    the shared frames) with every clip expanded to its frames.
    """
    return float(tube_iou_matrix([a], [b])[0, 0])


def tube_iou_matrix(tubes_a: Sequence[Tube], tubes_b: Sequence[Tube]) -> np.ndarray:
    """Pairwise spatio-temporal IoU (see :func:`tube_iou`) -> ``[len(a), len(b)]`` float64."""
    out = np.zeros((len(tubes_a), len(tubes_b)), dtype=np.float64)
    if len(tubes_a) == 0 or len(tubes_b) == 0:
        return out
    lo = min(t.start_clip for t in tubes_b)
    hi = max(t.end_clip for t in tubes_b)
    boxes, valid = _dense(tubes_b, lo, hi)
    lengths = np.array([t.num_clips for t in tubes_b], dtype=np.int64)
    for i, t in enumerate(tubes_a):
        out[i] = _one_to_many(t, boxes, valid, lengths, lo)
    return out


def tube_nms(tubes: Sequence[Tube], iou_threshold: float = 0.5) -> list[Tube]:
    """Greedy non-maximum suppression of tubes by :func:`tube_iou`.

    Tubes are visited by descending tube score (stable: earlier first on ties);
    a tube is dropped when its ST-IoU with an already kept tube is ``>
    iou_threshold`` (the torchvision ``nms`` convention). Returns the kept tubes
    in descending score order.
    """
    if not tubes:
        return []
    scores = np.array([t.score for t in tubes], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ordered = [tubes[i] for i in order]
    lo = min(t.start_clip for t in ordered)
    hi = max(t.end_clip for t in ordered)
    boxes, valid = _dense(ordered, lo, hi)
    lengths = np.array([t.num_clips for t in ordered], dtype=np.int64)
    alive = np.ones(len(ordered), dtype=bool)
    keep: list[Tube] = []
    for i in range(len(ordered)):
        if not alive[i]:
            continue
        keep.append(ordered[i])
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if rest.size == 0:
            break
        ious = _one_to_many(ordered[i], boxes[rest], valid[rest], lengths[rest], lo)
        alive[rest[ious > iou_threshold]] = False
    return keep


# --------------------------------------------------------------------------- linking
def _as_detections(dets: Any, clip: int) -> np.ndarray:
    """One clip's detections as a ``[K, 5]`` float64 array (``None`` / empty -> ``[0, 5]``)."""
    if dets is None:
        return np.zeros((0, 5), dtype=np.float64)
    if hasattr(dets, "detach"):  # torch.Tensor
        dets = dets.detach().cpu().numpy()
    arr = np.asarray(dets, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 5), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"detections of clip {clip} must have shape [K, 5], got {arr.shape}")
    return arr


class _Track:
    """Mutable state of a tube being linked."""

    __slots__ = ("start", "boxes", "scores", "detected", "last_clip", "prev_box", "prev_clip")

    def __init__(self, clip: int, box: np.ndarray, score: float) -> None:
        self.start = clip
        self.boxes = [box]
        self.scores = [score]
        self.detected = [True]
        self.last_clip = clip
        self.prev_box: np.ndarray | None = None  # the detected box before the last one (velocity)
        self.prev_clip = -1

    def extend(self, clip: int, box: np.ndarray, score: float) -> None:
        gap = clip - self.last_clip - 1
        last = self.boxes[-1]
        for k in range(1, gap + 1):  # linear interpolation over skipped clips
            frac = k / (gap + 1)
            self.boxes.append(last + frac * (box - last))
            self.scores.append(0.0)
            self.detected.append(False)
        self.prev_box, self.prev_clip = last, self.last_clip
        self.boxes.append(box)
        self.scores.append(score)
        self.detected.append(True)
        self.last_clip = clip

    def to_tube(self, offset: int) -> Tube:
        return Tube(self.start + offset, np.stack(self.boxes), np.asarray(self.scores), np.asarray(self.detected))


def link_detections(
    detections_per_clip: Sequence[Any],
    iou_threshold: float = 0.3,
    max_gap: int = 2,
    min_length: int = 3,
    tube_nms_iou: float | None = 0.5,
    score_threshold: float = 0.0,
    max_tubes: int | None = None,
    score_weight: float = 0.5,
    start_clip: int = 0,
    motion: bool = True,
) -> list[Tube]:
    """Link per-clip detections online into tubes.

    Args:
        detections_per_clip: one entry per consecutive clip: ``[K, 5]`` array,
            tensor or list of ``[x1, y1, x2, y2, score]`` (normalized boxes);
            ``None`` or empty for a clip without detections.
        iou_threshold: a detection can extend a tube only when its linking
            IoU with the tube is ``>= iou_threshold``: the IoU with the tube's
            last *detected* box or, with ``motion``, the larger of that and the
            IoU with the box predicted at this clip by constant velocity from the
            tube's last two detected boxes (so fast actors whose consecutive
            boxes barely overlap stay linked).
        max_gap: a tube may skip up to ``max_gap`` clips without a matching
            detection; when it is extended after a gap, the boxes of the skipped
            clips are interpolated linearly between the two detected boxes and
            their scores are 0 (their ``detected`` flag is False). A tube not
            extended for more than ``max_gap`` clips is closed.
        min_length: closed tubes covering fewer clips (gap clips included) are
            dropped.
        tube_nms_iou: ST-IoU threshold of the final :func:`tube_nms`; ``None``
            disables it.
        score_threshold: detections with ``score < score_threshold`` are ignored.
        max_tubes: keep at most this many tubes (highest tube score first).
        score_weight: linking score of a (tube, detection) candidate is
            ``IoU + score_weight * detection score``.
        start_clip: index of the first clip, added to every tube's ``start_clip``.
        motion: use the constant-velocity prediction in the linking IoU (see
            ``iou_threshold``).

    Linking, per clip: the open tubes (those whose last detection is at most
    ``max_gap`` clips back) and the clip's detections form candidate pairs with
    IoU ``>= iou_threshold``; pairs are accepted greedily by descending linking
    score (ties: earlier tube, then earlier detection), each tube and each
    detection at most once. Every unmatched detection starts a new tube. A tube
    never takes two boxes of one clip. IoU weighted this way keeps identities of
    crossing actors: the continuation with the better overlap wins unless the
    other detection's score is much higher.

    Returns:
        tubes sorted by descending tube score (:attr:`Tube.score`, the mean
        score of the detected clips), after ``min_length`` filtering, tube NMS
        and ``max_tubes``. Their boxes are per clip; :meth:`Tube.frame_boxes`
        interpolates them to every frame.

    Raises:
        ValueError: negative ``max_gap``, ``min_length < 1``, detections that
            are not ``[K, 5]``, non-finite values, a box with ``x1 > x2`` or
            ``y1 > y2``.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    if min_length < 1:
        raise ValueError(f"min_length must be >= 1, got {min_length}")
    open_tracks: list[_Track] = []
    created: list[_Track] = []  # every track, in creation order (deterministic tie order)
    for t, raw in enumerate(detections_per_clip):
        dets = _as_detections(raw, t)
        if dets.shape[0]:
            if not np.all(np.isfinite(dets)):
                raise ValueError(f"detections of clip {t} contain non-finite values")
            bad = (dets[:, 0] > dets[:, 2]) | (dets[:, 1] > dets[:, 3])
            if np.any(bad):
                raise ValueError(f"detections of clip {t}: box {dets[np.argmax(bad), :4].tolist()} "
                                 "has x1 > x2 or y1 > y2")
            dets = dets[dets[:, 4] >= score_threshold]
        # close tracks whose gap would exceed max_gap
        open_tracks = [tr for tr in open_tracks if t - tr.last_clip - 1 <= max_gap]
        matched_det = np.zeros(dets.shape[0], dtype=bool)
        if open_tracks and dets.shape[0]:
            last = np.array([tr.boxes[-1] for tr in open_tracks])  # [A, 4], always a detected box
            if motion:  # IoU with the last box and with the constant-velocity prediction, the larger
                prev = np.array([last[a] if tr.prev_box is None else tr.prev_box
                                 for a, tr in enumerate(open_tracks)])
                clips = np.array([(tr.last_clip, tr.prev_clip) for tr in open_tracks], dtype=np.float64)
                step = np.maximum(clips[:, 0] - clips[:, 1], 1.0)
                pred = last + (last - prev) * ((t - clips[:, 0]) / step)[:, None]
                both = iou_broadcast(np.concatenate([last, pred])[:, None, :], dets[None, :, :4])
                iou = np.maximum(both[: len(open_tracks)], both[len(open_tracks) :])  # [A, K]
            else:
                iou = iou_broadcast(last[:, None, :], dets[None, :, :4])  # [A, K]
            ti, di = np.nonzero(iou >= iou_threshold)
            if ti.size:
                link = iou[ti, di] + score_weight * dets[di, 4]
                order = np.argsort(-link, kind="stable")  # nonzero is row-major: ties -> earlier tube, det
                used_track = np.zeros(len(open_tracks), dtype=bool)
                for o in order:
                    a, k = ti[o], di[o]
                    if used_track[a] or matched_det[k]:
                        continue
                    used_track[a] = True
                    matched_det[k] = True
                    open_tracks[a].extend(t, dets[k, :4].copy(), float(dets[k, 4]))
        # unmatched detections start new tubes, in descending score order
        new = np.nonzero(~matched_det)[0]
        if new.size:
            new = new[np.argsort(-dets[new, 4], kind="stable")]
            fresh = [_Track(t, dets[k, :4].copy(), float(dets[k, 4])) for k in new]
            open_tracks.extend(fresh)
            created.extend(fresh)
    tubes = [tr.to_tube(start_clip) for tr in created if tr.last_clip - tr.start + 1 >= min_length]
    if tube_nms_iou is not None:
        tubes = tube_nms(tubes, tube_nms_iou)
    else:
        scores = np.array([tb.score for tb in tubes])
        tubes = [tubes[i] for i in np.argsort(-scores, kind="stable")]
    if max_tubes is not None:
        tubes = tubes[: int(max_tubes)]
    return tubes


def link_ground_truth(
    gt_per_second: Sequence[Any], clips_per_second: int = 3, iou_threshold: float = 0.2
) -> list[Tube]:
    """Ground-truth tubes of a reference from its per-second boxes (a pair file's ``gt``).

    Pair files carry no person identities, so boxes of consecutive seconds are
    linked with :func:`link_detections` (every box scored 1, ``score_weight=0``,
    i.e. greedy by linking IoU with constant-velocity prediction,
    ``iou_threshold`` as given, ``max_gap=0``, ``min_length=1``, no NMS): a
    person absent for a second ends its tube. Each
    second's box is then repeated for its ``clips_per_second`` clips, so tube
    clip ``j`` lies in second ``j // clips_per_second`` (clip 0 = first clip of
    the reference). Scores of the returned tubes are all 1. Ordered by
    (start_clip, order of the box in its first second).
    """
    per_second = []
    for s, boxes in enumerate(gt_per_second):
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
        per_second.append(np.concatenate([b, np.ones((b.shape[0], 1))], axis=1))
    linked = link_detections(
        per_second, iou_threshold=iou_threshold, max_gap=0, min_length=1,
        tube_nms_iou=None, score_threshold=-np.inf, score_weight=0.0,
    )
    linked.sort(key=lambda tb: tb.start_clip)  # stable: keeps creation order among equals
    cps = int(clips_per_second)
    return [
        Tube(tb.start_clip * cps, np.repeat(tb.boxes, cps, axis=0), np.ones(tb.num_clips * cps))
        for tb in linked
    ]
