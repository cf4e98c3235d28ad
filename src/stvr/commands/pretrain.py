"""``stvr pretrain``: pretrain the tiny backbone to name the actions of annotated actors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .train import add_config_arguments

    p = sub.add_parser(
        "pretrain", help="pretrain the cpu preset's backbone on a dataset root's training actors",
        description="The analogue of the paper's Kinetics pretraining for the tiny backbone: every annotated "
        "person of the training videos is a sample (an 8-frame clip, its box, its set of action ids); the "
        "backbone's map is cropped at the box as the matching network crops the query and a linear layer "
        "names the actions (multi-label). Writes the backbone's weights as .safetensors; use them with "
        "--set model.backbone_weights=FILE (the cpu preset's default, 'builtin', is such a file shipped "
        "with the package).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--data", required=True, help="dataset root (annotations/train.csv; val.csv for AUCs)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (replaced if it exists)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="actor clips per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--init", metavar="FILE", help="continue from these backbone weights (.safetensors of an "
                   "earlier `stvr pretrain`) instead of a random initialization")
    p.add_argument("--seed", type=int, default=0, help="initialization and sampling seed")
    p.add_argument("--color-augment", action="store_true", help="recolour each training clip at random "
                   "(channel permutation, inversion, contrast; the same in all its frames)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import pretrain_backbone
    from .train import config_from_args

    for name, v in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    from ..guards import check_input_file, check_output

    check_output(args.out, "--out", extensions=[".safetensors"], inputs=[("--data", args.data)])
    if not (Path(args.data) / "annotations" / "train.csv").is_file():
        raise ValueError(f"--data {args.data}: no annotations/train.csv (a dataset root written by `stvr data ...`)")
    cfg = config_from_args(args)
    if cfg.model.backbone != "tiny":
        raise ValueError("stvr pretrain trains the tiny backbone (the paper preset starts from Kinetics I3D "
                         "weights: model.i3d_weights)")
    # pretraining starts from a random initialization, or from --init
    cfg.model.backbone_weights = str(check_input_file(args.init, "--init")) if args.init else None
    summary = pretrain_backbone(args.data, cfg.model, args.out, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, seed=args.seed, workers=args.workers, device=args.device,
                                progress=not args.quiet, color_augment=args.color_augment,
                                recipe=_recipe(args))
    print(json.dumps(summary, indent=2))
    return 0


def _recipe(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (stored in the weights' metadata)."""
    import shlex

    words = ["stvr", "pretrain", "--data", str(args.data), "--out", str(args.out), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}", "--seed", str(args.seed)]
    if args.preset != "cpu":
        words += ["--preset", args.preset]
    for o in args.overrides:
        words += ["--set", o]
    if args.init:
        words += ["--init", str(args.init)]
    if args.color_augment:
        words.append("--color-augment")
    return " ".join(shlex.quote(w) for w in words)
