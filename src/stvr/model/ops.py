"""Box and sampling operations shared by the stages of :mod:`stvr.model`: batched IoU,
rank within groups, Matrix-NMS score decay, balanced positive/negative sampling, padding
ragged ground truth."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_iou", "rank_in_groups", "matrix_nms_decay", "balanced_sample", "pad_boxes"]


def batched_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a [N, M, 4]`` with ``b [N, K, 4]`` (or ``[K, 4]``) -> ``[N, M, K]``."""
    if b.dim() == 2:
        b = b.unsqueeze(0)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-9)


def rank_in_groups(groups: Tensor) -> Tensor:
    """Rank of each element within its group, keeping the given order (0 = first)."""
    if groups.numel() == 0:
        return groups.clone()
    perm = torch.argsort(groups, stable=True)
    _, counts = torch.unique_consecutive(groups[perm], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks_sorted = torch.arange(groups.numel(), device=groups.device) - torch.repeat_interleave(starts, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks[perm] = ranks_sorted
    return ranks


def matrix_nms_decay(boxes: Tensor, scores: Tensor, groups: Tensor, kind: str = "linear",
                     sigma: float = 0.5) -> Tensor:
    """Matrix-NMS score decay (Wang et al., SOLOv2, NeurIPS 2020) of candidates within their group.

    Every candidate ``j`` is decayed by the higher-scored candidates ``i`` of its group that
    overlap it, each compensated by how much ``i`` is itself overlapped by a higher-scored one:
    ``decay_j = min_i f(iou_ij) / f(comp_i)``, ``comp_i = max_{k: s_k > s_i} iou_ki``, with
    ``f(x) = 1 - x`` (``kind="linear"``) or ``exp(-x^2 / sigma)`` (``"gaussian"``); the top
    candidate of a group keeps its score, and a decay never exceeds 1. Ties in score are broken
    by input order. All groups at once (padded to the largest group): no loop over boxes.

    Args:
        boxes: ``[K, 4]`` xyxy (any unit).
        scores: ``[K]``.
        groups: ``[K]`` integer group ids (e.g. clip x class, as for ``batched_nms``).
        kind: ``"linear"`` or ``"gaussian"``.
        sigma: the Gaussian's width (``kind="gaussian"`` only).

    Returns:
        ``[K]`` factors in [0, 1] to multiply the scores by (0: a linear decay of an exact duplicate).
    """
    if kind not in ("linear", "gaussian"):
        raise ValueError(f"matrix_nms_decay: kind must be 'linear' or 'gaussian', got {kind!r}")
    k = scores.numel()
    out = torch.ones_like(scores)
    if k < 2:
        return out
    by_score = torch.argsort(scores, descending=True, stable=True)
    perm = by_score[torch.argsort(groups[by_score], stable=True)]            # group, then score desc
    _, inverse, counts = torch.unique_consecutive(groups[perm], return_inverse=True, return_counts=True)
    rank = rank_in_groups(inverse)                                           # position in its group
    m = int(counts.max())
    padded = boxes.new_zeros(len(counts), m, 4)
    padded[inverse, rank] = boxes[perm]
    valid = torch.zeros(len(counts), m, dtype=torch.bool, device=boxes.device)
    valid[inverse, rank] = True
    above = torch.ones(m, m, dtype=torch.bool, device=boxes.device).triu(1)  # [i, j]: i scored above j
    pair = above & valid[:, :, None] & valid[:, None, :]
    iou = batched_iou(padded, padded).masked_fill(~pair, 0.0)                # [G, i, j]
    comp = iou.max(1).values                                                 # [G, i]: i's own max overlap
    if kind == "linear":
        ratio = (1 - iou) / (1 - comp[:, :, None]).clamp(min=1e-6)
    else:
        ratio = torch.exp(-(iou.pow(2) - comp[:, :, None].pow(2)) / sigma)
    decay = ratio.masked_fill(~pair, 1.0).min(1).values.clamp(max=1.0)      # [G, j]
    out[perm] = decay[inverse, rank]
    return out


def balanced_sample(labels: Tensor, per_row: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Balanced random sampling per row of ``labels [N, A]`` (1 pos, 0 neg, -1 ignore).

    Up to ``per_row * positive_fraction`` positives, negatives fill up to
    ``per_row`` (torchvision's BalancedPositiveNegativeSampler, vectorized).
    Returns boolean masks ``(positive, negative)``.
    """
    pos, neg = labels == 1, labels == 0
    num_pos = pos.sum(1).clamp(max=int(per_row * positive_fraction))
    num_neg = neg.sum(1).clamp(max=per_row - num_pos)

    def pick(mask: Tensor, k: Tensor) -> Tensor:
        key = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)
        order = torch.argsort(key, dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(mask.shape[1], device=mask.device)
                                                .expand_as(order).contiguous())
        return mask & (rank < k[:, None])

    return pick(pos, num_pos), pick(neg, num_neg)


def pad_boxes(boxes: list[Tensor], labels: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ragged per-clip GT into ``[N, G, 4]``, ``[N, G]`` labels and ``[N, G]`` validity."""
    n = len(boxes)
    g = max([int(b.shape[0]) for b in boxes] + [1])
    out_b = torch.zeros(n, g, 4, device=device)
    out_l = torch.zeros(n, g, dtype=torch.long, device=device)
    valid = torch.zeros(n, g, dtype=torch.bool, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        k = int(b.shape[0])
        if k:
            out_b[i, :k] = b.to(device=device, dtype=torch.float32).reshape(k, 4)
            out_l[i, :k] = lab.to(device=device, dtype=torch.long).reshape(k)
            valid[i, :k] = True
    return out_b, out_l, valid
