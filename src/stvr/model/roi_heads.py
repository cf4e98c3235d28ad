"""The matching head (reference-facts.md sections 4.7 and 6.3): attention of every
proposal over its pair's query clips (Eq. 10), the ResNet box head, its own targets
and losses, and the post-processing into detections.

- Targets: IoU >= ``box_fg_iou`` with any GT is positive with that GT's class;
  ``box_batch_per_clip`` proposals sampled per clip, at most ``box_positive_fraction``
  positive (GT boxes join the proposals when ``box_add_gt``).
- Losses: each sampled proposal's loss divided by ``max(n_sampled_of_clip, 1) *
  total_clips`` and summed; smooth-L1 on the codes of the target class.
- Post-processing: softmax (sigmoid for the binary head), class-specific decoding,
  clipping, per-class NMS, ``det_per_class`` per class and ``det_per_clip`` per clip;
  only the query-match class is returned.
- Localization quality (``iou_head``, not in the paper): one more output per proposal, the
  IoU of its refined query-match box with the nearest annotated person, trained with BCE
  against that IoU (:func:`iou_loss`); the detection score becomes
  ``p(match) * sigmoid(iou_logit) ** det_iou_power``, so that a box half on an actor no
  longer ranks with the boxes that frame one (IoU-Net, Jiang et al. 2018).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ..data.batch import QUERY_MATCH
from .ops import balanced_sample, batched_iou, matrix_nms_decay, rank_in_groups

__all__ = ["QueryAttention", "FixedBatchNorm2d", "Bottleneck", "BoxHead", "BoxTargets",
           "box_targets", "box_losses", "iou_loss", "postprocess_detections"]


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
    class-specific codes; ``binary`` head: 1 logit and ``[K, 1, 4]`` codes. With ``iou=True``
    also a localization-quality logit ``[K]`` (:meth:`forward_with_iou`). With ``cosine=True`` a
    learned scale ``s = exp(match_log_scale)`` (starting at 10) for :meth:`add_match_cosine`.
    """

    def __init__(self, in_channels: int, mid: int, out: int, num_blocks: int, binary: bool = False,
                 iou: bool = False, cosine: bool = False) -> None:
        super().__init__()
        self.match_log_scale = nn.Parameter(torch.tensor(math.log(10.0))) if cosine else None
        blocks = []
        for i in range(num_blocks):
            blocks.append(Bottleneck(in_channels if i == 0 else out, mid, out))
        self.blocks = nn.Sequential(*blocks)
        width = out if num_blocks else in_channels
        self.binary = binary
        self.num_box_classes = 1 if binary else 2
        self.cls_score = nn.Linear(width, 1 if binary else 3)
        self.bbox_pred = nn.Linear(width, 4 * self.num_box_classes)
        self.iou_pred = nn.Linear(width, 1) if iou else None
        for layer in (self.cls_score, self.bbox_pred, self.iou_pred):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[K, 2C, 7, 7] -> (logits [K, 3] or [K, 1], codes [K, 2 or 1, 4])``."""
        return self.forward_with_iou(x)[:2]

    def forward_with_iou(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`forward` plus the localization-quality logit ``[K]`` (None without ``iou``)."""
        v = self.blocks(x).mean((2, 3))
        iou = self.iou_pred(v).squeeze(1) if self.iou_pred is not None else None
        return self.cls_score(v), self.bbox_pred(v).view(-1, self.num_box_classes, 4), iou

    def add_match_cosine(self, logits: Tensor, cosine: Tensor) -> Tensor:
        """``logits [K, n]`` with ``s * cosine [K]`` added to the last (query-match) logit."""
        match = logits[:, -1:] + (self.match_log_scale.exp() * cosine)[:, None]
        return torch.cat([logits[:, :-1], match], dim=1)


class BoxTargets(NamedTuple):
    """The sampled proposals of :func:`box_targets`: their clip, pixel box, class target
    (0 background, else the matched GT's label), the rows of the positives, the positives'
    box codes and each clip's loss weight ``[N]``."""

    clip_index: Tensor
    boxes: Tensor
    labels: Tensor
    pos_rows: Tensor
    box_targets: Tensor
    clip_weight: Tensor


