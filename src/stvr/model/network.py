"""The module that composes the stages of the matching network (paper Fig. 5):
backbone, recurrent cell, :mod:`.query` crops, :mod:`.rpn`, :mod:`.roi_heads`.
See :mod:`stvr.model` for the data flow and the conventions."""

from __future__ import annotations

import logging

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder

from ..backbones import build_backbone
from ..config import ModelConfig
from ..data.batch import PairBatch
from .actions import ActionProbe
from .feature_cache import FeatureCache, gather_features
from .ops import pad_boxes
from .query import crop_features, crop_queries
from .roi_heads import BoxHead, QueryAttention, box_losses, box_targets, iou_loss, postprocess_detections
from .rpn import RPNHead, anchor_generator, grid_anchors, rpn_losses, rpn_proposals, rpn_targets

__all__ = ["STVRModel"]


log = logging.getLogger(__name__)

#: channels of the head's input per backbone channel, for each ``model.match_features``
MATCH_FEATURE_WIDTH = {"concat": 2, "similarity": 4, "compare": 3}


def fuse_features(proposal: Tensor, query: Tensor, kind: str = "concat",
                  proposal_mean: Tensor | None = None) -> Tensor:
    """The head's input from proposal features and attended query features (both ``[K, C, 7, 7]``).

    ``"concat"`` (the paper, Figure 5): ``[K, 2C, 7, 7]``. ``"similarity"``: the same plus, broadcast
    over the 7 x 7 cells, the product and the absolute difference of the two crops' spatial means
    (``[K, 4C, 7, 7]``): an explicit comparison of "what the proposal does" with "what the query
    does", in the form the pretrained backbone encodes it (linearly decodable from the crop mean).
    ``"compare"``: the proposal and that comparison only, without the query's own features
    (``[K, 3C, 7, 7]``): the head cannot name the query's label and check the proposal against
    it (which does not carry over to labels never trained on), only compare the two.
    ``proposal_mean`` ``[K, C, 1, 1]``: the proposal's crop mean to compare instead of
    ``proposal``'s (``model.match_source="backbone"``: the clip's own backbone features).
    """
    if kind not in MATCH_FEATURE_WIDTH:
        raise ValueError(f"unknown model.match_features {kind!r}; choose one of {sorted(MATCH_FEATURE_WIDTH)}")
    parts = [proposal] if kind == "compare" else [proposal, query]
    if kind in ("similarity", "compare"):
        mp = proposal.mean((2, 3), keepdim=True) if proposal_mean is None else proposal_mean
        mq = query.mean((2, 3), keepdim=True)
        sim = torch.cat([mp * mq, (mp - mq).abs()], dim=1)
        parts.append(sim.expand(-1, -1, *proposal.shape[-2:]))
    return torch.cat(parts, dim=1)


