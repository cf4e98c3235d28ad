"""How much frame-mAP can localization alone cost on a synthetic root? (issue 11)

The protocol (AVA's) scores the three clips of a second against the one box of that
second, annotated at its middle. This script compares, on the test pairs of a
synthetic root, two idealized detectors that box every annotated actor once per clip:

* ``annotated``: the annotated box of the second (what the chance matcher of
  :func:`stvr.evaluation.match_diagnostics` uses);
* ``tracker``: a perfect per-clip tracker: the actor's nominal box at the middle
  frame of each clip (where the actor really is in that clip);

each with random scores (the chance matcher) and with scores of a given match AUC
(binormal: N(d, 1) for the actors doing the query's label, N(0, 1) for the others,
``d = sqrt(2) * Phi^-1(AUC)``), mean of 3 seeds. It also reports the IoU of the
tracker's box with the annotated box in the outer clips (first and last of a second).
If the tracker scores far below the annotated boxes, no per-clip model can reach the
chance floor: the geometry of the data set, not the matching, caps frame-mAP.

    python benchmarks/bench_geometry.py --root data/synthetic      # a root written by `stvr data synth`

Prints a Markdown table and writes ``benchmarks/results/bench_geometry[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import norm

from stvr.data.synthetic import SynthConfig, plan_dataset
from stvr.evaluation import frame_map

CLIP_FRAMES = 8


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a [N, 4]`` with ``b [M, 4]`` -> ``[N, M]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def idealized_detections(pairs: list, scripts: dict, boxes: str, auc: float | None,
                         seed: int) -> tuple[list, np.ndarray]:
    """Detections of every actor in every clip of every pair (``boxes`` = ``annotated`` |
    ``tracker``) scored at random (``auc`` None) or binormally at ``auc``; and the outer-clip
    IoUs of the tracker's boxes with the annotated ones (query-match actors)."""
    rng = np.random.default_rng(seed)
    shift = float(np.sqrt(2.0) * norm.ppf(auc)) if auc is not None else 0.0
    dets, outer = [], []
    for p in pairs:
        ref = p["reference"]
        sc = scripts[ref["id"]]
        annotated = sc.boxes()                               # [actors, seconds, 4] normalized
        per_clip = []
        for j in range(3 * len(ref["gt"])):
            s = ref["start"] + j // 3
            gt = np.asarray(ref["gt"][j // 3], dtype=np.float64).reshape(-1, 4)
            frame = s * sc.fps + (j % 3) * CLIP_FRAMES + CLIP_FRAMES // 2
            rows = []
            for i, a in enumerate(sc.actors):
                box = annotated[i, s]
                match = len(gt) > 0 and _iou(box[None], gt).max() >= 0.99
                if boxes == "tracker":
                    c = a.pos[min(frame, len(a.pos) - 1)]
                    tracked = np.clip(np.array([c[0] - a.rx, c[1] - a.ry, c[0] + a.rx, c[1] + a.ry]) / sc.size, 0, 1)
                    if match and j % 3 != 1:
                        outer.append(_iou(tracked[None], box[None])[0, 0])
                    box = tracked
                score = rng.normal(shift if match else 0.0, 1.0) if auc is not None else rng.random()
                rows.append([*map(float, box), float(score)])
            per_clip.append(rows)
        dets.append(per_clip)
    return dets, np.asarray(outer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="synthetic dataset root (its dataset.json holds the generator config)")
    ap.add_argument("--aucs", type=float, nargs="*", default=[0.8, 0.9], help="match AUCs besides random scores")
    ap.add_argument("--seeds", type=int, default=3, help="score seeds averaged")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    root = Path(args.root)
    meta = json.loads((root / "dataset.json").read_text())
    if "synthetic" not in meta:
        raise SystemExit(f"{root}: not a synthetic root (dataset.json has no 'synthetic' entry)")
    cfg = SynthConfig.from_json(meta["synthetic"]["config"])
    scripts = {s.video_id: s for s in plan_dataset(cfg)[0]}
    pairs = json.loads((root / "pairs" / "test.json").read_text())
    rows, outer_iou = [], None
    for auc in [None, *args.aucs]:
        row = {"scores": "random" if auc is None else f"AUC {auc:g}"}
        for boxes in ("annotated", "tracker"):
            maps = []
            for seed in range(args.seeds):
                dets, outer = idealized_detections(pairs, scripts, boxes, auc, seed)
                maps.append(100.0 * frame_map(pairs, dets)["mAP"])
                if boxes == "tracker" and outer_iou is None:
                    outer_iou = outer
            row[boxes] = float(np.mean(maps))
        rows.append(row)
    result = {
        "root": str(root), "generator_version": meta["synthetic"]["version"], "seed": cfg.seed,
        "speed": list(cfg.speed), "pairs": len(pairs), "frame_map_at_0.5": rows,
        "tracker_outer_clip_iou": {"mean": float(outer_iou.mean()), "min": float(outer_iou.min()),
                                   "share_below_0.5": float((outer_iou < 0.5).mean())},
    }
    print(f"{root} (generator v{result['generator_version']}, seed {cfg.seed}, actor speed "
          f"{cfg.speed[0]:g}-{cfg.speed[1]:g} px/s, {len(pairs)} test pairs), frame-mAP@0.5 (%):\n")
    print("| scores | annotated boxes | perfect per-clip tracker |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['scores']} | {r['annotated']:.1f} | {r['tracker']:.1f} |")
    o = result["tracker_outer_clip_iou"]
    print(f"\nTracker vs annotated box in the outer clips: IoU mean {o['mean']:.2f}, min {o['min']:.2f}, "
          f"{100 * o['share_below_0.5']:.0f} % below 0.5")
    out = Path(__file__).parent / "results" / f"bench_geometry{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
