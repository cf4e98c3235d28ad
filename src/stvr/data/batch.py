"""The batch that flows from ``stvr.data.dataset`` into ``stvr.model`` and ``stvr.train``.

One batch holds B query/reference pairs. Query clips of all pairs are stacked
along one axis (queries have different lengths) and ``query_index`` says which
pair each query clip belongs to; reference clips are padded to the longest
reference of the batch and ``reference_mask`` marks the real clips. Padded
clips are zeros and always come at the end of a reference, so a causal
recurrent cell never sees them before a real clip.

Boxes are normalized ``[x1, y1, x2, y2]`` in [0, 1] (the project's file
convention); the model converts them to pixels internally.

Ground-truth labels of reference boxes: ``1`` = another person (a different
combined label), ``2`` = matches the query (reference-facts.md 3.2; 0 is the
background class of the detector and never appears as a target).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

OTHER_PERSON = 1
QUERY_MATCH = 2


@dataclass
class PairBatch:
    """A collated batch of B pairs.

    Attributes:
        query_clips: ``[Nq, 3, T, S, S]`` float32 in [-1, 1]; all query clips of
            all pairs, pair by pair, in time order.
        query_boxes: ``[Nq, 4]`` normalized xyxy, the query actor's box in each clip.
        query_index: ``[Nq]`` int64, the pair (0..B-1) each query clip belongs to.
        reference_clips: ``[B, L, 3, T, S, S]`` float32 in [-1, 1], zero-padded.
        reference_mask: ``[B, L]`` bool, True for real clips.
        gt_boxes: per pair, per reference clip (L entries, padded clips empty):
            ``[n, 4]`` normalized xyxy float32.
        gt_labels: same nesting, ``[n]`` int64 in {1 (other person), 2 (query match)}.
        pair_ids: the index of each pair in its source pair list / sampler.
        flows: optional ``[B, L, h, w, 2]`` optical flow at feature resolution
            (dy, dx in feature cells, motion from clip t-1 to clip t) for the
            ``flow`` cell; ``None`` when not computed (the model then computes them,
            :meth:`stvr.model.STVRModel.cell_flows`).
        loss_clips: number of clips per pair that the second-stage loss is
            normalized by (the official code pads every training reference to
            ``reference_seconds * 3`` clips and divides by ``B * 6``); ``None``
            means L. Padded clips are never run through the network for it.
        clip_keys: optional identity of every clip the backbone reads, in its order: the
            ``Nq`` query clips, then the real reference clips pair by pair in time order;
            a key is ``(video id, second, clip of the second, flipped)`` (hashable; None
            for a clip without one). A model with a frozen backbone and a feature cache
            (:meth:`stvr.model.STVRModel.enable_feature_cache`) reuses the maps of known keys.
        failures: ``(dataset index, error)`` of every sample that failed to load
            on the way to this batch (replaced or dropped; index -1 when unknown).
            It travels with the batch so the main process counts failures that
            happened in DataLoader workers, whose copies of the dataset (and of
            its ``failures`` list) the main process never sees.
    """

    query_clips: Tensor
    query_boxes: Tensor
    query_index: Tensor
    reference_clips: Tensor
    reference_mask: Tensor
    gt_boxes: list[list[Tensor]]
    gt_labels: list[list[Tensor]]
    pair_ids: list[int] = field(default_factory=list)
    flows: Tensor | None = None
    loss_clips: int | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)
    clip_keys: list | None = None

    @property
    def batch_size(self) -> int:
        return int(self.reference_clips.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        """Copy of the batch with every tensor moved to ``device``."""
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PairBatch(
            query_clips=mv(self.query_clips),
            query_boxes=mv(self.query_boxes),
            query_index=mv(self.query_index),
            reference_clips=mv(self.reference_clips),
            reference_mask=mv(self.reference_mask),
            gt_boxes=[[mv(b) for b in clips] for clips in self.gt_boxes],
            gt_labels=[[mv(b) for b in clips] for clips in self.gt_labels],
            pair_ids=list(self.pair_ids),
            flows=None if self.flows is None else mv(self.flows),
            loss_clips=self.loss_clips,
            failures=list(self.failures),
            clip_keys=None if self.clip_keys is None else list(self.clip_keys),
        )

    def pin_memory(self) -> "PairBatch":
        """Pinned-memory copy (DataLoader ``pin_memory=True`` calls this)."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return PairBatch(
            query_clips=pin(self.query_clips),
            query_boxes=pin(self.query_boxes),
            query_index=pin(self.query_index),
            reference_clips=pin(self.reference_clips),
            reference_mask=pin(self.reference_mask),
            gt_boxes=[[pin(b) for b in clips] for clips in self.gt_boxes],
            gt_labels=[[pin(b) for b in clips] for clips in self.gt_labels],
            pair_ids=list(self.pair_ids),
            flows=None if self.flows is None else pin(self.flows),
            loss_clips=self.loss_clips,
            failures=list(self.failures),
            clip_keys=None if self.clip_keys is None else list(self.clip_keys),
        )
