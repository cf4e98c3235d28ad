"""Frame-mAP (the official STVR protocol) and video-mAP of linked tubes.

Frame-mAP (:func:`frame_map`, API.md section 4) follows the official
``compute_ap.py`` of fengyang0317/STVR:

1. The label of a pair is its query's combined label; all pairs of one label are
   pooled into one ranking and one ground-truth count.
2. Every ground-truth box of a reference second counts once per clip of that
   second (``clips_per_second`` times).
3. In each clip, detections in descending score order each take the
   ground-truth box of that second with the highest IoU (the first listed box
   on ties; no fall-back to the next best box): true positive when that IoU is
   ``>= iou_threshold`` and the box was not taken before in this clip (it is
   then taken), else false positive. Without ground truth in the second every
   detection is a false positive. IoU = inter / (area_a + area_b - inter) in
   float64 (0 when the union is empty).
4. AP of a label: VOC all-point AP of the pooled ranking (precision made
   non-increasing from the right). Detections with equal scores form one step
   (= false positives ranked first among ties), so the result never depends on
   the order of ties. A label with ground truth and no detection has AP 0.
5. Labels without any ground-truth box are left out of ``AP``, the mean and
   ``num_labels``; ``mAP`` is NaN when no label is left.
6. ``ValueError`` for: a detections list whose length differs from the pairs, a
   pair with fewer clips than ``clips_per_second * len(gt)``, a box with
   ``x1 > x2`` or ``y1 > y2`` (detections and ground truth), a non-finite score
   (and non-finite box coordinates).

Clips beyond ``clips_per_second * len(gt)`` in a pair's detections are ignored
(not validated), as the official code only reads clips ``3 i + j`` of the
reference's seconds.

Implementation (vectorized): all detections are flattened into one
``[N, 5]`` array; each detection's IoUs with its second's ground truth are
computed in one ragged batch, giving its best IoU and (first) argmax box. The
greedy per-clip matching is then resolved without a Python loop: with
detections ordered by (clip, descending score), a detection is a true positive
iff its best IoU is ``>= threshold`` and it is the *first* such detection of its
clip with that argmax box. (If an earlier detection of the clip has the same
argmax box and IoU >= threshold, that box was taken before - by it or by one
before it; otherwise nobody took it, since only such detections take boxes.)
So only the candidates (IoU >= threshold) are sorted, by (argmax box and clip,
descending score), and the first of each group is a true positive. The order
of equal scores inside a clip does not change the number of true positives of
the tie group, so the AP is independent of it. Plain nested lists (a loaded
JSON file) are converted in one pass (``np.fromiter``); 10,000 pairs of 2-5 s
with 10 detections per clip evaluate in about 1-2 s on one CPU core
(``benchmarks/bench_evaluation.py``).

Matching diagnostics (:func:`match_diagnostics`, API.md section 4, "Matching
diagnostics"): with every annotated actor of each reference second
(:func:`load_actors` of a dataset root), the share of actors covered by a
detection (``actor_recall``), the ROC AUC with which the covering detections'
scores rank the pair's ground-truth actors above the other actors
(``match_auc``: 0.5 is a localizer that does not match), and the frame-mAP of
a chance matcher handed every actor's exact box with random scores
(``chance_mAP``: the floor a matcher must clear).

Video-mAP (:func:`video_map`): spatio-temporal tube IoU (:func:`stvr.tubes.tube_iou`)
against ground-truth tubes linked from the per-second boxes
(:func:`stvr.tubes.link_ground_truth`), greedy matching of each pair's tubes in
descending tube score to the *unmatched* ground-truth tube of highest IoU, AP
per label as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data.ava import label_key as _ava_label_key
from .tubes import Tube, iou_broadcast, link_detections, link_ground_truth, tube_iou_matrix

__all__ = [
    "average_precision",
    "frame_map",
    "frame_map_multi",
    "label_key",
    "load_actors",
    "match_diagnostics",
    "roc_auc",
    "video_map",
    "video_map_from_detections",
]

_CHUNK = 1 << 19  # detections per IoU batch (bounds temporary memory)


# --------------------------------------------------------------------------- helpers
def label_key(label: Any) -> str:
    """Dictionary key of a combined label (:func:`stvr.data.ava.label_key`); a string is
    returned unchanged (already a key), a single int is a one-action label."""
    if isinstance(label, str):
        return label
    if isinstance(label, (int, np.integer)):
        return str(int(label))
    return _ava_label_key(label)


def _key_order(key: str) -> tuple:
    parts = key.split("+")
    if all(p.lstrip("-").isdigit() for p in parts):
        return (0, tuple(int(p) for p in parts))
    return (1, key)


def average_precision(scores: Any, tp: Any, num_gt: float) -> float:
    """VOC all-point AP of a ranking with equal scores counted as one step.

    Args:
        scores: ``[n]`` detection scores (any order).
        tp: ``[n]`` bool, True for true positives.
        num_gt: number of ground-truth objects (NaN is returned when <= 0).

    Precision and recall are taken after each group of equal scores (equivalent
    to ranking false positives first among ties), precision is made
    non-increasing from the right, and ``AP = sum (recall step) x precision``.
    No detections and ``num_gt > 0`` gives 0.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp = np.asarray(tp, dtype=bool).reshape(-1)
    if num_gt <= 0:
        return math.nan
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    return _ap_sorted(scores[order], tp[order], float(num_gt))


