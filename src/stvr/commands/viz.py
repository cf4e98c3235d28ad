"""``stvr viz``: the paper's figures and training curves as PNG files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz", help="figures: warped grids, results, label distribution, curves",
                       description="Write the paper's figures (PNG) from checkpoints, videos, pair and "
                       "detection files, dataset roots and run folders.")
    vsub = p.add_subparsers(dest="viz_command", metavar="FIGURE")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    w = vsub.add_parser("warp-grid", help="Figure 7: the warp cell's warped grid over consecutive clips")
    w.add_argument("--checkpoint", required=True, help="run folder or .safetensors of a warp-cell model")
    w.add_argument("--video", required=True, help="video to run through the model")
    w.add_argument("--start", type=float, default=0.0, help="first clip's time (s)")
    w.add_argument("--clips", type=int, default=6, help="warped clips to show (default 6)")
    w.add_argument("--columns", type=int, help="panels per row (default: one row)")
    w.add_argument("--device", default="auto")
    w.add_argument("--out", default="warp_grid.png")
    w.set_defaults(func=run_warp_grid)

    r = vsub.add_parser("results", help="Figure 8: query and reference strips with ground truth "
                        "and each method's top box")
    r.add_argument("--pairs", required=True, help="pair file (JSON)")
    r.add_argument("--pair", type=int, default=0, help="index of the pair in the file")
    r.add_argument("--detections", action="append", required=True, metavar="NAME=FILE",
                   help="detections file of a method (repeat for several methods)")
    r.add_argument("--data", help="dataset root (default: the pair file's ../..)")
    r.add_argument("--query-frames", type=int, default=4)
    r.add_argument("--reference-frames", type=int, default=6)
    r.add_argument("--out", default="results.png")
    r.set_defaults(func=run_results)

    lab = vsub.add_parser("labels", help="Figure 6: samples per combined label per split")
    lab.add_argument("source", help="dataset root (with stats.json) or a stats.json file")
    lab.add_argument("--max-train-labels", type=int, default=40)
    lab.add_argument("--linear", action="store_true", help="linear instead of log y axis")
    lab.add_argument("--out", default="labels.png")
    lab.set_defaults(func=run_labels)

    c = vsub.add_parser("curves", help="training curves of run folders (train_log.csv, val_log.csv)")
    c.add_argument("runs", nargs="+", help="run folders")
    c.add_argument("--labels", nargs="+", help="a name per run (default: folder names)")
    c.add_argument("--out", default="curves.png")
    c.set_defaults(func=run_curves)


def _guard(fn):
    def wrapped(args: argparse.Namespace) -> int:
        try:
            out = fn(args)
        except (FileNotFoundError, ValueError) as err:
            print(f"stvr viz {args.viz_command}: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    return wrapped


@_guard
def run_warp_grid(args: argparse.Namespace) -> Path:
    from ..checkpoint import load_checkpoint
    from ..utils import resolve_device
    from ..viz import figure_warp_grid

    if args.clips < 1:
        raise ValueError("--clips must be >= 1")
    device = resolve_device(args.device)
    model, _, _ = load_checkpoint(args.checkpoint, device=device)
    if model.cfg.cell != "warp":
        raise ValueError(f"{args.checkpoint}: the model's cell is {model.cfg.cell!r}; the warped grid "
                         "needs a warp-cell model")
    return figure_warp_grid(model, args.video, args.out, start=args.start, num_clips=args.clips,
                            device=device, columns=args.columns)


@_guard
def run_results(args: argparse.Namespace) -> Path:
    from ..viz import figure_results

    dets = {}
    for spec in args.detections:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ValueError(f"--detections {spec!r}: expected NAME=FILE")
        dets[name] = path
    return figure_results(args.pairs, args.pair, dets, args.out, root=args.data,
                          max_query=args.query_frames, max_reference=args.reference_frames)


@_guard
def run_labels(args: argparse.Namespace) -> Path:
    from ..viz import figure_labels

    return figure_labels(args.source, args.out, max_train_labels=args.max_train_labels,
                         log_scale=not args.linear)


@_guard
def run_curves(args: argparse.Namespace) -> Path:
    from ..viz import figure_curves

    return figure_curves(args.runs, args.out, labels=args.labels)
