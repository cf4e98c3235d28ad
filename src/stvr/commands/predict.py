"""``stvr predict``: detections for every pair of a pair file."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detections for every pair of a pair file",
                       description="Writes a detections JSON (API.md section 4: per pair, per "
                       "reference clip, [x1, y1, x2, y2, score] rows) for the pairs of "
                       "<data>/pairs/<split>.json or of --pairs.")
    p.add_argument("--checkpoint", required=True,
                   help="run folder (best, else last checkpoint) or a .safetensors file")
    p.add_argument("--data", required=True, help="dataset root (dataset.json, videos, cache)")
    p.add_argument("--split", default="test", help="pair split of the root (default: test)")
    p.add_argument("--pairs", help="a pair file to use instead of <data>/pairs/<split>.json "
                   "(anywhere; its videos are looked up in the --data root)")
    p.add_argument("--box-order", choices=("xyxy", "yxyx"), default="xyxy",
                   help="box order of --pairs: yxyx for the official STVR split files (default xyxy)")
    p.add_argument("--videos", help="video folder (default: the paths listed in <data>/dataset.json)")
    p.add_argument("--cache", help="clip cache folder (default: <data>/cache)")
    p.add_argument("--out", required=True, help="output detections JSON (an existing file is replaced)")
    p.add_argument("--max-failed", type=float, default=0.5, metavar="SHARE",
                   help="fail (exit 2, nothing written) when more than this share of the pairs cannot be "
                   "loaded (default 0.5; 0: any failure is an error; a run where every pair fails "
                   "is always an error)")
    p.add_argument("--batch-size", type=int, default=1, help="pairs per forward pass (default 1)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.det_*=VALUE",
                   help="change the detection post-processing of the checkpoint's config (repeatable; only "
                   "model.det_* fields: NMS, caps, score threshold, box voting, score decay), e.g. --set "
                   "model.det_box_voting_group=true; everything else is fixed by the trained weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.dataset import EvalPairDataset
    from ..data.pairs import load_pairs
    from ..data.video import ClipCache
    from ..predict import predict_pairs, save_detections
    from ..checkpoint import load_checkpoint
    from ..utils import resolve_device

    from ..guards import check_output
    from ..checkpoint import resolve_checkpoint
    from ..config import check_postprocessing_keys, postprocessing_overrides

    check_postprocessing_keys(args.overrides)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 <= args.max_failed <= 1:
        raise ValueError(f"--max-failed must be in [0, 1], got {args.max_failed}")
    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} does not exist (or is not a folder): give a dataset root "
                                f"written by `stvr data synth|ava|ucf24`")
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root / 'dataset.json'} does not exist: --data must be a dataset root")
    if not args.pairs and not (root / "pairs" / f"{args.split}.json").is_file():
        have = sorted(p.stem for p in (root / "pairs").glob("*.json")) if (root / "pairs").is_dir() else []
        raise ValueError(f"--split {args.split!r}: {root / 'pairs' / (args.split + '.json')} does not exist "
                         f"(splits of {root}: {', '.join(have) or 'none'})")
    weights, state_json = resolve_checkpoint(args.checkpoint)
    pair_file = Path(args.pairs) if args.pairs else root / "pairs" / f"{args.split}.json"
    check_output(args.out, "--out", inputs=[("--checkpoint", weights), ("--checkpoint", state_json),
                                             ("pair file", pair_file),
                                             ("--data", root / "dataset.json")])
    device = resolve_device(args.device)
    model, cfg, state = load_checkpoint(args.checkpoint, device=device)
    if args.overrides:
        cfg = postprocessing_overrides(cfg, args.overrides)
        model.cfg = cfg.model
    data_cfg = dataclasses.replace(cfg.data, root=str(root), videos=args.videos, cache=args.cache)
    cache = ClipCache(Path(args.cache) if args.cache else root / "cache", size=cfg.model.image_size,
                      fps=data_cfg.fps)
    pairs = None
    if args.pairs:
        if not Path(args.pairs).is_file():
            raise FileNotFoundError(f"pair file {args.pairs} does not exist")
        pairs = load_pairs(args.pairs, box_order=args.box_order)
    dataset = EvalPairDataset(root, split=args.split, image_size=cfg.model.image_size, cache=cache,
                              data_cfg=data_cfg, clip_frames=cfg.model.clip_frames, pairs=pairs)
    if len(dataset) == 0:
        raise ValueError(f"{pair_file}: no pairs to predict")
    failed: list[int] = []
    dets = predict_pairs(model, dataset, device=device, batch_size=args.batch_size,
                         num_workers=args.num_workers, progress=not args.quiet, failed=failed)
    if failed and (len(failed) == len(dataset) or len(failed) / len(dataset) > args.max_failed):
        import sys

        print(f"stvr predict: error: {len(failed)} of {len(dataset)} pairs could not be loaded "
              f"(more than --max-failed {args.max_failed:g}; e.g. pairs {failed[:10]}); no detections "
              f"written. Check the videos of {root} (--videos) and the messages above", file=sys.stderr)
        return 2
    save_detections(dets, args.out)
    n_clips = sum(len(p) for p in dets)
    n_dets = sum(len(c) for p in dets for c in p)
    print(f"wrote {args.out}: {len(dets)} pairs, {n_clips} clips, {n_dets} detections "
          f"(checkpoint step {state.get('step')})")
    if failed:
        print(f"warning: {len(failed)} pair(s) could not be loaded (no detections): {failed[:20]}")
    return 0
