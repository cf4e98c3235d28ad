"""The region proposal network (reference-facts.md section 6.2): its head, the official
anchors, the proposals of a map, and its own targets and losses.

- Anchors: torchvision's ``AnchorGenerator`` grid (centres at 0, 16, 32, ... px) with the
  official, unrounded cell anchors ``h = base * scale / sqrt(ar)``, ``w = base * scale *
  sqrt(ar)``; training prunes anchors not fully inside the image, inference clips them.
- Targets: IoU >= ``rpn_fg_iou`` positive, < ``rpn_bg_iou`` negative, every GT's best
  anchors forced positive (assigned to that GT); ``rpn_batch_per_clip`` sampled per clip,
  at most ``rpn_positive_fraction`` positive.
- Losses: binary cross entropy of the sampled anchors and smooth-L1 (beta 1) of the
  positives' codes, each summed per clip, divided by the clip's sampled anchors and
  averaged over the clips.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, clip_boxes_to_image

from .ops import balanced_sample, batched_iou, rank_in_groups

__all__ = ["RPNHead", "official_cell_anchors", "anchor_generator", "grid_anchors", "inside_image",
           "rpn_proposals", "RPNTargets", "rpn_targets", "rpn_losses"]


class RPNHead(nn.Module):
    """3x3 conv (+ReLU6) then 1x1 objectness (1 per anchor) and 1x1 box deltas (4 per anchor).

    ``forward([N, C, h, w]) -> (objectness [N, h*w*A], deltas [N, h*w*A, 4])`` in
    torchvision's anchor order (row, column, anchor).
    """

    def __init__(self, in_channels: int, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = F.relu6(self.conv(x))
        n, _, h, w = t.shape
        obj = self.cls_logits(t).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.bbox_pred(t).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return obj, deltas


def official_cell_anchors(cfg: Any) -> Tensor:
    """``[A, 4]`` anchors centred at 0: h = base*s/sqrt(ar), w = base*s*sqrt(ar)
    (``cfg``: a :class:`stvr.config.ModelConfig`)."""
    rows = []
    for s in cfg.anchor_scales:
        for ar in cfg.anchor_aspect_ratios:
            h = cfg.anchor_base_size * s / math.sqrt(ar)
            w = cfg.anchor_base_size * s * math.sqrt(ar)
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def anchor_generator(cfg: Any) -> AnchorGenerator:
    """torchvision's ``AnchorGenerator`` with the official cell anchors of ``cfg``."""
    generator = AnchorGenerator(sizes=((cfg.anchor_base_size,),), aspect_ratios=((1.0,),))
    generator.cell_anchors = [official_cell_anchors(cfg)]
    return generator


