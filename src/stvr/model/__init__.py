"""The matching network of the paper's Figure 5 (reference-facts.md sections 4 and 6).

::

    query clips  --backbone--> [Nq, C, h, w] --crop(query box)--> f_q [Nq, C, 7, 7]
    reference    --backbone--> [B, L, C, h, w] --cell over L--> [B, L, C, h, w]
                 --RPN--> <= max_proposals boxes per clip --crop--> f_p [K, C, 7, 7]
    attention (Eq. 10) of every proposal over the query clips of its pair --> fbar_q [K, C, 7, 7]
    concat [f_p, fbar_q] --> head (ResNet bottlenecks) --> 3 logits + 2x4 box codes

Conventions: boxes enter and leave normalized ``[x1, y1, x2, y2]`` in [0, 1];
inside, proposals, anchors and box codes are in pixels of the S x S input.
Feature maps have size h = w = S / model.feature_stride (16, as the official I3D Mixed_4c; 8 is
an option of the tiny backbone).

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
* **Match terms not in the paper** (cpu preset / options): ``match_cosine`` adds
  ``s * cos`` of the backbone crop means of proposal and attended query to the match logit;
  ``match_action_distance`` subtracts ``s * L1`` between the action probabilities of the
  proposal and of the query's mean crop, read by a linear probe fitted on the training
  actors before training (:mod:`.actions`; ``"auto"``, the cpu preset's value: built when the
  backbone is frozen and pretrained and ``action_ids`` are given, which training fills in).
* **Post-processing** (section 4.7): softmax, class-specific decoding, clipping
  to the image, per-class NMS 0.6, 15 per class, 30 per clip; only the
  query-match class is returned. Options not in the paper (the cpu preset's: NMS 0.4, box
  voting over the clips of a second, and ``det_score_decay="linear"``: a Matrix-NMS decay of the
  scores of candidates that overlap a higher-scored one, :func:`.ops.matrix_nms_decay`).
"""

from __future__ import annotations

# the stages, as torchvision's detection package: query.py (query crops), rpn.py (RPN head,
# anchors, proposals, its targets and losses), roi_heads.py (attention, box head, its targets
# and losses, post-processing), network.py (STVRModel composing them), ops.py (box ops),
# actions.py (the action distance term of the match logit, model.match_action_distance),
# feature_cache.py (the frozen backbone's maps of seen clips)
from .network import STVRModel, _build_cell  # noqa: F401
from .ops import balanced_sample, batched_iou, matrix_nms_decay, pad_boxes, rank_in_groups  # noqa: F401
from .query import crop_features, crop_queries  # noqa: F401
from .roi_heads import Bottleneck, BoxHead, FixedBatchNorm2d, QueryAttention  # noqa: F401
from .rpn import RPNHead  # noqa: F401

# the old private names of the single-file model, kept importable
_batched_iou = batched_iou
_rank_in_groups = rank_in_groups
_sample = balanced_sample
_pad_boxes = pad_boxes

__all__ = ["STVRModel", "crop_features", "QueryAttention", "BoxHead", "RPNHead"]