def _ap_sorted(scores_desc: np.ndarray, tp: np.ndarray, num_gt: float) -> float:
    """AP of a ranking already sorted by descending score (see :func:`average_precision`)."""
    n = scores_desc.shape[0]
    if n == 0:
        return 0.0
    last = np.append(np.nonzero(scores_desc[1:] != scores_desc[:-1])[0], n - 1)  # ends of tie groups
    ctp = np.cumsum(tp, dtype=np.int64)[last].astype(np.float64)
    precision = ctp / (last + 1).astype(np.float64)
    recall = ctp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(recall, prepend=0.0)
    return float(np.sum(steps * precision))


def _result(label_keys: Sequence[str], num_gt: np.ndarray, aps: np.ndarray) -> dict:
    """The public result dictionary; labels without ground truth left out."""
    ap = {k: float(a) for k, n, a in zip(label_keys, num_gt, aps) if n > 0}
    m = float(np.mean(list(ap.values()))) if ap else math.nan
    return {"mAP": m, "AP": ap, "num_labels": len(ap)}


# --------------------------------------------------------------------------- parsing
@dataclass
class _GroundTruth:
    """Flattened ground truth of a list of pairs."""

    label_keys: list[str]  # sorted unique label keys
    pair_label: np.ndarray  # [P] index into label_keys
    n_seconds: np.ndarray  # [P] len(gt)
    sec_offset: np.ndarray  # [P] first global second of each pair
    sec_gt_start: np.ndarray  # [S] first row in boxes of each second
    sec_gt_count: np.ndarray  # [S] number of boxes of each second
    boxes: np.ndarray  # [M, 4] float64

    def seconds_of(self, i: int) -> list[np.ndarray]:
        """Per-second ``[n_s, 4]`` boxes of pair ``i``."""
        s0 = int(self.sec_offset[i])
        return [
            self.boxes[self.sec_gt_start[s] : self.sec_gt_start[s] + self.sec_gt_count[s]]
            for s in range(s0, s0 + int(self.n_seconds[i]))
        ]


def _split_pair(pair: Any, i: int) -> tuple[dict, dict]:
    """(query, reference) of a pair in object form or official ``[query, reference]`` form."""
    try:
        if isinstance(pair, dict):
            return pair["query"], pair["reference"]
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            return pair[0], pair[1]
    except KeyError as err:
        raise ValueError(f"pair {i}: missing key {err}") from None
    raise ValueError(f"pair {i}: expected {{'query', 'reference'}} or [query, reference], got {type(pair).__name__}")


def _check_boxes(boxes: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}: non-finite box coordinate")
    bad = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    if np.any(bad):
        raise ValueError(f"{what}: box {boxes[np.argmax(bad)].tolist()} has x1 > x2 or y1 > y2")


