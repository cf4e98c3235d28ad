"""Detections for every pair of a pair file (the input of ``stvr evaluate``).

Output format (API.md section 4): ``detections[i][j]`` is the list of
``[x1, y1, x2, y2, score]`` (normalized boxes, score = query-match
probability, descending) of clip ``j`` of pair ``i``'s reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def predict_pairs(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
                  batch_size: int = 1, num_workers: int = 0,
                  progress: bool = True) -> list[list[list[list[float]]]]:
    """Run ``model`` (eval mode) over an :class:`~stvr.data.dataset.EvalPairDataset`.

    Pairs are batched ``batch_size`` at a time (references padded and masked);
    the result is in dataset order, one entry per pair, one list per real
    reference clip.
    """
    from tqdm import tqdm

    from .data.dataset import collate_pairs

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs,
                        num_workers=num_workers)
    out: list[list[list[list[float]]]] = [[] for _ in range(len(dataset))]  # type: ignore[arg-type]
    for batch in tqdm(loader, desc="predict", disable=not progress, dynamic_ncols=True):
        dets = model(batch.to(device))
        for pair_id, per_clip in zip(batch.pair_ids, dets):
            out[pair_id] = [d.detach().cpu().tolist() for d in per_clip]
    model.train(was_training)
    return out


def save_detections(detections: list, path: str | Path) -> None:
    """Write detections as JSON (floats rounded to 6 decimals)."""
    rounded = [[[[round(float(v), 6) for v in det] for det in clip] for clip in pair]
               for pair in detections]
    Path(path).write_text(json.dumps(rounded))


def load_detections(path: str | Path) -> list:
    """Read a detections JSON written by :func:`save_detections`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"detections file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from None
