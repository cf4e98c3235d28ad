"""The matching network of the paper's Figure 5 (reference-facts.md sections 4 and 6).

::

    query clips  --backbone--> [Nq, C, h, w] --crop(query box)--> f_q [Nq, C, 7, 7]
    reference    --backbone--> [B, L, C, h, w] --cell over L--> [B, L, C, h, w]
                 --RPN--> <= max_proposals boxes per clip --crop--> f_p [K, C, 7, 7]
    attention (Eq. 10) of every proposal over the query clips of its pair --> fbar_q [K, C, 7, 7]
    concat [f_p, fbar_q] --> head (ResNet bottlenecks) --> 3 logits + 2x4 box codes

Conventions: boxes enter and leave normalized ``[x1, y1, x2, y2]`` in [0, 1];
inside, proposals, anchors and box codes are in pixels of the S x S input.
Feature maps have size h = w = S / 16.

Details and the places where this differs from the official TensorFlow code:

* **RoI crops** emulate ``tf.image.crop_and_resize`` exactly with
  ``torchvision.ops.roi_align``: TF samples the 14 x 14 points
  ``y_i = y1 * (h - 1) + i * (y2 - y1) * (h - 1) / 13`` (normalized boxes
  mapped onto the corners of the feature grid). ``roi_align`` with
  ``sampling_ratio=1`` samples bin centres, so the box is handed over in
  feature units widened by half a sample step on each side (plus the +0.5 of
  ``aligned=True``, which also avoids the minimum-size-1 clamp of
  ``aligned=False``): the sample positions are then identical for every box
  inside the image. Then 2 x 2 max-pool -> 7 x 7 (:func:`crop_features`).
* **Anchors** come from torchvision's ``AnchorGenerator`` (``grid_anchors``:
  centres at 0, 16, 32, ... px, i.e. the official offset 0), with its cell
  anchors replaced by the official, unrounded sizes
  ``h = base * scale / sqrt(ar)``, ``w = base * scale * sqrt(ar)``. As in the
  official code, training prunes anchors not fully inside the image (they are
  neither sampled nor turned into proposals); inference clips anchors to the image.
* **RPN objectness** is one logit per anchor with a sigmoid / binary cross
  entropy (torchvision's RPNHead); the official 2-way softmax is the same model
  (softmax of two logits = sigmoid of their difference). The 3x3 conv uses ReLU6
  as the official code. Matching (0.7 / 0.3, every GT's best anchors forced
  positive, assigned to that GT), sampling (256 per clip, half positive) and
  the per-clip normalization (sum / sampled anchors, mean over real clips)
  follow section 6.2; smooth-L1 with beta 1 (Huber delta 1).
* **Box coding**: torchvision ``BoxCoder`` with weights (wx, wy, ww, wh) =
  (10, 10, 5, 5) = the official (ty, tx, th, tw) scales, both stages.
* **Second stage** (section 6.3): IoU >= 0.5 with any GT is positive with that
  GT's class, 16 proposals per clip with at most 25 % positives, GT boxes are
  not added to the proposals; each sampled proposal's loss is divided by
  ``max(n_sampled_of_clip, 1) * B * L`` (padded clips count in the divisor, as
  officially) and the sum is taken over real clips only. Smooth-L1 on the codes
  of the target class. The reported components are unweighted; ``"loss"`` is
  the weighted total.
* ``head="binary"`` (the paper's text): the same ResNet trunk, one logit
  (sigmoid = probability of "matches the query") and one class-agnostic set of
  4 box codes. Sampling positives are proposals matched to any person; the
  class target is 1 for a matched query-match person; box regression is
  trained on all positives.
* **Post-processing** (section 4.7): softmax, class-specific decoding, clipping
  to the image, per-class NMS 0.6, 15 per class, 30 per clip; only the
  query-match class is returned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, clip_boxes_to_image, roi_align

from .backbones import build_backbone
from .config import ModelConfig
from .data.batch import QUERY_MATCH, PairBatch

__all__ = ["STVRModel", "crop_features", "QueryAttention", "BoxHead", "RPNHead"]


# --------------------------------------------------------------------------- helpers

def crop_features(features: Tensor, boxes: Tensor, batch_index: Tensor, crop_size: int = 14,
                  pool: int = 2, mapping: str = "tf", image_size: int | None = None) -> Tensor:
    """RoI features: ``crop_size`` x ``crop_size`` bilinear samples, then max-pool.

    Args:
        features: ``[N, C, h, w]`` feature maps.
        boxes: ``[K, 4]`` normalized ``[x1, y1, x2, y2]``.
        batch_index: ``[K]`` int64 map index of each box.
        mapping: how a normalized box lands on the map.
            ``"tf"``: TF ``crop_and_resize`` (the official code): 0..1 spans the map's
            first to last cell centre, samples on the box corners and between.
            ``"pixel"``: the geometry of a stride-``image_size / w`` backbone whose
            cell ``i`` is centred on pixel ``stride * i`` (stride-2, kernel-3, padding-1
            convolutions, as the tiny backbone): the box's pixel extent is mapped to
            cell units and sampled at ``crop_size`` bin centres (``roi_align``).
        image_size: S, the input side in pixels (``"pixel"`` mapping only; default ``16 * w``).
    Returns:
        ``[K, C, crop_size // pool, crop_size // pool]``.
    """
    h, w = features.shape[-2:]
    if mapping == "tf":
        scale = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
        b = boxes * scale                                       # corners in feature cells
        step = (b[:, 2:] - b[:, :2]) / max(crop_size - 1, 1)     # sample spacing (x, y)
        rois = torch.cat([b[:, :2] - 0.5 * step + 0.5, b[:, 2:] + 0.5 * step + 0.5], dim=1)
    elif mapping == "pixel":
        size = float(image_size or 16 * w)
        stride = boxes.new_tensor([size / w, size / h, size / w, size / h])
        # pixel k (centre at k + 0.5) lies in cell (k) / stride; roi_align(aligned=True) wants +0.5
        rois = (boxes * size - 0.5) / stride + 0.5
    else:
        raise ValueError(f"unknown RoI mapping {mapping!r}; choose 'tf' or 'pixel'")
    rois = torch.cat([batch_index.to(rois.dtype)[:, None], rois], dim=1)
    out = roi_align(features, rois, (crop_size, crop_size), spatial_scale=1.0,
                    sampling_ratio=1, aligned=True)
    return F.max_pool2d(out, pool, pool) if pool > 1 else out


def _batched_iou(a: Tensor, b: Tensor) -> Tensor:
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


def _rank_in_groups(groups: Tensor) -> Tensor:
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


def _sample(labels: Tensor, per_row: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
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


def _pad_boxes(boxes: list[Tensor], labels: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
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


# --------------------------------------------------------------------------- modules

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


class QueryAttention(nn.Module):
    """Eq. (10): every proposal attends over the query clips of its own pair.

    ``pq = FC(mean f_q)``, ``pr = FC(mean f_p)``, ``s = FC_1(tanh(pr + pq))``,
    ``alpha = softmax`` over the pair's query clips, ``fbar = sum alpha f_q``.
    Glorot-uniform weights, zero biases (TF slim defaults).
    """

    def __init__(self, channels: int, dim: int, chunk_elements: int = 1 << 24) -> None:
        super().__init__()
        self.fc_query = nn.Linear(channels, dim)
        self.fc_ref = nn.Linear(channels, dim)
        self.fc_g = nn.Linear(dim, 1)
        self.chunk_elements = chunk_elements
        for layer in (self.fc_query, self.fc_ref, self.fc_g):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, ref: Tensor, ref_pair: Tensor, query: Tensor, query_pair: Tensor) -> Tensor:
        """``ref [K, C, 7, 7]``, ``ref_pair [K]``, ``query [Nq, C, 7, 7]``, ``query_pair [Nq]`` -> ``[K, C, 7, 7]``.

        Every pair of ``ref_pair`` must have at least one query clip.
        """
        pq = self.fc_query(query.mean((2, 3)))           # [Nq, D]
        pr = self.fc_ref(ref.mean((2, 3)))               # [K, D]
        flat_q = query.flatten(1)
        step = max(1, self.chunk_elements // max(1, pq.shape[0] * pq.shape[1]))
        outs = []
        for s in range(0, pr.shape[0], step):
            e = torch.tanh(pr[s:s + step, None, :] + pq[None])          # [k, Nq, D]
            score = self.fc_g(e).squeeze(-1)                           # [k, Nq]
            other = ref_pair[s:s + step, None] != query_pair[None, :]
            alpha = score.masked_fill(other, float("-inf")).softmax(dim=1)
            outs.append(alpha @ flat_q)
        out = torch.cat(outs) if outs else flat_q.new_zeros(0, flat_q.shape[1])
        return out.view(ref.shape[0], *query.shape[1:])


class FixedBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics (mean 0, var 1) and trainable affine, as the
    official head's inference-mode BN: ``x * weight / sqrt(1 + eps) + bias``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.scale = 1.0 / math.sqrt(1.0 + eps)

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.weight * self.scale)[:, None, None] + self.bias[:, None, None]


class Bottleneck(nn.Module):
    """ResNet-v1 bottleneck, stride 1: 1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN, + shortcut, ReLU."""

    def __init__(self, in_channels: int, mid: int, out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = FixedBatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = FixedBatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = FixedBatchNorm2d(out)
        self.shortcut = (nn.Identity() if in_channels == out else
                         nn.Sequential(nn.Conv2d(in_channels, out, 1, bias=False), FixedBatchNorm2d(out)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class BoxHead(nn.Module):
    """Second stage on fused RoI features ``[K, 2C, 7, 7]``.

    ``num_blocks`` bottlenecks, spatial mean, then FC class logits and FC box codes:
    ``resnet`` head: 3 logits (bg / other person / query match) and ``[K, 2, 4]``
    class-specific codes; ``binary`` head: 1 logit and ``[K, 1, 4]`` codes.
    """

    def __init__(self, in_channels: int, mid: int, out: int, num_blocks: int, binary: bool = False) -> None:
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            blocks.append(Bottleneck(in_channels if i == 0 else out, mid, out))
        self.blocks = nn.Sequential(*blocks)
        width = out if num_blocks else in_channels
        self.binary = binary
        self.num_box_classes = 1 if binary else 2
        self.cls_score = nn.Linear(width, 1 if binary else 3)
        self.bbox_pred = nn.Linear(width, 4 * self.num_box_classes)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[K, 2C, 7, 7] -> (logits [K, 3] or [K, 1], codes [K, 2 or 1, 4])``."""
        v = self.blocks(x).mean((2, 3))
        return self.cls_score(v), self.bbox_pred(v).view(-1, self.num_box_classes, 4)


# --------------------------------------------------------------------------- model

class STVRModel(nn.Module):
    """Spatio-temporal video re-localization network (paper Fig. 5).

    Args:
        cfg: the model configuration.
        backbone_chunk: clips per backbone call when gradients are off (bounds memory
            for long references; in training all clips go through in one call so
            BN batch statistics are shared by queries and references).
        rpn_pre_nms_top_n: optional per-clip cap on the proposals entering NMS
            (None = all anchors, as the official code).

    ``forward(batch)`` returns the loss dict in training mode and detections in eval
    mode (see :meth:`forward`). ``record_offsets = True`` makes the warp cell's
    per-step control-point displacements available in ``last_offsets`` (list of
    ``[B, N, 2]``, (dy, dx) in feature cells) with ``control_points`` ``[N, 2]``.
    """

    def __init__(self, cfg: ModelConfig, backbone_chunk: int = 32,
                 rpn_pre_nms_top_n: int | None = None) -> None:
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError(f"model.image_size={cfg.image_size} must be a multiple of 16")
        if cfg.head not in ("resnet", "binary"):
            raise ValueError(f"model.head must be 'resnet' or 'binary', got {cfg.head!r}")
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.feature_size = cfg.image_size // 16
        self.backbone_chunk = backbone_chunk
        self.rpn_pre_nms_top_n = rpn_pre_nms_top_n
        channels = cfg.backbone_channels
        self.backbone = build_backbone(cfg)
        if cfg.freeze_backbone:          # pretrained features kept as they are (no gradient, stored BN stats)
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.cell = _build_cell(cfg)
        num_anchors = len(cfg.anchor_scales) * len(cfg.anchor_aspect_ratios)
        self.rpn = RPNHead(channels, cfg.rpn_channels, num_anchors)
        self.attention = QueryAttention(channels, cfg.attention_dim)
        self.head = BoxHead(2 * channels, cfg.head_mid_channels, cfg.head_out_channels,
                            cfg.head_blocks, binary=cfg.head == "binary")
        self.box_coder = BoxCoder(tuple(float(w) for w in cfg.box_coder_weights))
        self.anchor_generator = AnchorGenerator(sizes=((cfg.anchor_base_size,),), aspect_ratios=((1.0,),))
        self.anchor_generator.cell_anchors = [self._official_cell_anchors()]
        self.record_offsets = False
        self.last_offsets: list[Tensor] = []
        self.control_points: Tensor | None = None

    # ------------------------------------------------------------------ anchors
    def _official_cell_anchors(self) -> Tensor:
        """``[A, 4]`` anchors centred at 0: h = base*s/sqrt(ar), w = base*s*sqrt(ar)."""
        cfg = self.cfg
        rows = []
        for s in cfg.anchor_scales:
            for ar in cfg.anchor_aspect_ratios:
                h = cfg.anchor_base_size * s / math.sqrt(ar)
                w = cfg.anchor_base_size * s * math.sqrt(ar)
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(rows, dtype=torch.float32)

    def anchors(self, h: int, w: int, device: torch.device) -> Tensor:
        """``[h * w * A, 4]`` pixel anchors of an ``h x w`` map (stride S / h)."""
        self.anchor_generator.set_cell_anchors(torch.float32, device)
        stride = [torch.tensor(self.image_size // h, device=device), torch.tensor(self.image_size // w, device=device)]
        return self.anchor_generator.grid_anchors([[h, w]], [stride])[0]

    # ------------------------------------------------------------------ stages
    def train(self, mode: bool = True) -> "STVRModel":
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()
        return self

    def run_backbone(self, clips: Tensor) -> Tensor:
        """``[N, 3, T, S, S] -> [N, C, h, w]``, chunked when gradients are off."""
        if clips.shape[0] == 0:
            c, h = self.cfg.backbone_channels, self.feature_size
            return clips.new_zeros(0, c, h, h)
        if self.cfg.freeze_backbone:
            with torch.no_grad():
                return torch.cat([self.backbone(c) for c in clips.split(self.backbone_chunk)])
        if torch.is_grad_enabled() and self.training:
            return self.backbone(clips)
        return torch.cat([self.backbone(c) for c in clips.split(self.backbone_chunk)])

    def encode_query(self, query_clips: Tensor, query_boxes: Tensor) -> Tensor:
        """Query features ``[Nq, C, 7, 7]`` from clips ``[Nq, 3, T, S, S]`` and normalized boxes ``[Nq, 4]``."""
        return self._crop_queries(self.run_backbone(query_clips), query_boxes)

    def _crop_queries(self, features: Tensor, boxes: Tensor) -> Tensor:
        idx = torch.arange(features.shape[0], device=features.device)
        return crop_features(features, boxes.to(features.dtype), idx, self.cfg.roi_crop_size,
                             mapping=self.cfg.roi_mapping, image_size=self.image_size)

    def propagate(self, features: Tensor, state: Any = None, flows: Tensor | None = None) -> tuple[Tensor, Any]:
        """Run the recurrent cell over the clip axis of ``features [B, L, C, h, w]``.

        ``flows [B, L, h, w, 2]`` (from :meth:`cell_flows`; the ``flow`` cell needs them)
        reach the cell as ``context["flow"]``. Returns the propagated maps ``[B, L, C, h, w]``
        (the input itself for ``cell="none"``) and the final state.
        """
        if self.cell is None:
            return features, state
        outs = []
        for t in range(features.shape[1]):
            context = None if flows is None else {"flow": flows[:, t]}
            out, state = self.cell(features[:, t], state, context)
            if self.record_offsets and getattr(self.cell, "last_offsets", None) is not None:
                self.last_offsets.append(self.cell.last_offsets.detach())
                self.control_points = self.cell.control_points.detach()
            outs.append(out)
        return torch.stack(outs, 1), state

    def cell_flows(self, clips: Tensor, previous: Tensor | None = None,
                   given: Tensor | None = None) -> Tensor | None:
        """The optical flows ``[B, L, h, w, 2]`` of ``clips [B, L, 3, T, S, S]`` when the cell
        reads them (``"flow" in cell.context_keys``), else None: ``given`` (precomputed,
        ``PairBatch.flows``) or :func:`stvr.data.flow.sequence_flows` (zero for the first
        clip unless ``previous [B, 3, T, S, S]`` is given). The one place flows are made."""
        if "flow" not in getattr(self.cell, "context_keys", ()):
            return None
        if given is not None:
            return given
        from .data.flow import sequence_flows

        return sequence_flows(clips, previous, self.feature_size)

    def _proposals(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """RPN on ``maps [N, C, h, w]``.

        Returns ``objectness [N, A]`` and ``deltas [N, A, 4]`` (for the loss),
        anchors ``[A, 4]``, proposals ``[N, P, 4]`` pixels (detached) and their
        validity ``[N, P]`` (P = max_proposals, sorted by objectness).
        """
        cfg, size = self.cfg, self.image_size
        obj, deltas = self.rpn(maps)
        n, a = obj.shape
        anchors = self.anchors(maps.shape[-2], maps.shape[-1], maps.device)
        with torch.no_grad():
            if self.training:   # official: prune anchors not fully inside the image
                keep_anchor = self._inside(anchors)
                ref = anchors
            else:               # official: clip anchors to the image at inference
                keep_anchor = torch.ones(a, dtype=torch.bool, device=maps.device)
                ref = clip_boxes_to_image(anchors, (size, size))
            boxes = self.box_coder.decode_single(deltas.detach().reshape(-1, 4), ref.repeat(n, 1))
            boxes = clip_boxes_to_image(boxes, (size, size)).view(n, a, 4)
            scores = obj.detach().sigmoid()
            wh = boxes[..., 2:] - boxes[..., :2]
            ok = keep_anchor[None] & (wh > 1e-3).all(-1)
            if self.rpn_pre_nms_top_n is not None and a > self.rpn_pre_nms_top_n:
                top = scores.masked_fill(~ok, -1).topk(self.rpn_pre_nms_top_n, dim=1).indices
                ok = torch.zeros_like(ok).scatter_(1, top, True) & ok
            clip_idx, anchor_idx = ok.nonzero(as_tuple=True)
            cand, cand_scores = boxes[clip_idx, anchor_idx], scores[clip_idx, anchor_idx]
            keep = batched_nms(cand, cand_scores, clip_idx, cfg.rpn_nms_iou)
            keep = keep[_rank_in_groups(clip_idx[keep]) < cfg.max_proposals]
            p = cfg.max_proposals
            rank = _rank_in_groups(clip_idx[keep])
            proposals = boxes.new_zeros(n, p, 4)
            valid = torch.zeros(n, p, dtype=torch.bool, device=maps.device)
            proposals[clip_idx[keep], rank] = cand[keep]
            valid[clip_idx[keep], rank] = True
        return obj, deltas, anchors, proposals, valid

    def _inside(self, boxes: Tensor) -> Tensor:
        s = self.image_size
        return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= s) & (boxes[:, 3] <= s)

    def _second_stage(self, maps: Tensor, boxes: Tensor, clip_index: Tensor, clip_pair: Tensor,
                      query_feats: Tensor, query_index: Tensor) -> tuple[Tensor, Tensor]:
        """Head on proposals ``boxes [K, 4]`` (pixels) of clips ``clip_index [K]`` of ``maps``.

        ``clip_pair [N]`` is the pair of each map. Returns logits and box codes.
        """
        feats = crop_features(maps, boxes / self.image_size, clip_index, self.cfg.roi_crop_size,
                              mapping=self.cfg.roi_mapping, image_size=self.image_size)
        attended = self.attention(feats, clip_pair[clip_index], query_feats, query_index)
        return self.head(torch.cat([feats, attended], dim=1))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: PairBatch) -> dict[str, Tensor] | list[list[Tensor]]:
        """Training: dict of scalar losses ``rpn_objectness``, ``rpn_box``,
        ``box_classifier``, ``box_reg`` (unweighted) and ``loss`` (weighted total).

        Eval: per pair, per real reference clip (``reference_mask`` True, in time
        order), a ``[K, 5]`` tensor of normalized ``[x1, y1, x2, y2, score]`` of the
        query-match class, sorted by descending score, ``K <= det_per_clip``.
        """
        ref = batch.reference_clips
        b, length = ref.shape[:2]
        mask = batch.reference_mask.to(torch.bool)
        lengths = mask.sum(1)
        steps = int(lengths.max().item()) if b else 0
        nq = batch.query_clips.shape[0]
        # one backbone call over the query clips and the real reference clips
        pair_idx, time_idx = mask.nonzero(as_tuple=True)          # pair-major, time order
        clips = torch.cat([batch.query_clips, ref[pair_idx, time_idx]])
        feats = self.run_backbone(clips)
        query_feats = self._crop_queries(feats[:nq], batch.query_boxes)
        grid = feats.new_zeros(b, steps, *feats.shape[1:])
        grid[pair_idx, time_idx] = feats[nq:]
        flows = self.cell_flows(ref[:, :steps], None,
                                None if batch.flows is None else batch.flows[:, :steps])
        if self.record_offsets:
            self.last_offsets = []
        maps, _ = self.propagate(grid, None, flows)
        maps = maps[pair_idx, time_idx]                           # [N, C, h, w] real clips
        query_index = batch.query_index.to(device=maps.device, dtype=torch.long)
        if not self.training:
            dets = self._detect(maps, pair_idx, query_feats, query_index)
            counts = lengths.tolist()
            out, start = [], 0
            for c in counts:
                out.append(dets[start:start + c])
                start += c
            return out
        gt_boxes = [batch.gt_boxes[int(i)][int(t)] for i, t in zip(pair_idx.tolist(), time_idx.tolist())]
        gt_labels = [batch.gt_labels[int(i)][int(t)] for i, t in zip(pair_idx.tolist(), time_idx.tolist())]
        return self._losses(maps, pair_idx, query_feats, query_index, gt_boxes, gt_labels, total_clips=b * max(length, batch.loss_clips or 0))

    def _losses(self, maps: Tensor, clip_pair: Tensor, query_feats: Tensor, query_index: Tensor,
                gt_boxes: list[Tensor], gt_labels: list[Tensor], total_clips: int) -> dict[str, Tensor]:
        cfg, dev = self.cfg, maps.device
        n = maps.shape[0]
        gtb, gtl, gtv = _pad_boxes(gt_boxes, gt_labels, dev)
        gtb = gtb * self.image_size
        obj, deltas, anchors, proposals, pvalid = self._proposals(maps)

        # ---- RPN targets (section 6.2)
        with torch.no_grad():
            inside = self._inside(anchors)
            iou = _batched_iou(gtb, anchors).masked_fill(~gtv[:, :, None], -1.0)   # [N, G, A]
            iou = iou.masked_fill(~inside[None, None, :], -1.0)
            best_iou, best_gt = iou.max(1)
            labels = torch.full_like(best_gt, -1)
            labels[best_iou < cfg.rpn_bg_iou] = 0
            labels[best_iou >= cfg.rpn_fg_iou] = 1
            best_per_gt = iou.max(2, keepdim=True).values                          # [N, G, 1]
            forced = (iou == best_per_gt) & gtv[:, :, None] & (best_per_gt > 0)
            forced_any = forced.any(1)
            best_gt = torch.where(forced_any, forced.float().argmax(1), best_gt)
            labels[forced_any] = 1
            labels[:, ~inside] = -1
            pos, neg = _sample(labels, cfg.rpn_batch_per_clip, cfg.rpn_positive_fraction)
            sampled = pos | neg
            n_sampled = sampled.sum(1).clamp(min=1).to(maps.dtype)
            pc, pa = pos.nonzero(as_tuple=True)
            targets = self.box_coder.encode_single(gtb[pc, best_gt[pc, pa]], anchors[pa])
        bce = F.binary_cross_entropy_with_logits(obj, pos.to(obj.dtype), reduction="none")
        rpn_obj = ((bce * sampled).sum(1) / n_sampled).mean() if n else obj.sum() * 0
        loc = F.smooth_l1_loss(deltas[pc, pa], targets, beta=1.0, reduction="none").sum(1)
        rpn_box = (torch.zeros(n, device=dev, dtype=loc.dtype).index_add(0, pc, loc) / n_sampled).mean() \
            if n else deltas.sum() * 0

        # ---- second-stage targets (section 6.3)
        with torch.no_grad():
            if cfg.box_add_gt:   # ground-truth boxes join the proposals (torchvision's add_gt_proposals)
                proposals = torch.cat([proposals, gtb], dim=1)
                pvalid = torch.cat([pvalid, gtv], dim=1)
            iou2 = _batched_iou(proposals, gtb).masked_fill(~gtv[:, None, :], -1.0)   # [N, P, G]
            best2, match2 = iou2.max(2)
            positive = pvalid & (best2 >= cfg.box_fg_iou)
            labels2 = torch.where(positive, 1, torch.where(pvalid, 0, -1))
            spos, sneg = _sample(labels2, cfg.box_batch_per_clip, cfg.box_positive_fraction)
            chosen = spos | sneg
            clip_index, slot = chosen.nonzero(as_tuple=True)
            boxes = proposals[clip_index, slot]
            is_pos = spos[clip_index, slot]
            matched = match2[clip_index, slot]
            cls = torch.where(is_pos, gtl[clip_index, matched], 0)
            pos_rows = is_pos.nonzero(as_tuple=True)[0]
            box_targets = self.box_coder.encode_single(gtb[clip_index[pos_rows], matched[pos_rows]],
                                                       boxes[pos_rows])
            weight = 1.0 / (chosen.sum(1).clamp(min=1).to(maps.dtype) * total_clips)    # per clip
        logits, codes = self._second_stage(maps, boxes, clip_index, clip_pair, query_feats, query_index)
        w = weight[clip_index]
        if self.head.binary:
            cls_loss = F.binary_cross_entropy_with_logits(
                logits[:, 0], (cls == QUERY_MATCH).to(logits.dtype), reduction="none")
            pred = codes[:, 0]
        else:
            cls_loss = F.cross_entropy(logits, cls, reduction="none")
            pred = codes[torch.arange(codes.shape[0], device=dev), (cls - 1).clamp(min=0)]
        reg = F.smooth_l1_loss(pred[pos_rows], box_targets, beta=1.0, reduction="none").sum(1)
        box_cls = (cls_loss * w).sum()
        box_reg = (reg * w[pos_rows]).sum()
        total = (cfg.rpn_obj_weight * rpn_obj + cfg.rpn_loc_weight * rpn_box
                 + cfg.box_cls_weight * box_cls + cfg.box_loc_weight * box_reg)
        return {"rpn_objectness": rpn_obj, "rpn_box": rpn_box, "box_classifier": box_cls,
                "box_reg": box_reg, "loss": total}

    @torch.no_grad()
    def _detect(self, maps: Tensor, clip_pair: Tensor, query_feats: Tensor, query_index: Tensor) -> list[Tensor]:
        """Detections ``[K, 5]`` (normalized xyxy + query-match score) for each map of ``maps [N, C, h, w]``."""
        cfg, size = self.cfg, self.image_size
        n = maps.shape[0]
        _, _, _, proposals, pvalid = self._proposals(maps)
        clip_index, slot = pvalid.nonzero(as_tuple=True)
        boxes = proposals[clip_index, slot]
        logits, codes = self._second_stage(maps, boxes, clip_index, clip_pair, query_feats, query_index)
        k, nc = codes.shape[:2]
        if self.head.binary:
            scores = logits.sigmoid()                                   # [K, 1]
            match_class = 0
        else:
            scores = logits.softmax(-1)[:, 1:]                          # [K, 2] other, match
            match_class = 1
        dec = self.box_coder.decode_single(codes.reshape(-1, 4), boxes.repeat_interleave(nc, 0))
        dec = clip_boxes_to_image(dec, (size, size))
        scores = scores.reshape(-1)
        cls = torch.arange(nc, device=maps.device).repeat(k)
        clip = clip_index.repeat_interleave(nc)
        keep = (scores > cfg.det_score_threshold).nonzero(as_tuple=True)[0]
        dec, scores, cls, clip = dec[keep], scores[keep], cls[keep], clip[keep]
        keep = batched_nms(dec, scores, clip * nc + cls, cfg.det_nms_iou)           # score-descending
        keep = keep[_rank_in_groups((clip * nc + cls)[keep]) < cfg.det_per_class]
        keep = keep[_rank_in_groups(clip[keep]) < cfg.det_per_clip]
        keep = keep[cls[keep] == match_class]
        out = torch.cat([dec[keep] / size, scores[keep, None]], dim=1)
        order = torch.argsort(clip[keep], stable=True)
        counts = torch.bincount(clip[keep], minlength=n).tolist()
        return list(out[order].split(counts))

    @torch.no_grad()
    def detect_clips(self, query_features: Tensor, reference_clips: Tensor, state: Any = None,
                     previous_clip: Tensor | None = None) -> tuple[list[Tensor], Any]:
        """Streaming detection for ONE pair: feed a long reference chunk by chunk.

        Args:
            query_features: ``[Nq, C, 7, 7]`` from :meth:`encode_query`.
            reference_clips: ``[L, 3, T, S, S]`` the next clips of the reference.
            state: the state returned by the previous call (None = start).
            previous_clip: ``[3, T, S, S]`` the clip before this chunk (flow cell);
                by default the last clip of the previous chunk kept in ``state``.
        Returns:
            (per clip ``[K, 5]`` normalized ``[x1, y1, x2, y2, score]``, new state).
            The state is a dict ``{"cell": cell state, "previous_clip": last clip}``.
        """
        state = state or {}
        if previous_clip is None:
            previous_clip = state.get("previous_clip")
        feats = self.run_backbone(reference_clips)[None]                # [1, L, C, h, w]
        flows = self.cell_flows(reference_clips[None], None if previous_clip is None else previous_clip[None])
        maps, cell_state = self.propagate(feats, state.get("cell"), flows)
        maps = maps[0]
        pairs = torch.zeros(maps.shape[0], dtype=torch.long, device=maps.device)
        qidx = torch.zeros(query_features.shape[0], dtype=torch.long, device=maps.device)
        dets = self._detect(maps, pairs, query_features, qidx)
        return dets, {"cell": cell_state, "previous_clip": reference_clips[-1]}

    def stage_modules(self) -> dict[str, nn.Module | None]:
        """The stages whose parameters ``stvr model info`` counts."""
        return {"backbone": self.backbone, "cell": self.cell, "rpn": self.rpn,
                "attention": self.attention, "head": self.head}


def _build_cell(cfg: ModelConfig) -> nn.Module | None:
    """The recurrent cell of ``cfg.cell`` (None for ``"none"``, the Clip baseline)."""
    if cfg.cell == "none":
        return None
    from .recurrent import build_cell, cell_options

    if cfg.cell not in ("warp", "conv", "traj", "flow"):
        raise ValueError(f"unknown model.cell {cfg.cell!r}")
    c = cfg.backbone_channels
    return build_cell(cfg.cell, c, c, **cell_options(cfg, cfg.cell))