def grid_anchors(generator: AnchorGenerator, image_size: int, h: int, w: int, device: torch.device) -> Tensor:
    """``[h * w * A, 4]`` pixel anchors of an ``h x w`` map (stride S / h)."""
    generator.set_cell_anchors(torch.float32, device)
    stride = [torch.tensor(image_size // h, device=device), torch.tensor(image_size // w, device=device)]
    return generator.grid_anchors([[h, w]], [stride])[0]


def inside_image(boxes: Tensor, image_size: int) -> Tensor:
    """``[K]`` True for the boxes fully inside the ``image_size`` square."""
    s = image_size
    return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= s) & (boxes[:, 3] <= s)


@torch.no_grad()
def rpn_proposals(obj: Tensor, deltas: Tensor, anchors: Tensor, box_coder: BoxCoder, cfg: Any,
                  image_size: int, training: bool,
                  pre_nms_top_n: int | None = None) -> tuple[Tensor, Tensor]:
    """Proposals ``[N, P, 4]`` pixels and their validity ``[N, P]`` (P = ``cfg.max_proposals``,
    sorted by objectness) from ``obj [N, A]`` and ``deltas [N, A, 4]``: decode, clip, NMS at
    ``cfg.rpn_nms_iou`` per clip (training: anchors outside the image pruned; inference:
    anchors clipped to it; ``pre_nms_top_n`` optionally caps the candidates per clip)."""
    size = image_size
    n, a = obj.shape
    if training:   # official: prune anchors not fully inside the image
        keep_anchor = inside_image(anchors, size)
        ref = anchors
    else:          # official: clip anchors to the image at inference
        keep_anchor = torch.ones(a, dtype=torch.bool, device=obj.device)
        ref = clip_boxes_to_image(anchors, (size, size))
    boxes = box_coder.decode_single(deltas.detach().reshape(-1, 4), ref.repeat(n, 1))
    boxes = clip_boxes_to_image(boxes, (size, size)).view(n, a, 4)
    scores = obj.detach().sigmoid()
    wh = boxes[..., 2:] - boxes[..., :2]
    ok = keep_anchor[None] & (wh > 1e-3).all(-1)
    if pre_nms_top_n is not None and a > pre_nms_top_n:
        top = scores.masked_fill(~ok, -1).topk(pre_nms_top_n, dim=1).indices
        ok = torch.zeros_like(ok).scatter_(1, top, True) & ok
    clip_idx, anchor_idx = ok.nonzero(as_tuple=True)
    cand, cand_scores = boxes[clip_idx, anchor_idx], scores[clip_idx, anchor_idx]
    keep = batched_nms(cand, cand_scores, clip_idx, cfg.rpn_nms_iou)
    keep = keep[rank_in_groups(clip_idx[keep]) < cfg.max_proposals]
    p = cfg.max_proposals
    rank = rank_in_groups(clip_idx[keep])
    proposals = boxes.new_zeros(n, p, 4)
    valid = torch.zeros(n, p, dtype=torch.bool, device=obj.device)
    proposals[clip_idx[keep], rank] = cand[keep]
    valid[clip_idx[keep], rank] = True
    return proposals, valid


class RPNTargets(NamedTuple):
    """Sampled anchors of :func:`rpn_targets`: ``positive``/``sampled`` masks ``[N, A]``,
    ``n_sampled [N]`` (>= 1), the positives' (clip, anchor) indices and their box codes."""

    positive: Tensor
    sampled: Tensor
    n_sampled: Tensor
    pos_clip: Tensor
    pos_anchor: Tensor
    box_targets: Tensor


@torch.no_grad()
def rpn_targets(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, box_coder: BoxCoder, cfg: Any,
                image_size: int, dtype: torch.dtype = torch.float32) -> RPNTargets:
    """Anchor labels and sampling (section 6.2) for GT ``gt_boxes [N, G, 4]`` pixels
    (``gt_valid [N, G]``) and ``anchors [A, 4]``; draws from the global torch RNG."""
    inside = inside_image(anchors, image_size)
    iou = batched_iou(gt_boxes, anchors).masked_fill(~gt_valid[:, :, None], -1.0)   # [N, G, A]
    iou = iou.masked_fill(~inside[None, None, :], -1.0)
    best_iou, best_gt = iou.max(1)
    labels = torch.full_like(best_gt, -1)
    labels[best_iou < cfg.rpn_bg_iou] = 0
    labels[best_iou >= cfg.rpn_fg_iou] = 1
    best_per_gt = iou.max(2, keepdim=True).values                          # [N, G, 1]
    forced = (iou == best_per_gt) & gt_valid[:, :, None] & (best_per_gt > 0)
    forced_any = forced.any(1)
    best_gt = torch.where(forced_any, forced.float().argmax(1), best_gt)
    labels[forced_any] = 1
    labels[:, ~inside] = -1
    pos, neg = balanced_sample(labels, cfg.rpn_batch_per_clip, cfg.rpn_positive_fraction)
    sampled = pos | neg
    n_sampled = sampled.sum(1).clamp(min=1).to(dtype)
    pc, pa = pos.nonzero(as_tuple=True)
    targets = box_coder.encode_single(gt_boxes[pc, best_gt[pc, pa]], anchors[pa])
    return RPNTargets(pos, sampled, n_sampled, pc, pa, targets)


def rpn_losses(obj: Tensor, deltas: Tensor, targets: RPNTargets) -> tuple[Tensor, Tensor]:
    """``(objectness loss, box loss)`` of ``obj [N, A]`` and ``deltas [N, A, 4]``: per clip
    sums over the sampled anchors / the clip's sampled count, mean over clips (0 without clips)."""
    n = obj.shape[0]
    pos, sampled, n_sampled = targets.positive, targets.sampled, targets.n_sampled
    pc, pa = targets.pos_clip, targets.pos_anchor
    bce = F.binary_cross_entropy_with_logits(obj, pos.to(obj.dtype), reduction="none")
    rpn_obj = ((bce * sampled).sum(1) / n_sampled).mean() if n else obj.sum() * 0
    loc = F.smooth_l1_loss(deltas[pc, pa], targets.box_targets, beta=1.0, reduction="none").sum(1)
    rpn_box = (torch.zeros(n, device=obj.device, dtype=loc.dtype).index_add(0, pc, loc) / n_sampled).mean() \
        if n else deltas.sum() * 0
    return rpn_obj, rpn_box
