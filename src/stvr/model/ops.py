"""Box and sampling operations shared by the stages of :mod:`stvr.model`: batched IoU,
rank within groups, balanced positive/negative sampling, padding ragged ground truth."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_iou", "rank_in_groups", "balanced_sample", "pad_boxes"]


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