@torch.no_grad()
def box_targets(proposals: Tensor, proposal_valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                gt_valid: Tensor, box_coder: BoxCoder, cfg: Any, total_clips: int,
                dtype: torch.dtype = torch.float32) -> BoxTargets:
    """Second-stage sampling (section 6.3) of ``proposals [N, P, 4]`` pixels (``proposal_valid
    [N, P]``) against GT ``gt_boxes [N, G, 4]`` pixels, ``gt_labels``/``gt_valid [N, G]``;
    draws from the global torch RNG."""
    if cfg.box_add_gt:   # ground-truth boxes join the proposals (torchvision's add_gt_proposals)
        proposals = torch.cat([proposals, gt_boxes], dim=1)
        proposal_valid = torch.cat([proposal_valid, gt_valid], dim=1)
    iou2 = batched_iou(proposals, gt_boxes).masked_fill(~gt_valid[:, None, :], -1.0)   # [N, P, G]
    best2, match2 = iou2.max(2)
    positive = proposal_valid & (best2 >= cfg.box_fg_iou)
    labels2 = torch.where(positive, 1, torch.where(proposal_valid, 0, -1))
    spos, sneg = balanced_sample(labels2, cfg.box_batch_per_clip, cfg.box_positive_fraction)
    chosen = spos | sneg
    clip_index, slot = chosen.nonzero(as_tuple=True)
    boxes = proposals[clip_index, slot]
    is_pos = spos[clip_index, slot]
    matched = match2[clip_index, slot]
    cls = torch.where(is_pos, gt_labels[clip_index, matched], 0)
    pos_rows = is_pos.nonzero(as_tuple=True)[0]
    targets = box_coder.encode_single(gt_boxes[clip_index[pos_rows], matched[pos_rows]], boxes[pos_rows])
    weight = 1.0 / (chosen.sum(1).clamp(min=1).to(dtype) * total_clips)    # per clip
    return BoxTargets(clip_index, boxes, cls, pos_rows, targets, weight)


def box_losses(logits: Tensor, codes: Tensor, targets: BoxTargets, binary: bool) -> tuple[Tensor, Tensor]:
    """``(classification loss, box loss)`` of the head's ``logits`` and ``codes`` on the
    sampled proposals of ``targets`` (binary head: BCE of "is the query match")."""
    cls, pos_rows = targets.labels, targets.pos_rows
    w = targets.clip_weight[targets.clip_index]
    if binary:
        cls_loss = F.binary_cross_entropy_with_logits(
            logits[:, 0], (cls == QUERY_MATCH).to(logits.dtype), reduction="none")
        pred = codes[:, 0]
    else:
        cls_loss = F.cross_entropy(logits, cls, reduction="none")
        pred = codes[torch.arange(codes.shape[0], device=codes.device), (cls - 1).clamp(min=0)]
    reg = F.smooth_l1_loss(pred[pos_rows], targets.box_targets, beta=1.0, reduction="none").sum(1)
    return (cls_loss * w).sum(), (reg * w[pos_rows]).sum()


def iou_loss(iou_logits: Tensor, codes: Tensor, targets: BoxTargets, gt_boxes: Tensor, gt_valid: Tensor,
             box_coder: BoxCoder, image_size: int) -> Tensor:
    """Localization-quality loss of the sampled proposals of ``targets``.

    The target of a proposal is the IoU of its refined query-match box (the last class of
    ``codes [K, nc, 4]``, detached) with the nearest valid GT box of its clip (``gt_boxes
    [N, G, 4]`` pixels, ``gt_valid [N, G]``; every annotated person), 0 without any; the loss is
    BCE-with-logits of ``iou_logits [K]`` against it, weighted per clip like :func:`box_losses`.
    The refined box is clipped to the ``image_size`` square, as in :func:`postprocess_detections`.
    """
    with torch.no_grad():
        refined = box_coder.decode_single(codes[:, -1].detach(), targets.boxes)          # [K, 4]
        refined = clip_boxes_to_image(refined, (image_size, image_size))
        target = iou_logits.new_zeros(iou_logits.shape[0])
        if gt_boxes.shape[1]:
            iou = batched_iou(refined[:, None, :], gt_boxes[targets.clip_index])[:, 0]     # [K, G]
            target = iou.masked_fill(~gt_valid[targets.clip_index], 0.0).amax(1).clamp(0.0, 1.0)
        target = target.to(iou_logits.dtype)
    w = targets.clip_weight[targets.clip_index]
    loss = F.binary_cross_entropy_with_logits(iou_logits, target, reduction="none")
    return (loss * w).sum()


