"""Detections for every pair of a pair file (the input of ``stvr evaluate``).

Output format (API.md section 4): ``detections[i][j]`` is the list of
``[x1, y1, x2, y2, score]`` (normalized boxes, score = query-match
probability, descending) of clip ``j`` of pair ``i``'s reference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

Detections = list[list[list[list[float]]]]


class _Positioned(Dataset):
    """``dataset`` restricted to ``indices``; item ``k`` -> ``(k, dataset[indices[k]])``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return k, self.dataset[self.indices[k]]


def _collate_positioned(items):
    from .data.dataset import collate_pairs

    kept = [(k, s) for k, s in items if s is not None]
    batch = collate_pairs([s for _, s in kept]) if kept else None
    return [k for k, _ in kept], batch, len(items) - len(kept)


def _empty_clips(dataset: Dataset, index: int, clips_per_second: int) -> list[list]:
    """Per-clip empty detection lists for a pair that could not be loaded."""
    pairs = getattr(dataset, "pairs", None)
    if pairs is None:
        return []
    pair = pairs[index]
    ref = pair["reference"] if isinstance(pair, dict) else pair[1]
    return [[] for _ in range(clips_per_second * len(ref["gt"]))]


@torch.no_grad()
def predict_pairs(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
                  batch_size: int = 1, num_workers: int = 0, progress: bool = True,
                  indices: Sequence[int] | None = None,
                  failed: list[int] | None = None) -> Detections:
    """Run ``model`` (eval mode) over an :class:`~stvr.data.dataset.EvalPairDataset`.

    Args:
        model: an :class:`stvr.model.STVRModel` (its train/eval mode is restored after).
        dataset: items are :class:`~stvr.data.dataset.PairSample` or ``None``
            (a pair whose video failed to load).
        device: where the model runs.
        batch_size: pairs per forward (references padded and masked).
        num_workers: DataLoader worker processes.
        progress: tqdm progress bar.
        indices: predict only these dataset items (default: all), in this order.
        failed: if given, the dataset indices of pairs that could not be loaded
            are appended to it.

    Returns one entry per predicted pair (dataset order, or ``indices`` order),
    one list per real reference clip of ``[x1, y1, x2, y2, score]`` rows. A pair
    that failed to load gets ``3 * len(gt)`` empty clips when the dataset has
    ``pairs`` (so evaluation counts its ground truth as missed), else ``[]``;
    failures are counted and logged, never silently dropped.
    """
    from tqdm import tqdm

    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
    cps = int(getattr(dataset, "clips_per_second", 3))
    was_training = model.training
    model.eval()
    loader = DataLoader(_Positioned(dataset, idx), batch_size=batch_size, shuffle=False,
                        collate_fn=_collate_positioned, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    out: list[Any] = [None] * len(idx)
    n_failed = 0
    try:
        for positions, batch, n_bad in tqdm(loader, desc="predict", disable=not progress,
                                            dynamic_ncols=True, unit="batch"):
            n_failed += n_bad
            if batch is None:
                continue
            dets = model(batch.to(device))
            for k, per_clip in zip(positions, dets):
                out[k] = [d.detach().cpu().tolist() for d in per_clip]
    finally:
        model.train(was_training)
    bad = [idx[k] for k, v in enumerate(out) if v is None]
    for k, v in enumerate(out):
        if v is None:
            out[k] = _empty_clips(dataset, idx[k], cps)
    if bad:
        log.warning("predict_pairs: %d of %d pair(s) could not be loaded and have no "
                    "detections (dataset indices %s%s)", len(bad), len(idx), bad[:10],
                    "..." if len(bad) > 10 else "")
        if failed is not None:
            failed.extend(bad)
    return out


def save_detections(detections: Detections, path: str | Path) -> None:
    """Write detections as JSON (floats rounded to 6 decimals); creates the parent folder. The
    file is replaced atomically: an older file at ``path`` stays whole until the new one is."""
    from .utils import atomic_write

    rounded = [[[[round(float(v), 6) for v in det] for det in clip] for clip in pair]
               for pair in detections]
    atomic_write(path, json.dumps(rounded))


def load_detections(path: str | Path) -> Detections:
    """Read a detections JSON written by :func:`save_detections`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"detections file {p} does not exist")
    try:
        dets = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
    if not isinstance(dets, list):
        raise ValueError(f"{p}: expected a list of pairs (per pair a list of clips), "
                         f"got {type(dets).__name__}")
    return dets


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def evaluate_detections(pairs: Sequence[Any], detections: Sequence[Any],
                        frame_ious: Sequence[float] = (0.3, 0.5, 0.7),
                        video_ious: Sequence[float] | None = (0.2, 0.5),
                        clips_per_second: int = 3, actors: dict | None = None) -> dict[str, Any]:
    """Frame-mAP (official protocol, :func:`stvr.evaluation.frame_map_multi`) and, unless
    ``video_ious`` is None, video-mAP of linked tubes
    (:func:`stvr.evaluation.video_map_from_detections`, default linking).

    Returns JSON-ready ``{"frame_mAP": {"0.5": m, ...}, "frame_AP@0.5": {label: ap},
    "video_mAP": {"0.2": m, ...}, "num_labels": n, "num_pairs": n}``; NaN becomes None.
    With ``actors`` (:func:`stvr.evaluation.load_actors`), also ``"diagnostics":
    {"actor_recall", "match_auc", "chance_mAP"}`` (:func:`stvr.evaluation.match_diagnostics`
    at IoU 0.5).
    """
    from .evaluation import frame_map_multi, video_map_from_detections

    fm = frame_map_multi(pairs, detections, tuple(frame_ious), clips_per_second)
    out: dict[str, Any] = {
        "frame_mAP": {str(t): _finite_or_none(r["mAP"]) for t, r in fm.items()},
        "num_labels": int(next(iter(fm.values()))["num_labels"]) if fm else 0,
        "num_pairs": len(pairs),
    }
    if 0.5 in fm:
        out["frame_AP@0.5"] = {k: _finite_or_none(v) for k, v in fm[0.5]["AP"].items()}
    if video_ious:
        vm = video_map_from_detections(pairs, detections, tuple(video_ious), clips_per_second)
        out["video_mAP"] = {str(t): _finite_or_none(r["mAP"]) for t, r in vm.items()}
    if actors is not None:
        from .evaluation import match_diagnostics

        diag = match_diagnostics(pairs, detections, actors, 0.5, clips_per_second)
        out["diagnostics"] = {k: _finite_or_none(v) for k, v in diag.items()}
    return out