def clip_groups(pair: Tensor, time: Tensor, clips: int) -> Tensor:
    """Group id ``[N]`` (0, 1, ... in key order) of each clip: clips of the same pair (``pair [N]``)
    with the same ``time // clips`` (``time [N]``: clip index in its reference) share one."""
    if pair.numel() == 0:
        return pair.to(torch.long)
    clips = max(1, int(clips))
    key = pair.to(torch.long) * (int(time.max()) // clips + 1) + time.to(torch.long) // clips
    return torch.unique(key, return_inverse=True)[1]


def group_mean(maps: Tensor, pair: Tensor, time: Tensor, clips: int) -> Tensor:
    """Each of ``maps [N, ...]`` replaced by the mean of the maps of its group: the same pair
    (``pair [N]``) and the same ``time // clips`` (``time [N]``: clip index in its reference).
    ``clips=1`` returns ``maps`` itself."""
    if clips <= 1 or maps.shape[0] == 0:
        return maps
    group = clip_groups(pair, time, clips)
    n = int(group.max()) + 1
    sums = maps.new_zeros(n, *maps.shape[1:]).index_add_(0, group, maps)
    counts = torch.bincount(group, minlength=n).to(maps.dtype)
    return (sums / counts.view(-1, *[1] * (maps.dim() - 1)))[group]


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
        self.feature_size = cfg.image_size // cfg.feature_stride
        self.backbone_chunk = backbone_chunk
        self.rpn_pre_nms_top_n = rpn_pre_nms_top_n
        channels = cfg.backbone_channels
        self.backbone = build_backbone(cfg)
        # pretrained features kept as they are (no gradient, stored BN statistics); a backbone
        # without pretrained weights is always trained
        self.backbone_frozen = bool(cfg.freeze_backbone and getattr(self.backbone, "pretrained", False))
        if cfg.freeze_backbone and not self.backbone_frozen:
            log.warning("model.freeze_backbone is set but the backbone has no pretrained weights; "
                        "training it from its random initialization")
        if self.backbone_frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.cell = _build_cell(cfg)
        num_anchors = len(cfg.anchor_scales) * len(cfg.anchor_aspect_ratios)
        self.rpn = RPNHead(channels, cfg.rpn_channels, num_anchors)
        self.attention = QueryAttention(channels, cfg.attention_dim)
        fused = MATCH_FEATURE_WIDTH[cfg.match_features] * channels
        self.head = BoxHead(fused, cfg.head_mid_channels, cfg.head_out_channels,
                            cfg.head_blocks, binary=cfg.head == "binary", iou=cfg.iou_head,
                            cosine=cfg.match_cosine)
        # the action distance term of the match logit (.actions): fitted on the frozen backbone's features
        self.action_probe = None
        if cfg.match_action_distance == "auto":
            # the term where it can exist: training fills action_ids exactly when it fits the probe
            # (stvr.train.with_action_ids); a model built by hand without them has no term
            use_actions = self.backbone_frozen and bool(cfg.action_ids)
        else:
            use_actions = bool(cfg.match_action_distance)
        if use_actions:
            if not self.backbone_frozen:
                raise ValueError("model.match_action_distance needs a frozen pretrained backbone "
                                 "(model.freeze_backbone with backbone weights): the action probe is fitted "
                                 "once on its features")
            if not cfg.action_ids:
                raise ValueError("model.match_action_distance needs model.action_ids, the actions of its probe: "
                                 "training sets them from the training annotations (stvr.train.with_action_ids); "
                                 "to build the model by hand, give them (--set model.action_ids=1,2,3)")
            self.action_probe = ActionProbe(channels, len(cfg.action_ids), hidden=cfg.action_probe_hidden)
        self.box_coder = BoxCoder(tuple(float(w) for w in cfg.box_coder_weights))
        self.anchor_generator = anchor_generator(cfg)
        self.record_offsets = False
        self.feature_cache: FeatureCache | None = None
        self.last_offsets: list[Tensor] = []
        self.control_points: Tensor | None = None

    # ------------------------------------------------------------------ anchors
    def anchors(self, h: int, w: int, device: torch.device) -> Tensor:
        """``[h * w * A, 4]`` pixel anchors of an ``h x w`` map (stride S / h)."""
        return grid_anchors(self.anchor_generator, self.image_size, h, w, device)

    # ------------------------------------------------------------------ stages
    def train(self, mode: bool = True) -> "STVRModel":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def run_backbone(self, clips: Tensor) -> Tensor:
        """``[N, 3, T, S, S] -> [N, C, h, w]``, chunked when gradients are off."""
        if clips.shape[0] == 0:
            c, h = self.cfg.backbone_channels, self.feature_size
            return clips.new_zeros(0, c, h, h)
        if self.backbone_frozen:
            with torch.no_grad():
                return torch.cat([self.backbone(c) for c in clips.split(self.backbone_chunk)])
        if torch.is_grad_enabled() and self.training:
            return self.backbone(clips)
        return torch.cat([self.backbone(c) for c in clips.split(self.backbone_chunk)])

    def enable_feature_cache(self, max_mb: float) -> bool:
        """Keep the frozen backbone's maps of the clips seen (:mod:`.feature_cache`, up to
        ``max_mb`` MiB) for batches that name their clips (``PairBatch.clip_keys``).
        Returns False (and caches nothing) when the backbone is not frozen or ``max_mb <= 0``."""
        if not self.backbone_frozen or max_mb <= 0:
            self.feature_cache = None
            return False
        self.feature_cache = FeatureCache(int(max_mb * 2**20))
        return True

    def _batch_features(self, batch: PairBatch, pair_idx: Tensor, time_idx: Tensor) -> Tensor:
        """Backbone maps ``[Nq + Nr, C, h, w]`` of the query clips, then the real reference
        clips (pair-major, time order), in one backbone call or from the feature cache."""
        ref, nq = batch.reference_clips, batch.query_clips.shape[0]
        keys = batch.clip_keys
        if self.feature_cache is None or keys is None:     # (a cache exists only for a frozen backbone)
            return self.run_backbone(torch.cat([batch.query_clips, ref[pair_idx, time_idx]]))

        def compute(missing: list[int]) -> Tensor:
            m = torch.tensor(missing, dtype=torch.long, device=ref.device)
            q, r = m[m < nq], m[m >= nq] - nq
            return self.run_backbone(torch.cat([batch.query_clips.index_select(0, q),
                                                ref[pair_idx[r], time_idx[r]]]))

        return gather_features(self.feature_cache, keys, compute)

    def encode_query(self, query_clips: Tensor, query_boxes: Tensor) -> Tensor:
        """Query features ``[Nq, C, 7, 7]`` from clips ``[Nq, 3, T, S, S]`` and normalized boxes ``[Nq, 4]``."""
        return self._crop_queries(self.run_backbone(query_clips), query_boxes)

    def _crop_queries(self, features: Tensor, boxes: Tensor) -> Tensor:
        return crop_queries(features, boxes, self.cfg.roi_crop_size, mapping=self.cfg.roi_mapping,
                            image_size=self.image_size)

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
        from ..data.flow import sequence_flows

        return sequence_flows(clips, previous, self.feature_size)

    def _proposals(self, maps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """RPN on ``maps [N, C, h, w]``.

        Returns ``objectness [N, A]`` and ``deltas [N, A, 4]`` (for the loss),
        anchors ``[A, 4]``, proposals ``[N, P, 4]`` pixels (detached) and their
        validity ``[N, P]`` (P = max_proposals, sorted by objectness).
        """
        obj, deltas = self.rpn(maps)
        anchors = self.anchors(maps.shape[-2], maps.shape[-1], maps.device)
        proposals, valid = rpn_proposals(obj, deltas, anchors, self.box_coder, self.cfg, self.image_size,
                                         self.training, self.rpn_pre_nms_top_n)
        return obj, deltas, anchors, proposals, valid

    def _second_stage(self, maps: Tensor, boxes: Tensor, clip_index: Tensor, clip_pair: Tensor,
                      query_feats: Tensor, query_index: Tensor, compare_maps: Tensor | None,
                      cosine_maps: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Head on proposals ``boxes [K, 4]`` (pixels) of clips ``clip_index [K]`` of ``maps``.

        ``clip_pair [N]`` is the pair of each map. The proposal's side of the comparison with
        the attended query is its crop mean of ``compare_maps [N, C, h, w]`` (None: of ``maps``
        itself) in the similarity / compare features, and of ``cosine_maps`` in the match cosine
        (:meth:`_match_maps`) and the action distance (``model.match_action_distance``: against the
        mean of the crop means of all query clips of its pair). Returns logits, box codes and the
        localization-quality logits ``[K]`` (None without ``model.iou_head``).
        """
        cfg = self.cfg

        def crop(features: Tensor) -> Tensor:
            return crop_features(features, boxes / self.image_size, clip_index, cfg.roi_crop_size,
                                 mapping=cfg.roi_mapping, image_size=self.image_size)

        feats = crop(maps)
        attended = self.attention(feats, clip_pair[clip_index], query_feats, query_index)
        own_mean = None if compare_maps is None else crop(compare_maps).mean((2, 3), keepdim=True)
        fused = fuse_features(feats, attended, cfg.match_features, own_mean)
        logits, codes, iou = self.head.forward_with_iou(fused)
        if cfg.match_cosine or self.action_probe is not None:
            if own_mean is None or cosine_maps is not compare_maps:
                own_mean = crop(cosine_maps).mean((2, 3), keepdim=True)
        if cfg.match_cosine:
            cos = torch.cosine_similarity(own_mean.flatten(1), attended.mean((2, 3)), dim=1, eps=1e-6)
            logits = self.head.add_match_cosine(logits, cos)
        if self.action_probe is not None:
            q = query_feats.mean((2, 3))                                   # [Nq, C] -> per pair [B, C]
            n = int(query_index.max()) + 1
            query_mean = (q.new_zeros(n, q.shape[1]).index_add_(0, query_index, q)
                          / torch.bincount(query_index, minlength=n).to(q.dtype)[:, None])
            distance = self.action_probe.distance(own_mean.flatten(1), query_mean[clip_pair[clip_index]])
            logits = self.action_probe.add_to_match_logit(logits, distance)
        return logits, codes, iou

    def _match_maps(self, maps: Tensor, backbone_maps: Tensor, pair: Tensor,
                    time: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(compare_maps, cosine_maps)`` for :meth:`_second_stage` from the clips' maps after
        (``maps``) and before (``backbone_maps``) the recurrent cell, each ``[N, C, h, w]`` of pair
        ``pair [N]`` at clip ``time [N]`` of its reference: the maps of ``model.match_source``
        and the backbone's, each averaged over the clip's group of ``model.match_clips`` clips
        (:func:`group_mean`). Only what the head reads is computed: ``compare_maps`` is None
        with the concat features or for the propagated clip's own map, ``cosine_maps`` None
        without ``model.match_cosine`` and ``model.match_action_distance``."""
        cfg, clips = self.cfg, self.cfg.match_clips
        needs_backbone = cfg.match_cosine or self.action_probe is not None
        cosine_maps = group_mean(backbone_maps, pair, time, clips) if needs_backbone else None
        if cfg.match_features == "concat":
            return None, cosine_maps
        if cfg.match_source == "backbone":
            return (group_mean(backbone_maps, pair, time, clips) if cosine_maps is None else cosine_maps), cosine_maps
        return (group_mean(maps, pair, time, clips) if clips > 1 else None), cosine_maps

    # ------------------------------------------------------------------ forward
    def forward(self, batch: PairBatch) -> dict[str, Tensor] | list[list[Tensor]]:
        """Training: dict of scalar losses ``rpn_objectness``, ``rpn_box``,
        ``box_classifier``, ``box_reg`` (unweighted), ``box_iou`` with ``model.iou_head``, and
        ``loss`` (weighted total).

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
        feats = self._batch_features(batch, pair_idx, time_idx)
        query_feats = self._crop_queries(feats[:nq], batch.query_boxes)
        grid = feats.new_zeros(b, steps, *feats.shape[1:])
        grid[pair_idx, time_idx] = feats[nq:]
        flows = self.cell_flows(ref[:, :steps], None,
                                None if batch.flows is None else batch.flows[:, :steps])
        if self.record_offsets:
            self.last_offsets = []
        maps, _ = self.propagate(grid, None, flows)
        maps = maps[pair_idx, time_idx]                           # [N, C, h, w] real clips
        backbone_maps = feats[nq:]                                # the same clips before the cell
        compare_maps, cosine_maps = self._match_maps(maps, backbone_maps, pair_idx, time_idx)
        query_index = batch.query_index.to(device=maps.device, dtype=torch.long)
        if not self.training:
            dets = self._detect(maps, pair_idx, query_feats, query_index, compare_maps, cosine_maps, time_idx)
            counts = lengths.tolist()
            out, start = [], 0
            for c in counts:
                out.append(dets[start:start + c])
                start += c
            return out
        gt_boxes = [batch.gt_boxes[int(i)][int(t)] for i, t in zip(pair_idx.tolist(), time_idx.tolist())]
        gt_labels = [batch.gt_labels[int(i)][int(t)] for i, t in zip(pair_idx.tolist(), time_idx.tolist())]
        return self._losses(maps, pair_idx, query_feats, query_index, gt_boxes, gt_labels,
                            total_clips=b * max(length, batch.loss_clips or 0), compare_maps=compare_maps,
                            cosine_maps=cosine_maps)

    def _losses(self, maps: Tensor, clip_pair: Tensor, query_feats: Tensor, query_index: Tensor,
                gt_boxes: list[Tensor], gt_labels: list[Tensor], total_clips: int,
                compare_maps: Tensor | None, cosine_maps: Tensor | None) -> dict[str, Tensor]:
        """The loss dict of the real clips' ``maps [N, C, h, w]`` (pair ``clip_pair [N]``;
        ``compare_maps``, ``cosine_maps`` as in :meth:`_second_stage`) with their ground truth:
        the RPN's (:mod:`.rpn`) and the matching head's (:mod:`.roi_heads`)."""
        cfg = self.cfg
        gtb, gtl, gtv = pad_boxes(gt_boxes, gt_labels, maps.device)
        gtb = gtb * self.image_size
        obj, deltas, anchors, proposals, pvalid = self._proposals(maps)
        rpn_t = rpn_targets(gtb, gtv, anchors, self.box_coder, cfg, self.image_size, maps.dtype)
        rpn_obj, rpn_box = rpn_losses(obj, deltas, rpn_t)
        box_t = box_targets(proposals, pvalid, gtb, gtl, gtv, self.box_coder, cfg, total_clips, maps.dtype)
        logits, codes, iou_logits = self._second_stage(maps, box_t.boxes, box_t.clip_index, clip_pair,
                                                       query_feats, query_index, compare_maps, cosine_maps)
        box_cls, box_reg = box_losses(logits, codes, box_t, self.head.binary)
        total = (cfg.rpn_obj_weight * rpn_obj + cfg.rpn_loc_weight * rpn_box
                 + cfg.box_cls_weight * box_cls + cfg.box_loc_weight * box_reg)
        out = {"rpn_objectness": rpn_obj, "rpn_box": rpn_box, "box_classifier": box_cls, "box_reg": box_reg}
        if iou_logits is not None:
            out["box_iou"] = iou_loss(iou_logits, codes, box_t, gtb, gtv, self.box_coder, self.image_size)
            total = total + cfg.iou_loss_weight * out["box_iou"]
        out["loss"] = total
        return out

    @torch.no_grad()
    def _detect(self, maps: Tensor, clip_pair: Tensor, query_feats: Tensor, query_index: Tensor,
                compare_maps: Tensor | None, cosine_maps: Tensor | None, clip_time: Tensor) -> list[Tensor]:
        """Detections ``[K, 5]`` (normalized xyxy + query-match score) for each map of ``maps [N, C, h, w]``
        of pair ``clip_pair [N]`` at clip ``clip_time [N]`` of its reference (``compare_maps``,
        ``cosine_maps``: as in :meth:`_second_stage`; the groups of ``model.match_clips`` clips also
        pool the box voting with ``model.det_box_voting_group``)."""
        _, _, _, proposals, pvalid = self._proposals(maps)
        clip_index, slot = pvalid.nonzero(as_tuple=True)
        boxes = proposals[clip_index, slot]
        logits, codes, iou_logits = self._second_stage(maps, boxes, clip_index, clip_pair, query_feats,
                                                       query_index, compare_maps, cosine_maps)
        groups = clip_groups(clip_pair, clip_time, self.cfg.match_clips) if self.cfg.det_box_voting_group else None
        return postprocess_detections(logits, codes, boxes, clip_index, maps.shape[0], self.head.binary,
                                      self.box_coder, self.cfg, self.image_size, iou_logits, groups)

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
            The state is a dict ``{"cell": cell state, "previous_clip": last clip,
            "clips": clips seen so far}``.

        The groups of ``model.match_clips`` clips are counted from the first clip of the
        stream, and a group is averaged over its clips in the chunk: chunks of a multiple of
        ``match_clips`` clips give exactly the detections of one batch forward.
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
        seen = int(state.get("clips", 0))
        time = torch.arange(seen, seen + maps.shape[0], device=maps.device)
        compare_maps, cosine_maps = self._match_maps(maps, feats[0], pairs, time)
        dets = self._detect(maps, pairs, query_features, qidx, compare_maps, cosine_maps, time)
        return dets, {"cell": cell_state, "previous_clip": reference_clips[-1], "clips": seen + maps.shape[0]}

    def stage_modules(self) -> dict[str, nn.Module | None]:
        """The stages whose parameters ``stvr model info`` counts."""
        return {"backbone": self.backbone, "cell": self.cell, "rpn": self.rpn,
                "attention": self.attention, "head": self.head}


def _build_cell(cfg: ModelConfig) -> nn.Module | None:
    """The recurrent cell of ``cfg.cell`` (None for ``"none"``, the Clip baseline)."""
    if cfg.cell == "none":
        return None
    from ..recurrent import build_cell, cell_options

    if cfg.cell not in ("warp", "conv", "traj", "flow"):
        raise ValueError(f"unknown model.cell {cfg.cell!r}")
    c = cfg.backbone_channels
    return build_cell(cfg.cell, c, c, **cell_options(cfg, cfg.cell))