def vote_boxes(kept: Tensor, kept_group: Tensor, boxes: Tensor, scores: Tensor, group: Tensor,
               iou_threshold: float) -> Tensor:
    """Box voting (Gidaris & Komodakis, ICCV 2015): each kept box ``kept [M, 4]`` becomes the
    score-weighted mean of the candidate ``boxes [K, 4]`` (``scores [K]``) of its own group (clip
    and class; ``kept_group [M]``, ``group [K]``) that overlap it with IoU >= ``iou_threshold``,
    itself included when it is among the candidates. Returns ``[M, 4]``; the scores are unchanged.
    """
    w = box_iou(kept, boxes) >= iou_threshold                                    # [M, K]
    w &= kept_group[:, None] == group[None, :]
    w = w.to(scores.dtype) * scores[None, :]
    total = w.sum(1, keepdim=True)
    voted = (w @ boxes) / total.clamp(min=torch.finfo(scores.dtype).tiny)
    return torch.where(total > 0, voted, kept)


@torch.no_grad()
def postprocess_detections(logits: Tensor, codes: Tensor, boxes: Tensor, clip_index: Tensor,
                           num_clips: int, binary: bool, box_coder: BoxCoder, cfg: Any,
                           image_size: int, iou_logits: Tensor | None = None,
                           clip_group: Tensor | None = None) -> list[Tensor]:
    """Detections ``[K, 5]`` (normalized xyxy + query-match score) for each of ``num_clips``
    clips from the head's outputs on proposals ``boxes [K, 4]`` pixels of clips ``clip_index``.

    With ``iou_logits [K]`` (the ``iou_head``'s output) the class probabilities are multiplied
    by ``sigmoid(iou_logits) ** cfg.det_iou_power`` before thresholding and NMS. With
    ``cfg.det_score_decay`` ("linear" / "gaussian") the candidates above the threshold are first
    decayed by the higher-scored ones of their clip and class that overlap them
    (:func:`stvr.model.ops.matrix_nms_decay`, Matrix NMS); the decayed scores are then
    NMS-ed, capped and output, while box voting still weighs its voters by the head's own
    probabilities (the decay changes the ranking, not where the kept boxes lie).

    Box voting (``cfg.det_box_voting > 0``) moves each kept box to the score-weighted mean of the
    candidates of its clip that overlap it (:func:`vote_boxes`); with ``cfg.det_box_voting_group``
    and ``clip_group [num_clips]`` (a group id per clip, e.g. the clips of a second), the voters
    come from every clip of its group: the group's mean box, which is where the one annotated box
    of a second lies when the actor moves steadily or oscillates about its path. NMS, the scores
    and which boxes are kept stay per clip."""
    size, n = image_size, num_clips
    k, nc = codes.shape[:2]
    if binary:
        scores = logits.sigmoid()                                   # [K, 1]
        match_class = 0
    else:
        scores = logits.softmax(-1)[:, 1:]                          # [K, 2] other, match
        match_class = 1
    if iou_logits is not None:
        scores = scores * iou_logits.sigmoid()[:, None].pow(cfg.det_iou_power)
    dec = box_coder.decode_single(codes.reshape(-1, 4), boxes.repeat_interleave(nc, 0))
    dec = clip_boxes_to_image(dec, (size, size))
    scores = scores.reshape(-1)
    cls = torch.arange(nc, device=logits.device).repeat(k)
    clip = clip_index.repeat_interleave(nc)
    keep = (scores > cfg.det_score_threshold).nonzero(as_tuple=True)[0]
    dec, scores, cls, clip = dec[keep], scores[keep], cls[keep], clip[keep]
    head_scores = scores                    # box voting weighs by these, not by the decayed scores
    decay = getattr(cfg, "det_score_decay", "none")
    if decay != "none":
        scores = scores * matrix_nms_decay(dec, scores, clip * nc + cls, decay, cfg.det_score_decay_sigma)
    keep = batched_nms(dec, scores, clip * nc + cls, cfg.det_nms_iou)           # score-descending
    keep = keep[rank_in_groups((clip * nc + cls)[keep]) < cfg.det_per_class]
    keep = keep[rank_in_groups(clip[keep]) < cfg.det_per_clip]
    keep = keep[cls[keep] == match_class]
    boxes_out = dec[keep]
    if cfg.det_box_voting > 0 and keep.numel():
        voters = cls == match_class                                   # the kept boxes' own class
        group = clip
        if clip_group is not None and getattr(cfg, "det_box_voting_group", False):
            group = clip_group.to(clip.device)[clip]
        boxes_out = vote_boxes(boxes_out, group[keep], dec[voters], head_scores[voters], group[voters],
                               cfg.det_box_voting)
        boxes_out = clip_boxes_to_image(boxes_out, (size, size))     # a mean can round past the edge
    out = torch.cat([boxes_out / size, scores[keep, None]], dim=1)
    order = torch.argsort(clip[keep], stable=True)
    counts = torch.bincount(clip[keep], minlength=n).tolist()
    return list(out[order].split(counts))
