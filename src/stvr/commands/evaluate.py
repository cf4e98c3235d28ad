"""``stvr evaluate``: frame-mAP (and video-mAP) of a detections file against a pair file.

Output (JSON on stdout, NaN printed as ``null``):

* ``stvr evaluate PAIRS DETS --iou X`` prints exactly
  ``stvr.evaluation.frame_map(pairs, detections, X)``:
  ``{"mAP", "AP": {label: AP}, "num_labels"}`` (API.md section 4).
* ``stvr evaluate PAIRS DETS`` (no ``--iou``) prints the same dictionary at the
  headline IoU 0.5 plus two keys: ``"frame_mAP"`` (``{"0.3": result, "0.5":
  result, "0.7": result}``) and ``"video_mAP"`` (``{"0.2": result, "0.5":
  result}``, per-clip detections linked into tubes with the
  :func:`stvr.tubes.link_detections` defaults).
* ``--video-map`` adds ``"video_mAP"`` to the ``--iou`` output;
  ``--no-video-map`` leaves it out of the default output.
* ``--data ROOT`` adds ``"diagnostics"``:
  :func:`stvr.evaluation.match_diagnostics` (``actor_recall``, ``match_auc``,
  ``chance_mAP``, at ``--iou`` or 0.5) with the actors of ROOT's annotations
  (:func:`stvr.evaluation.load_actors`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

FRAME_IOUS = (0.3, 0.5, 0.7)
HEADLINE_IOU = 0.5
VIDEO_IOUS = (0.2, 0.5)

_EPILOG = """\
output (JSON on stdout; a NaN mAP, when no label has ground truth, is printed as null):
  --iou X            exactly frame_map's dictionary at IoU X:
                     {"mAP": float, "AP": {"11+74": float, ...}, "num_labels": int}
  (default)          that dictionary at the headline IoU 0.5, plus
                     "frame_mAP": {"0.3": {...}, "0.5": {...}, "0.7": {...}} and
                     "video_mAP": {"0.2": {...}, "0.5": {...}} (the same dictionary per
                     spatio-temporal tube-IoU threshold; per-clip detections are linked
                     into tubes with the stvr.tubes.link_detections defaults and matched
                     to the ground-truth tubes of each reference)
  --video-map        add "video_mAP" to the --iou output
  --no-video-map     leave "video_mAP" out of the default output (faster)
  --data ROOT        add "diagnostics": {"actor_recall", "match_auc", "chance_mAP"}
                     (stvr.evaluation.match_diagnostics at --iou or 0.5, every annotated
                     actor of ROOT/annotations/{train,val}.csv): the share of actors
                     covered by a detection, the ROC AUC of the covering detections'
                     scores for the pair's ground-truth actors vs the other actors, and
                     the frame-mAP of random scores on the actors' exact boxes

DETECTIONS.json is what `stvr predict` writes (stvr.predict.save_detections):
a list with one entry per pair, one list per reference clip (3 per second), one
[x1, y1, x2, y2, score] per detection (normalized boxes).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="frame-mAP / video-mAP of detections against a pair file",
        description="Frame-mAP of per-clip detections with the official STVR protocol "
        "(API.md section 4), and video-mAP of the detections linked into tubes.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", metavar="PAIRS.json", help="pair file (object form, or the official "
                   "[query, reference] form with --box-order yxyx)")
    p.add_argument("detections", metavar="DETECTIONS.json", help="detections file written by `stvr predict`")
    p.add_argument("--iou", type=float, default=None,
                   help="frame-mAP at this IoU only: prints exactly frame_map's dictionary")
    video = p.add_mutually_exclusive_group()
    video.add_argument("--video-map", dest="video_map", action="store_true", default=None,
                       help="also report video-mAP (key \"video_mAP\"; default without --iou)")
    video.add_argument("--no-video-map", dest="video_map", action="store_false",
                       help="do not report video-mAP")
    p.add_argument("--video-iou", type=float, nargs="+", default=list(VIDEO_IOUS), metavar="T",
                   help="tube-IoU thresholds of video-mAP (default: 0.2 0.5)")
    p.add_argument("--box-order", choices=("xyxy", "yxyx"), default="xyxy",
                   help="box order of the pair file (yxyx for the official STVR split files)")
    p.add_argument("--clips-per-second", type=int, default=3, help="clips per reference second (default 3)")
    p.add_argument("--data", metavar="ROOT", default=None,
                   help="dataset root whose annotations give every actor: adds the matching "
                        "diagnostics (key \"diagnostics\")")
    p.add_argument("--out", help="also write the result JSON to this file (an existing file is "
                   "replaced; never one of the inputs)")
    p.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2; -1: one line)")
    p.set_defaults(func=run)


def _json_ready(obj: Any) -> Any:
    """NaN/inf -> None, float dictionary keys -> ``"0.5"``-style strings, recursively."""
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate(pairs: list, detections: list, iou: float | None = None, video_map: bool | None = None,
             video_ious: tuple[float, ...] = VIDEO_IOUS, clips_per_second: int = 3,
             progress: bool = False, actors: dict | None = None) -> dict:
    """The dictionary ``stvr evaluate`` prints (before NaN -> null); see the module docstring.

    ``actors`` (:func:`stvr.evaluation.load_actors`) adds ``"diagnostics"``."""
    from ..evaluation import frame_map, frame_map_multi, video_map_from_detections

    if iou is not None:
        result = frame_map(pairs, detections, iou_threshold=iou, clips_per_second=clips_per_second)
        with_video = bool(video_map)
    else:
        multi = frame_map_multi(pairs, detections, FRAME_IOUS, clips_per_second=clips_per_second)
        result = dict(multi[HEADLINE_IOU])
        result["frame_mAP"] = multi
        with_video = video_map is None or video_map
    if with_video:
        result["video_mAP"] = video_map_from_detections(pairs, detections, tuple(video_ious),
                                                        clips_per_second=clips_per_second, progress=progress)
    if actors is not None:
        from ..evaluation import match_diagnostics

        result["diagnostics"] = match_diagnostics(
            pairs, detections, actors, iou_threshold=HEADLINE_IOU if iou is None else iou,
            clips_per_second=clips_per_second)
    return result


def run(args: argparse.Namespace) -> int:
    from ..data.pairs import load_pairs
    from ..predict import load_detections

    try:
        if args.out:  # before any work; never one of the inputs (issue 12)
            from ..guards import check_output

            check_output(args.out, "--out", inputs=[("PAIRS", args.pairs), ("DETECTIONS", args.detections)])
        pairs = load_pairs(args.pairs, box_order=args.box_order)
        detections = load_detections(args.detections)
        if not isinstance(detections, list):
            raise ValueError(f"{args.detections}: expected a JSON list (one entry per pair), "
                             f"got {type(detections).__name__}")
        actors = None
        if getattr(args, "data", None):
            from ..evaluation import load_actors

            actors = load_actors(args.data)
        try:
            result = evaluate(pairs, detections, iou=args.iou, video_map=args.video_map,
                              video_ious=tuple(args.video_iou), clips_per_second=args.clips_per_second,
                              progress=sys.stderr.isatty(), actors=actors)
        except ValueError as err:
            raise ValueError(f"{args.detections} vs {args.pairs}: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        print(f"stvr evaluate: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(_json_ready(result), indent=None if args.indent < 0 else args.indent,
                      allow_nan=False)
    print(text)
    if args.out:
        from ..utils import atomic_write

        atomic_write(Path(args.out), text + "\n")
    return 0
