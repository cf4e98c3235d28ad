"""``stvr model info``: configuration summary, parameters and FLOPs per stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..config import ModelConfig, apply_overrides, preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect the matching network")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    info = msub.add_parser("info", help="config summary, parameter counts and FLOPs per stage",
                           description="Build the model of a preset (random weights) and print "
                           "its configuration, parameters per stage and FLOPs per reference clip.")
    info.add_argument("--preset", choices=("paper", "cpu"), default="cpu",
                      help="configuration preset (default: %(default)s)")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set model.cell=conv (repeatable)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    info.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_summary(cfg: ModelConfig, flops: bool = True, query_clips: int = 3) -> dict[str, Any]:
    """Parameters per stage and FLOPs per reference clip of the model of ``cfg``.

    FLOPs (multiply-add = 2 FLOPs, as ``torch.utils.flop_counter`` counts) are for
    one clip: ``backbone`` (one clip), ``cell`` (one step with a state), ``rpn``
    (one map incl. proposal decoding), ``attention`` (RoI crops + Eq. 10 for
    ``max_proposals`` proposals over ``query_clips`` query clips) and ``head``
    (second stage on ``max_proposals`` proposals).
    """
    import torch

    from ..model import STVRModel, crop_features

    cfg = dataclasses.replace(cfg, i3d_weights=None)
    torch.manual_seed(0)
    model = STVRModel(cfg).eval()
    stages = model.stage_modules()
    params = {name: (sum(p.numel() for p in m.parameters()) if m is not None else 0)
              for name, m in stages.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "feature_map": [cfg.backbone_channels, model.feature_size, model.feature_size],
        "anchors_per_clip": model.feature_size ** 2 * len(cfg.anchor_scales) * len(cfg.anchor_aspect_ratios),
        "parameters": {**params, "total": sum(params.values()), "trainable": trainable},
    }
    if not flops:
        return out
    s, c, h, p = cfg.image_size, cfg.backbone_channels, model.feature_size, cfg.max_proposals
    clip = torch.zeros(1, 3, cfg.clip_frames, s, s)
    fmap = torch.randn(1, c, h, h)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]]).repeat(p, 1)
    idx = torch.zeros(p, dtype=torch.long)
    query = torch.randn(query_clips, c, 7, 7)
    from ..model.network import fuse_features

    counts: dict[str, int] = {}
    with torch.no_grad():
        counts["backbone"] = _flops(lambda: model.backbone(clip))
        if model.cell is not None:
            context = {"flow": torch.zeros(1, h, h, 2)}    # read by the flow cell, ignored by the others
            _, state = model.cell(fmap, None, context)
            counts["cell"] = _flops(lambda: model.cell(fmap, state, context))
        else:
            counts["cell"] = 0
        counts["rpn"] = _flops(lambda: model._proposals(fmap))
        feats = crop_features(fmap, boxes, idx, cfg.roi_crop_size)
        counts["attention"] = _flops(lambda: model.attention(
            crop_features(fmap, boxes, idx, cfg.roi_crop_size), idx,
            query, torch.zeros(query_clips, dtype=torch.long)))
        fused = fuse_features(feats, feats, cfg.match_features)
        counts["head"] = _flops(lambda: model.head(fused))
    counts["total"] = sum(counts.values())
    out["flops_per_clip"] = counts
    return out


def _fmt(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f}{unit}"
    return str(int(n))


def run_info(args: argparse.Namespace) -> int:
    try:
        cfg = apply_overrides(preset(args.preset), args.overrides)
        summary = model_summary(cfg.model, flops=not args.no_flops)
    except ValueError as err:
        print(f"stvr model info: {err}")
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    m = cfg.model
    print(f"preset {args.preset}: backbone={m.backbone} image={m.image_size}x{m.image_size}x{m.clip_frames} "
          f"cell={m.cell} head={m.head}")
    fm = summary["feature_map"]
    print(f"feature map per clip: {fm[0]}x{fm[1]}x{fm[2]}; anchors per clip: {summary['anchors_per_clip']}; "
          f"proposals per clip: {m.max_proposals}")
    flops = summary.get("flops_per_clip", {})
    print(f"{'stage':<10} {'params':>10} {'GFLOPs/clip':>12}")
    for name in ("backbone", "cell", "rpn", "attention", "head", "total"):
        n = summary["parameters"][name]
        f = f"{flops[name] / 1e9:12.3f}" if name in flops else f"{'-':>12}"
        print(f"{name:<10} {_fmt(n):>10} {f}")
    print(f"trainable parameters: {_fmt(summary['parameters']['trainable'])}")
    return 0