def _parse_pairs(pairs: Sequence[Any]) -> _GroundTruth:
    keys: list[str] = []
    n_seconds = np.zeros(len(pairs), dtype=np.int64)
    counts: list[int] = []
    blocks: list[np.ndarray] = []
    for i, pair in enumerate(pairs):
        query, ref = _split_pair(pair, i)
        try:
            keys.append(label_key(query["label"]))
            gt = ref["gt"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"pair {i}: missing or malformed query label / reference gt ({err})") from None
        if not isinstance(gt, (list, tuple, np.ndarray)):
            raise ValueError(f"pair {i}: reference gt must be a list (one list of boxes per second), "
                             f"got {type(gt).__name__}")
        n_seconds[i] = len(gt)
        for s, sec in enumerate(gt):
            try:
                b = np.asarray(sec, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"pair {i}, second {s}: malformed ground-truth boxes ({err})") from None
            if b.size == 0:
                counts.append(0)
                continue
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"pair {i}, second {s}: ground-truth boxes must be [n, 4], got shape {b.shape}")
            counts.append(b.shape[0])
            blocks.append(b)
    label_keys = sorted(set(keys), key=_key_order)
    index = {k: j for j, k in enumerate(label_keys)}
    sec_gt_count = np.asarray(counts, dtype=np.int64)
    sec_offset = np.cumsum(n_seconds) - n_seconds
    boxes = np.concatenate(blocks) if blocks else np.zeros((0, 4))
    try:
        _check_boxes(boxes, "ground truth")
    except ValueError as err:  # name the pair and second of the first bad box
        bad = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
        sec = int(np.searchsorted(np.cumsum(sec_gt_count), int(np.argmax(bad)), side="right"))
        i = int(np.searchsorted(sec_offset, sec, side="right") - 1)
        while n_seconds[i] == 0:  # skip pairs without seconds that share the offset
            i -= 1
        raise ValueError(f"pair {i}, second {sec - int(sec_offset[i])} {err}") from None
    return _GroundTruth(
        label_keys=label_keys,
        pair_label=np.array([index[k] for k in keys], dtype=np.int64),
        n_seconds=n_seconds,
        sec_offset=sec_offset,
        sec_gt_start=np.cumsum(sec_gt_count) - sec_gt_count,
        sec_gt_count=sec_gt_count,
        boxes=boxes,
    )


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _flatten_nested_lists(detections: Sequence[Any], n_clips: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Fast path of :func:`_flatten_detections` for plain nested lists (a loaded JSON file).

    Returns ``None`` when the input is not ``list`` (pairs) of ``list`` (clips)
    of ``list`` (detections) of 5 numbers, with enough clips per pair; the
    general path then handles it (and reports errors precisely).
    """
    try:
        if not all(type(pd) is list and len(pd) >= need for pd, need in zip(detections, n_clips.tolist())):
            return None
        clips = list(chain.from_iterable(pd[:need] for pd, need in zip(detections, n_clips.tolist())))
        if not all(type(c) is list for c in clips):
            return None
        counts = np.fromiter(map(len, clips), dtype=np.int64, count=len(clips))
        if set(map(len, chain.from_iterable(clips))) - {5}:  # every detection has 5 numbers
            return None
        n = int(counts.sum())
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(clips)), dtype=np.float64, count=5 * n)
    except (TypeError, ValueError):
        return None
    return flat.reshape(n, 5), counts


def _flatten_detections(detections: Sequence[Any], n_clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the first ``n_clips[i]`` clips of every pair -> ``([N, 5], [sum n_clips] counts)``."""
    if len(detections) != len(n_clips):
        raise ValueError(f"detections cover {len(detections)} pairs, the pair list has {len(n_clips)}")
    fast = _flatten_nested_lists(detections, n_clips)
    if fast is not None:
        return fast
    blocks: list[np.ndarray] = []
    counts: list[int] = []
    for i, (pair_dets, need) in enumerate(zip(detections, n_clips.tolist())):
        if pair_dets is None:
            pair_dets = []
        if hasattr(pair_dets, "detach") or (isinstance(pair_dets, np.ndarray) and pair_dets.ndim == 3):
            arr = _as_array(pair_dets)
            if arr.ndim == 3:  # dense [clips, K, 5]
                if arr.shape[0] < need:
                    raise ValueError(f"pair {i} has detections for {arr.shape[0]} clips, needs {need} "
                                     "(clips_per_second * len(gt))")
                if arr.shape[2] != 5:
                    raise ValueError(f"pair {i}: detections must be [x1, y1, x2, y2, score], got shape {arr.shape}")
                blocks.append(arr[:need].reshape(-1, 5))
                counts.extend([arr.shape[1]] * need)
                continue
            pair_dets = list(arr)
        if len(pair_dets) < need:
            raise ValueError(f"pair {i} has detections for {len(pair_dets)} clips, needs {need} "
                             "(clips_per_second * len(gt))")
        for j in range(need):
            clip = pair_dets[j]
            if clip is None:
                counts.append(0)
                continue
            try:
                arr = _as_array(clip)
            except ValueError as err:
                raise ValueError(f"pair {i}, clip {j}: malformed detections ({err})") from None
            if arr.size == 0:
                counts.append(0)
                continue
            if arr.ndim != 2 or arr.shape[1] != 5:
                raise ValueError(f"pair {i}, clip {j}: detections must be [K, 5] rows "
                                 f"[x1, y1, x2, y2, score], got shape {arr.shape}")
            blocks.append(arr)
            counts.append(arr.shape[0])
    dets = np.concatenate(blocks) if blocks else np.zeros((0, 5))
    return dets, np.asarray(counts, dtype=np.int64)


def _locate(row: int, counts: np.ndarray, n_clips: np.ndarray) -> str:
    """``pair i, clip j`` of flattened detection row ``row`` (for error messages)."""
    clip = int(np.searchsorted(np.cumsum(counts), row, side="right"))
    clip_start = np.cumsum(n_clips) - n_clips
    pair = int(np.searchsorted(clip_start, clip, side="right") - 1)
    return f"pair {pair}, clip {clip - int(clip_start[pair])}"


def _validate_detections(dets: np.ndarray, counts: np.ndarray, n_clips: np.ndarray) -> None:
    if dets.shape[0] == 0:
        return
    bad = ~np.isfinite(dets[:, 4])
    if np.any(bad):
        r = int(np.argmax(bad))
        raise ValueError(f"{_locate(r, counts, n_clips)}: non-finite score {dets[r, 4]}")
    bad = ~np.all(np.isfinite(dets[:, :4]), axis=1)
    if np.any(bad):
        r = int(np.argmax(bad))
        raise ValueError(f"{_locate(r, counts, n_clips)}: non-finite box coordinate {dets[r, :4].tolist()}")
    bad = (dets[:, 0] > dets[:, 2]) | (dets[:, 1] > dets[:, 3])
    if np.any(bad):
        r = int(np.argmax(bad))
        raise ValueError(f"{_locate(r, counts, n_clips)}: detection box {dets[r, :4].tolist()} "
                         "has x1 > x2 or y1 > y2")


# --------------------------------------------------------------------------- frame-mAP
@dataclass
class _Matching:
    """Threshold-independent part of frame-mAP: every detection's best ground-truth box."""

    label_keys: list[str]
    num_gt: np.ndarray  # [L] ground-truth count per label (already x clips_per_second)
    det_label: np.ndarray  # [N]
    det_score: np.ndarray  # [N]
    det_iou: np.ndarray  # [N] best IoU (-inf without ground truth)
    det_key: np.ndarray  # [N] (argmax box, clip in second) id, unique per clip; -1 without ground truth


def _checked_detections(pairs: Sequence[Any], detections: Sequence[Any], clips_per_second: int
                        ) -> tuple[int, "_GroundTruth", np.ndarray, np.ndarray, np.ndarray]:
    """Parse the pairs and flatten + validate the detections (the ``ValueError`` cases of
    :func:`frame_map`). Returns ``(cps, gt, n_clips [P], dets [D, 5], counts [sum(n_clips)])``."""
    cps = int(clips_per_second)
    if cps < 1:
        raise ValueError(f"clips_per_second must be >= 1, got {clips_per_second}")
    if len(detections) != len(pairs):
        raise ValueError(f"detections cover {len(detections)} pairs, the pair list has {len(pairs)}")
    gt = _parse_pairs(pairs)
    n_clips = gt.n_seconds * cps
    dets, counts = _flatten_detections(detections, n_clips)
    _validate_detections(dets, counts, n_clips)
    return cps, gt, n_clips, dets, counts


def _match(pairs: Sequence[Any], detections: Sequence[Any], clips_per_second: int) -> _Matching:
    cps, gt, n_clips, dets, counts = _checked_detections(pairs, detections, clips_per_second)

    # ground-truth count per label: every box once per clip of its second
    sec_pair = np.repeat(np.arange(len(pairs)), gt.n_seconds)
    pair_gt = np.bincount(sec_pair, weights=gt.sec_gt_count, minlength=len(pairs))
    num_gt = np.bincount(gt.pair_label, weights=pair_gt * cps, minlength=len(gt.label_keys))

    # clip -> pair, second, clip-in-second
    n_total_clips = int(n_clips.sum())
    clip_pair = np.repeat(np.arange(len(pairs)), n_clips)
    clip_local = np.arange(n_total_clips) - np.repeat(np.cumsum(n_clips) - n_clips, n_clips)
    clip_sec = gt.sec_offset[clip_pair] + clip_local // cps
    clip_in_sec = clip_local % cps

    det_clip = np.repeat(np.arange(n_total_clips), counts)
    n = dets.shape[0]
    det_sec = clip_sec[det_clip]
    det_ng = gt.sec_gt_count[det_sec] if n else np.zeros(0, np.int64)
    det_gs = gt.sec_gt_start[det_sec] if n else np.zeros(0, np.int64)
    det_iou = np.full(n, -np.inf)
    det_g = np.full(n, -1, dtype=np.int64)

    with_gt = np.nonzero(det_ng > 0)[0]
    for c0 in range(0, with_gt.size, _CHUNK):
        idx = with_gt[c0 : c0 + _CHUNK]
        reps = det_ng[idx]
        seg = np.cumsum(reps) - reps
        rep = np.repeat(idx, reps)
        local = np.arange(rep.size) - np.repeat(seg, reps)
        g = det_gs[rep] + local
        iou = iou_broadcast(dets[rep, :4], gt.boxes[g])
        best = np.maximum.reduceat(iou, seg)
        is_best = iou == np.repeat(best, reps)
        first = np.minimum.reduceat(np.where(is_best, local, np.iinfo(np.int64).max), seg)
        det_iou[idx] = best
        det_g[idx] = det_gs[idx] + first

    det_key = np.where(det_g >= 0, det_g * cps + clip_in_sec[det_clip], -1)
    scores = dets[:, 4].copy()
    return _Matching(
        label_keys=gt.label_keys,
        num_gt=num_gt,
        det_label=gt.pair_label[clip_pair[det_clip]] if n else np.zeros(0, np.int64),
        det_score=scores,
        det_iou=det_iou,
        det_key=det_key,
    )


def _true_positives(m: _Matching, iou_threshold: float) -> np.ndarray:
    """``[N]`` bool: the greedy per-clip matching at ``iou_threshold`` (see module docstring).

    A detection is a true positive iff its best IoU is ``>= iou_threshold`` and
    it comes first, in descending score (input order on ties), among such
    detections with the same key (argmax box of the same clip).
    """
    tp = np.zeros(m.det_score.shape[0], dtype=bool)
    cand = np.nonzero(m.det_iou >= iou_threshold)[0]
    if cand.size:
        order = cand[np.lexsort((-m.det_score[cand], m.det_key[cand]))]  # stable: input order on ties
        keys = m.det_key[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        tp[order[first]] = True
    return tp


def _per_label_ap(label_keys: Sequence[str], num_gt: np.ndarray, labels: np.ndarray,
                  scores: np.ndarray, tp: np.ndarray, order: np.ndarray | None = None) -> dict:
    """Result dictionary from pooled detections; ``order`` = ``np.lexsort((-scores, labels))`` if known."""
    if order is None:
        order = np.lexsort((-scores, labels))
    labels_s, scores_s, tp_s = labels[order], scores[order], tp[order]
    bounds = np.searchsorted(labels_s, np.arange(len(label_keys) + 1))
    aps = np.full(len(label_keys), math.nan)
    for k in range(len(label_keys)):
        if num_gt[k] > 0:
            a, b = bounds[k], bounds[k + 1]
            aps[k] = _ap_sorted(scores_s[a:b], tp_s[a:b], float(num_gt[k]))
    return _result(label_keys, num_gt, aps)


def _check_threshold(th: float) -> float:
    th = float(th)
    if not math.isfinite(th):
        raise ValueError(f"IoU threshold must be finite, got {th}")
    return th


def frame_map(pairs: Sequence[Any], detections: Sequence[Any], iou_threshold: float = 0.5,
              clips_per_second: int = 3) -> dict:
    """Frame-mAP of per-clip detections, the official STVR protocol (API.md section 4).

    Args:
        pairs: pairs as loaded from a pair file: ``{"query": {..., "label": [ids]},
            "reference": {..., "gt": [[[x1, y1, x2, y2], ...] per second]}}``
            (the official ``[query, reference]`` list form is accepted too).
        detections: ``detections[i][j]`` = ``[K, 5]`` list / array / tensor of
            ``[x1, y1, x2, y2, score]`` (query-match class) for clip ``j`` of pair
            ``i``'s reference; clip ``j`` lies in second ``j // clips_per_second``.
            A pair needs at least ``clips_per_second * len(gt)`` clips; extra
            clips are ignored. A dense ``[clips, K, 5]`` array per pair is accepted.
        iou_threshold: a detection is a true positive when its IoU >= this.
        clips_per_second: clips per reference second (3 at 24 fps, 8 frames).

    Returns:
        ``{"mAP": float, "AP": {label_key: float}, "num_labels": int}``; labels
        without ground truth are left out; ``mAP`` is NaN when none is left.

    Raises:
        ValueError: see the module docstring (rule 6).
    """
    th = _check_threshold(iou_threshold)
    m = _match(pairs, detections, clips_per_second)
    return _per_label_ap(m.label_keys, m.num_gt, m.det_label, m.det_score, _true_positives(m, th))


def frame_map_multi(pairs: Sequence[Any], detections: Sequence[Any],
                    iou_thresholds: Iterable[float] = (0.3, 0.5, 0.7), clips_per_second: int = 3) -> dict:
    """:func:`frame_map` at several IoU thresholds (IoUs computed once) -> ``{threshold: result}``."""
    ths = [_check_threshold(t) for t in iou_thresholds]
    m = _match(pairs, detections, clips_per_second)
    order = np.lexsort((-m.det_score, m.det_label))
    return {t: _per_label_ap(m.label_keys, m.num_gt, m.det_label, m.det_score, _true_positives(m, t), order)
            for t in ths}


# --------------------------------------------------------------------------- matching diagnostics
POSITIVE_IOU = 0.99  # an annotated actor "is" a ground-truth box of its pair at this IoU


def load_actors(root: str | Path, strict: bool = True,
                splits: Sequence[str] = ("train", "val")) -> dict[tuple[str, int], list[list[float]]]:
    """Every annotated actor of a dataset root, for :func:`match_diagnostics`.

    Reads ``<root>/annotations/<split>.csv`` (AVA format, :func:`stvr.data.ava.read_annotations`)
    for each split that exists and returns ``{(video_id, second): [[x1, y1, x2, y2], ...]}``:
    every distinct (video, second, person) box once, whatever its actions, in
    ascending person id (the first row of a person box wins when two files hold it).

    Raises:
        FileNotFoundError: none of the annotation files exists.
        ValueError: a malformed row (``strict=True``; see ``read_annotations``).
    """
    from .data.ava import read_annotations

    root = Path(root)
    files = [root / "annotations" / f"{s}.csv" for s in splits]
    existing = [f for f in files if f.is_file()]
    if not existing:
        raise FileNotFoundError(f"{root}: no annotation file "
                                f"({', '.join(str(f) for f in files)}): not a dataset root?")
    people: dict[tuple[str, int, int], list[float]] = {}
    for f in existing:
        for row in read_annotations(f, strict=strict):
            people.setdefault((row.video_id, row.second, row.person_id), [float(v) for v in row.box])
    actors: dict[tuple[str, int], list[list[float]]] = {}
    for video_id, second, person in sorted(people):
        actors.setdefault((video_id, second), []).append(people[(video_id, second, person)])
    return actors


def roc_auc(scores: Any, positive: Any) -> float:
    """ROC AUC (Mann-Whitney U) of ``scores`` for the ``positive`` flags; ties count one half.

    NaN when there is no positive or no negative.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv.reshape(-1)]  # 1-based mid-ranks
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (float(n_pos) * float(n_neg)))


def _reference_keys(pairs: Sequence[Any], n_seconds: np.ndarray) -> list[tuple[str, int]]:
    """``(video_id, start + s)`` of every reference second of every pair (global second order)."""
    keys: list[tuple[str, int]] = []
    for i, pair in enumerate(pairs):
        _, ref = _split_pair(pair, i)
        try:
            vid, start = str(ref["id"]), int(ref["start"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"pair {i}: the reference needs an 'id' and an integer 'start' "
                             f"for the matching diagnostics ({err!r})") from None
        keys.extend((vid, start + s) for s in range(int(n_seconds[i])))
    return keys


def _actor_table(actors: Any, keys: Sequence[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actor boxes of each global second -> ``(start [S], count [S], boxes [A, 4])``; each
    distinct key's boxes are converted and validated once."""
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    blocks: list[np.ndarray] = []
    starts = np.zeros(len(keys), dtype=np.int64)
    counts = np.zeros(len(keys), dtype=np.int64)
    total = 0
    for s, key in enumerate(keys):
        entry = seen.get(key)
        if entry is None:
            raw = actors.get(key)
            b = np.zeros((0, 4)) if raw is None or len(raw) == 0 else np.asarray(raw, dtype=np.float64)
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"actors[{key!r}]: expected a list of [x1, y1, x2, y2] boxes, "
                                 f"got shape {b.shape}")
            entry = (total, b.shape[0])
            seen[key] = entry
            blocks.append(b)
            total += b.shape[0]
        starts[s], counts[s] = entry
    boxes = np.concatenate(blocks) if blocks else np.zeros((0, 4))
    bad = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    if np.any(bad):  # name the (video, second) of the first bad box
        row = int(np.argmax(bad))
        key = next(k for k, (a, n) in seen.items() if a <= row < a + n)
        _check_boxes(boxes[row : row + 1], f"actors[{key!r}]")
    return starts, counts, boxes


def _ragged_local(counts: np.ndarray) -> np.ndarray:
    """``[0..c0-1, 0..c1-1, ...]`` for ``counts = [c0, c1, ...]``."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def match_diagnostics(pairs: Sequence[Any], detections: Sequence[Any], actors: Any,
                      iou_threshold: float = 0.5, clips_per_second: int = 3,
                      chance_seeds: int = 3) -> dict:
    """Diagnostics that tell matching from localization (API.md section 4).

    Args:
        pairs, detections, clips_per_second: as for :func:`frame_map` (validated the same way).
        actors: ``actors[(video_id, second)]`` = every annotated actor's box
            ``[x1, y1, x2, y2]`` at that second, whatever its label
            (:func:`load_actors` of a dataset root); a missing key means no actor.
        iou_threshold: a detection covers an actor at IoU >= this.
        chance_seeds: seeds ``0 .. chance_seeds - 1`` of the chance matcher.

    Over every pair, reference clip ``j`` (second ``start + j // clips_per_second``)
    and annotated actor of that second, an *instance*:

    * ``actor_recall``: share of instances covered by a detection of that clip
      (IoU >= ``iou_threshold``); NaN without instances.
    * ``match_auc``: a covered instance's score is the highest score of the
      detections covering it; it is positive when the actor is one of the pair's
      ground-truth boxes of that second (IoU >= 0.99), else negative; the ROC AUC
      of all of them pooled (ties count one half); NaN without positives or negatives.
    * ``chance_mAP``: the mean over seeds of :func:`frame_map` (at ``iou_threshold``)
      of detections that are exactly the instances' actor boxes, in instance order
      (pair, clip, actor), scored ``np.random.default_rng(seed).random(n_instances)``;
      NaN when ``chance_seeds`` is 0.

    Returns:
        ``{"actor_recall": float, "match_auc": float, "chance_mAP": float}``.
    """
    th = _check_threshold(iou_threshold)
    chance_seeds = int(chance_seeds)
    if chance_seeds < 0:
        raise ValueError(f"chance_seeds must be >= 0, got {chance_seeds}")
    cps, gt, n_clips, dets, counts = _checked_detections(pairs, detections, clips_per_second)
    sec_act_start, sec_act_count, act_boxes = _actor_table(actors, _reference_keys(pairs, gt.n_seconds))

    # per (global second, actor): positive when it is one of the second's ground-truth boxes
    sa_sec = np.repeat(np.arange(sec_act_count.size), sec_act_count)
    sa_row = sec_act_start[sa_sec] + _ragged_local(sec_act_count)
    sa_first = np.cumsum(sec_act_count) - sec_act_count        # first (second, actor) of each second
    sa_pos = np.zeros(sa_row.size, dtype=bool)
    reps = gt.sec_gt_count[sa_sec]
    if reps.sum():
        rep = np.repeat(np.arange(sa_row.size), reps)
        g = gt.sec_gt_start[sa_sec[rep]] + _ragged_local(reps)
        iou = iou_broadcast(act_boxes[sa_row[rep]], gt.boxes[g])
        sa_pos[rep[iou >= POSITIVE_IOU]] = True

    # instances (pair, clip, actor), in that order
    n_total_clips = int(n_clips.sum())
    clip_pair = np.repeat(np.arange(len(pairs)), n_clips)
    clip_local = np.arange(n_total_clips) - np.repeat(np.cumsum(n_clips) - n_clips, n_clips)
    clip_sec = gt.sec_offset[clip_pair] + clip_local // cps
    inst_count = sec_act_count[clip_sec] if n_total_clips else np.zeros(0, np.int64)
    inst_first = np.cumsum(inst_count) - inst_count             # first instance of each clip
    inst_sa = np.repeat(sa_first[clip_sec] if n_total_clips else np.zeros(0, np.int64), inst_count) \
        + _ragged_local(inst_count)
    inst_boxes = act_boxes[sa_row[inst_sa]]
    inst_pos = sa_pos[inst_sa]
    n_inst = inst_sa.size

    # coverage: every detection against every instance of its clip (in bounded chunks)
    covered = np.zeros(n_inst, dtype=bool)
    best = np.full(n_inst, -np.inf)
    det_clip = np.repeat(np.arange(n_total_clips), counts)
    det_reps = inst_count[det_clip] if det_clip.size else np.zeros(0, np.int64)
    ends = np.cumsum(det_reps)
    lo = 0
    while lo < det_reps.size:
        hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + _CHUNK, side="right")))
        r = det_reps[lo:hi]
        if r.sum():
            d = np.repeat(np.arange(lo, hi), r)
            inst = inst_first[det_clip[d]] + _ragged_local(r)
            cov = iou_broadcast(dets[d, :4], inst_boxes[inst]) >= th
            covered[inst[cov]] = True
            np.maximum.at(best, inst[cov], dets[d[cov], 4])
        lo = hi

    actor_recall = float(covered.mean()) if n_inst else math.nan
    match_auc = roc_auc(best[covered], inst_pos[covered])

    # chance matcher: the actors' exact boxes with uniform random scores
    chance = math.nan
    if chance_seeds > 0:
        inst_dets = np.concatenate([inst_boxes, np.zeros((n_inst, 1))], axis=1)
        per_clip = np.split(inst_dets, inst_first[1:]) if n_total_clips else []
        clip_start = (np.cumsum(n_clips) - n_clips).tolist()
        chance_dets = [per_clip[c0 : c0 + n] for c0, n in zip(clip_start, n_clips.tolist())]
        m = _match(pairs, chance_dets, cps)
        order_free = []
        for seed in range(chance_seeds):
            m.det_score = np.random.default_rng(seed).random(n_inst)
            order_free.append(_per_label_ap(m.label_keys, m.num_gt, m.det_label, m.det_score,
                                            _true_positives(m, th))["mAP"])
        chance = float(np.mean(order_free))
    return {"actor_recall": actor_recall, "match_auc": match_auc, "chance_mAP": chance}


# --------------------------------------------------------------------------- video-mAP
def _as_tube(t: Any) -> Tube:
    return t if isinstance(t, Tube) else Tube.from_dict(t)


def _greedy_tube_match(iou: np.ndarray, th: float) -> np.ndarray:
    """``iou [P, G]`` with rows in descending tube score -> ``[P]`` true positives.

    Each tube takes the unmatched ground-truth tube of highest IoU (first on
    ties); true positive when that IoU >= ``th`` (the ground-truth tube is then
    matched).
    """
    n_pred, n_gt = iou.shape
    tp = np.zeros(n_pred, dtype=bool)
    if n_gt == 0 or n_pred == 0 or not np.any(iou >= th):
        return tp
    matched = np.zeros(n_gt, dtype=bool)
    for p in range(n_pred):
        row = np.where(matched, -np.inf, iou[p])
        g = int(np.argmax(row))
        if row[g] >= th:
            tp[p] = True
            matched[g] = True
            if matched.all():
                break
    return tp


def video_map(pairs: Sequence[Any], tubes: Sequence[Sequence[Any]],
              iou_thresholds: Iterable[float] = (0.2, 0.5), clips_per_second: int = 3,
              gt_link_iou: float = 0.2) -> dict:
    """Video-mAP of predicted tubes -> ``{threshold: {"mAP", "AP", "num_labels"}}``.

    Args:
        pairs: as for :func:`frame_map`.
        tubes: ``tubes[i]`` = list of :class:`stvr.tubes.Tube` (or their
            ``to_dict()``) predicted for pair ``i``'s reference, clip indices
            relative to the reference's first clip.
        iou_thresholds: spatio-temporal IoU thresholds.
        clips_per_second: clips per reference second.
        gt_link_iou: IoU threshold linking ground-truth boxes of consecutive
            seconds into ground-truth tubes (:func:`stvr.tubes.link_ground_truth`;
            pair files carry no person identities).

    Protocol: ST-IoU = temporal IoU x mean per-clip box IoU over the temporal
    intersection (:func:`stvr.tubes.tube_iou`). Within a pair, tubes in
    descending tube score (input order on ties) each take the unmatched
    ground-truth tube of highest ST-IoU; true positive when it is
    ``>= threshold``. Tubes are pooled per label (the query's label), AP as in
    :func:`frame_map` with the number of ground-truth tubes; labels without
    ground truth left out, mAP NaN when none is left.

    Raises:
        ValueError: ``len(tubes) != len(pairs)``, a non-finite tube score, and
            the ground-truth errors of :func:`frame_map`.
    """
    ths = [_check_threshold(t) for t in iou_thresholds]
    if len(tubes) != len(pairs):
        raise ValueError(f"tubes cover {len(tubes)} pairs, the pair list has {len(pairs)}")
    gt = _parse_pairs(pairs)
    n_labels = len(gt.label_keys)
    num_gt = np.zeros(n_labels, dtype=np.int64)
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    tps: dict[float, list[np.ndarray]] = {t: [] for t in ths}
    for i in range(len(pairs)):
        gt_tubes = link_ground_truth(gt.seconds_of(i), clips_per_second, gt_link_iou)
        num_gt[gt.pair_label[i]] += len(gt_tubes)
        preds = [_as_tube(t) for t in (tubes[i] or [])]
        if not preds:
            continue
        s = np.array([t.score for t in preds], dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"pair {i}: non-finite tube score")
        order = np.argsort(-s, kind="stable")
        iou = tube_iou_matrix([preds[k] for k in order], gt_tubes)
        labels.append(np.full(len(preds), gt.pair_label[i], dtype=np.int64))
        scores.append(s[order])
        for t in ths:
            tps[t].append(_greedy_tube_match(iou, t))
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    sc = np.concatenate(scores) if scores else np.zeros(0)
    return {t: _per_label_ap(gt.label_keys, num_gt, lab, sc,
                             np.concatenate(tps[t]) if tps[t] else np.zeros(0, bool))
            for t in ths}


def video_map_from_detections(pairs: Sequence[Any], detections: Sequence[Any],
                              iou_thresholds: Iterable[float] = (0.2, 0.5), clips_per_second: int = 3,
                              gt_link_iou: float = 0.2, progress: bool = False, **link_kwargs: Any) -> dict:
    """Link each pair's per-clip detections (:func:`stvr.tubes.link_detections`, ``link_kwargs``) and run :func:`video_map`.

    Detections are validated exactly as in :func:`frame_map` (the same
    ``ValueError`` cases); only the first ``clips_per_second * len(gt)`` clips
    of each pair are linked.
    """
    cps, gt, n_clips, dets, counts = _checked_detections(pairs, detections, clips_per_second)
    per_clip = np.split(dets, np.cumsum(counts)[:-1]) if counts.size else []
    clip_start = np.cumsum(n_clips) - n_clips
    iterator: Iterable[int] = range(len(pairs))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="linking", unit="pair")
    tubes = [link_detections(per_clip[clip_start[i] : clip_start[i] + n_clips[i]], **link_kwargs)
             for i in iterator]
    return video_map(pairs, tubes, iou_thresholds, cps, gt_link_iou)
