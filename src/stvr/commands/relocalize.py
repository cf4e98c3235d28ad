"""``stvr relocalize``: find where and when the query's action happens in a reference video."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_RUN = Path("runs") / "demo"
NO_CHECKPOINT = ("no checkpoint given and no trained demo model under {where}; "
                 "train one with `make demo` or `stvr train`, or pass --checkpoint")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relocalize", help="find the tubelets of a reference video that match a query",
        description="Query: a video span with a box on the actor (one box held for the whole span, "
        "or a box per second from a JSON/CSV file; normalized or pixel coordinates). "
        "Writes the matching tubelets of the reference as JSON (times in seconds and frame "
        "indices of the reference, boxes normalized and in pixels, scores) and optionally "
        "the reference with the tubelets drawn. The reference is processed clip by clip.")
    q = p.add_argument_group("query")
    q.add_argument("--query", required=True, help="query video (any container/codec PyAV reads)")
    boxes = q.add_mutually_exclusive_group(required=True)
    boxes.add_argument("--query-box", metavar="X1,Y1,X2,Y2",
                       help="box on the actor, normalized [0, 1] or pixels, held for the whole span")
    boxes.add_argument("--query-boxes", metavar="FILE",
                       help="boxes per second: JSON [{\"time\": t, \"box\": [x1,y1,x2,y2]}, ...] or "
                       "CSV rows time,x1,y1,x2,y2 (times in seconds of the query video)")
    q.add_argument("--query-box-time", type=float, metavar="T",
                   help="time (s) at which --query-box was drawn (must lie in the query span)")
    q.add_argument("--box-units", choices=("auto", "normalized", "pixels", "norm", "px"), default="auto",
                   help="units of the query boxes: norm(alized) [0, 1] or px (pixels); auto: pixels "
                   "when a coordinate exceeds 1, else normalized. Boxes under 2 px a side are refused")
    q.add_argument("--query-start", type=float, metavar="S", help="query span start (s; default 0)")
    q.add_argument("--query-end", type=float, metavar="S", help="query span end (s; default: the end)")
    r = p.add_argument_group("reference")
    r.add_argument("--reference", required=True, help="reference video to search")
    r.add_argument("--reference-start", type=float, metavar="S")
    r.add_argument("--reference-end", type=float, metavar="S")
    p.add_argument("--checkpoint", help=f"run folder or .safetensors (default: the demo's model in {DEMO_RUN}/)")
    p.add_argument("--out", default="tubelets.json",
                   help="tubelets JSON (default: tubelets.json; an existing file is replaced)")
    p.add_argument("--render", metavar="OUT.mp4", help="also write the reference with the tubelets drawn "
                   "(.mp4, .mkv, .mov, .m4v, .avi or .webm; an existing file is replaced)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--top-k", type=int, default=10, help="keep the K best tubelets (default 10; 0 = all)")
    p.add_argument("--min-length", type=int, default=3, help="shortest tubelet in clips (3 clips = 1 s)")
    p.add_argument("--link-iou", type=float, default=0.3, help="IoU to link boxes of consecutive clips")
    p.add_argument("--max-gap", type=int, default=2, help="clips a tubelet may skip")
    p.add_argument("--score-threshold", type=float, default=0.0, help="ignore detections below this score")
    p.add_argument("--chunk-clips", type=int, default=12, help="reference clips processed per step")
    p.add_argument("--detections", action="store_true", help="also store the per-clip detections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.det_*=VALUE",
                   help="change the detection post-processing of the checkpoint's config (repeatable; only "
                   "model.det_* fields: NMS, caps, score threshold, box voting, score decay)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def default_checkpoint(run_dir: Path = DEMO_RUN) -> Path:
    """The demo's trained checkpoint: ``runs/demo`` (best, else last), else the
    first of its sub-folders that holds one (``warp`` first). FileNotFoundError
    with instructions when there is none."""
    from ..checkpoint import resolve_checkpoint

    candidates = [run_dir]
    if run_dir.is_dir():
        subs = sorted(d for d in run_dir.iterdir() if d.is_dir())
        candidates += sorted(subs, key=lambda d: (d.name != "warp", d.name))
    for c in candidates:
        try:
            return resolve_checkpoint(c)[0]
        except FileNotFoundError:
            continue
    raise FileNotFoundError(NO_CHECKPOINT.format(where=f"{run_dir}/"))


def check_arguments(args: argparse.Namespace, ckpt: Path) -> None:
    """Everything that can be checked before the work (issue 12): option ranges, and
    outputs that are not inputs, not each other, not directories, in a writable
    folder, with a known video container."""
    from ..guards import check_distinct, check_output
    from ..relocalize import RENDER_EXTENSIONS, check_link_parameters
    from ..checkpoint import resolve_checkpoint
    from ..config import check_postprocessing_keys

    check_postprocessing_keys(args.overrides)
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = all), got {args.top_k}")
    if args.chunk_clips < 1:
        raise ValueError(f"--chunk-clips must be >= 1, got {args.chunk_clips}")
    check_link_parameters(link_iou=args.link_iou, score_threshold=args.score_threshold,
                          top_k=args.top_k or None, max_gap=args.max_gap, min_length=args.min_length)
    weights, state_json = resolve_checkpoint(ckpt)
    inputs = [("--query", args.query), ("--reference", args.reference),
              ("--query-boxes", args.query_boxes), ("--checkpoint", weights),
              ("--checkpoint", state_json)]
    check_output(args.out, "--out", inputs=inputs)
    if args.render:
        check_output(args.render, "--render", inputs=inputs, extensions=RENDER_EXTENSIONS)
        check_distinct(("--out", args.out), ("--render", args.render))


def run(args: argparse.Namespace) -> int:
    from ..relocalize import relocalize, render_tubelets, save_result, training_data_warnings
    from ..checkpoint import load_checkpoint
    from ..config import postprocessing_overrides
    from ..utils import resolve_device

    try:
        ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
        check_arguments(args, ckpt)
        device = resolve_device(args.device)
        model, cfg, state = load_checkpoint(ckpt, device=device)
        if args.overrides:
            model.cfg = postprocessing_overrides(cfg, args.overrides).model
        result = relocalize(
            model, args.query, args.query_box if args.query_box is not None else Path(args.query_boxes),
            args.reference, query_start=args.query_start, query_end=args.query_end,
            reference_start=args.reference_start, reference_end=args.reference_end,
            device=device, progress=not args.quiet, query_box_time=args.query_box_time,
            box_units=args.box_units, chunk_clips=args.chunk_clips,
            top_k=args.top_k if args.top_k > 0 else None, link_iou=args.link_iou,
            max_gap=args.max_gap, min_length=args.min_length, score_threshold=args.score_threshold,
            include_detections=args.detections)
        result["checkpoint"] = {"path": str(ckpt), "step": state.get("step"),
                                "dataset": state.get("dataset")}
        result["warnings"] = (training_data_warnings(state.get("dataset"), result["reference"])
                              + result.get("warnings", []))
        for text in result["warnings"]:
            print(f"warning: {text}", file=sys.stderr)
        out = save_result(result, args.out)
        n = len(result["tubelets"])
        print(f"wrote {out}: {n} tubelet{'s' if n != 1 else ''} in "
              f"{result['reference']['num_clips']} clips of {args.reference}")
        for tl in result["tubelets"][:5]:
            print(f"  #{tl['rank'] + 1}  score {tl['score']:.3f}  "
                  f"{tl['start_time']:.2f}-{tl['end_time']:.2f} s  frames {tl['start_frame']}-{tl['end_frame'] - 1}")
        if args.render:
            video = render_tubelets(args.reference, result, args.render, progress=not args.quiet)
            print(f"wrote {video}")
    except (FileNotFoundError, ValueError) as err:
        print(f"stvr relocalize: error: {err}", file=sys.stderr)
        return 2
    return 0
