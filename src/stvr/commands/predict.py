"""``stvr predict``: detections for every pair of a pair file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detections for every pair of a pair file",
                       description="Writes a detections JSON (API.md section 4) for the pairs "
                       "of <data>/pairs/<split>.json or of --pairs.")
    p.add_argument("--checkpoint", required=True,
                   help="run folder (best, else last checkpoint) or a .safetensors file")
    p.add_argument("--data", required=True, help="dataset root (videos, cache)")
    p.add_argument("--split", default="test", help="pair split of the root (default: test)")
    p.add_argument("--pairs", help="a pair file to use instead of <data>/pairs/<split>.json")
    p.add_argument("--out", required=True, help="output detections JSON")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.dataset import EvalPairDataset
    from ..data.video import ClipCache
    from ..predict import predict_pairs, save_detections
    from ..train import load_checkpoint

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    model, cfg, state = load_checkpoint(args.checkpoint, device=device)
    root = Path(args.data)
    cache = ClipCache(root / "cache", size=cfg.model.image_size, fps=cfg.data.fps)
    source = Path(args.pairs) if args.pairs else root
    dataset = EvalPairDataset(source, split=args.split, image_size=cfg.model.image_size,
                              cache=cache)
    dets = predict_pairs(model, dataset, device=device, batch_size=args.batch_size)
    save_detections(dets, args.out)
    n_clips = sum(len(p) for p in dets)
    n_dets = sum(len(c) for p in dets for c in p)
    print(f"wrote {args.out}: {len(dets)} pairs, {n_clips} clips, {n_dets} detections "
          f"(checkpoint step {state.get('step')})")
    return 0
