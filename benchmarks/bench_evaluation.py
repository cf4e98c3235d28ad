"""Speed of the evaluation: frame-mAP on 10,000 synthetic pairs (issue 6 target: seconds, not minutes).

Synthetic data (seeded): ``--pairs`` pairs of 2-5 reference seconds (3 clips per
second), 0-3 ground-truth boxes per second, ``--dets`` detections per clip (half
of them jittered ground-truth boxes), 27 combined labels. Timed, best of
``--repeats`` in one process:

* ``frame_map``: one IoU threshold (the ``stvr evaluate --iou`` path);
* ``frame_map_multi``: IoU 0.3 / 0.5 / 0.7 with the IoUs computed once;
* ``json load``: ``stvr.predict.load_detections`` of the detections file (what
  ``stvr evaluate`` reads first);
* ``video_map_from_detections``: linking every pair's detections into tubes
  (:func:`stvr.tubes.link_detections` defaults) and video-mAP at 0.2 / 0.5;
* ``reference loops``: a plain-Python implementation of the official
  ``compute_ap.py`` procedure on the first ``--ref-pairs`` pairs, scaled
  linearly to all pairs (for comparison only).

    python benchmarks/bench_evaluation.py [--pairs 10000] [--dets 10] [--repeats 3]

Prints a Markdown table and writes ``benchmarks/results/bench_evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "bench_evaluation.json"


def synthetic(n_pairs: int, dets_per_clip: int, seed: int = 0) -> tuple[list, list]:
    """Pairs (object form, only the fields frame_map reads) and per-clip detections (lists)."""
    rng = np.random.default_rng(seed)
    pairs, dets = [], []
    for _ in range(n_pairs):
        n_sec = int(rng.integers(2, 6))
        label = [int(rng.integers(1, 28)), 80]
        gt = []
        for _ in range(n_sec):
            k = int(rng.integers(0, 4))
            xy = rng.uniform(0.0, 0.6, (k, 2))
            wh = rng.uniform(0.1, 0.4, (k, 2))
            gt.append(np.round(np.concatenate([xy, xy + wh], 1), 6).tolist())
        pairs.append({"query": {"label": label}, "reference": {"start": 0, "end": n_sec, "gt": gt}})
        per_clip = []
        for j in range(3 * n_sec):
            g = np.asarray(gt[j // 3]).reshape(-1, 4)
            xy = rng.uniform(0.0, 0.6, (dets_per_clip, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (dets_per_clip, 2))], 1)
            if len(g):
                half = dets_per_clip // 2
                pick = g[rng.integers(0, len(g), half)]
                boxes[:half] = pick + rng.normal(0.0, 0.02, (half, 4))
                boxes[:half, 2:] = np.maximum(boxes[:half, 2:], boxes[:half, :2])
            scores = rng.uniform(0.0, 1.0, (dets_per_clip, 1))
            per_clip.append(np.round(np.concatenate([boxes, scores], 1), 6).tolist())
        dets.append(per_clip)
    return pairs, dets


def reference_frame_map(pairs: list, detections: list, th: float, cps: int = 3) -> float:
    """Plain-Python loops over the official procedure (ties ranked false positives first)."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    pooled = defaultdict(lambda: [[], 0])
    for p, pd in zip(pairs, detections):
        acc = pooled["+".join(map(str, sorted(p["query"]["label"])))]
        for i, boxes in enumerate(p["reference"]["gt"]):
            acc[1] += cps * len(boxes)
            for j in range(cps):
                taken = [False] * len(boxes)
                for d in sorted(pd[cps * i + j], key=lambda r: -r[4]):
                    ok = False
                    if boxes:
                        ious = [iou(d, g) for g in boxes]
                        k = ious.index(max(ious))
                        ok = ious[k] >= th and not taken[k]
                        taken[k] = taken[k] or ok
                    acc[0].append((d[4], ok))
    aps = []
    for ranked, num_gt in pooled.values():
        if num_gt == 0:
            continue
        ranked.sort(key=lambda st: (-st[0], st[1]))
        tp = fp = 0
        prec, rec = [0.0], [0.0]
        for _, ok in ranked:
            tp += ok
            fp += not ok
            prec.append(tp / (tp + fp))
            rec.append(tp / num_gt)
        prec.append(0.0)
        rec.append(1.0)
        for k in range(len(prec) - 2, -1, -1):
            prec[k] = max(prec[k], prec[k + 1])
        aps.append(sum((rec[k] - rec[k - 1]) * prec[k] for k in range(1, len(rec)) if rec[k] != rec[k - 1]))
    return float(np.mean(aps)) if aps else float("nan")


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--dets", type=int, default=10, help="detections per clip")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-pairs", type=int, default=1000, help="pairs timed with the plain-Python loops")
    ap.add_argument("--no-video", action="store_true", help="skip the video-mAP timing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from stvr.evaluation import frame_map, frame_map_multi, video_map_from_detections
    from stvr.predict import load_detections, save_detections

    t0 = time.perf_counter()
    pairs, dets = synthetic(args.pairs, args.dets)
    gen_s = time.perf_counter() - t0
    n_sec = sum(len(p["reference"]["gt"]) for p in pairs)
    n_clips = sum(len(d) for d in dets)
    n_dets = sum(len(c) for d in dets for c in d)
    print(f"{args.pairs} pairs, {n_sec} reference seconds, {n_clips} clips, {n_dets} detections "
          f"(generated in {gen_s:.1f} s)", file=sys.stderr)

    rows = []
    t, r = best_of(lambda: frame_map(pairs, dets, 0.5), args.repeats)
    rows.append({"task": "frame_map (IoU 0.5)", "seconds": t, "mAP": r["mAP"]})
    t, multi = best_of(lambda: frame_map_multi(pairs, dets, (0.3, 0.5, 0.7)), args.repeats)
    rows.append({"task": "frame_map_multi (0.3/0.5/0.7)", "seconds": t, "mAP": multi[0.5]["mAP"]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dets.json"
        save_detections(dets, path)
        size_mb = os.path.getsize(path) / 2**20
        t, loaded = best_of(lambda: load_detections(path), args.repeats)
        rows.append({"task": f"json load of detections ({size_mb:.0f} MB)", "seconds": t, "mAP": None})
        t, r = best_of(lambda: frame_map(pairs, loaded, 0.5), 1)
        rows.append({"task": "frame_map on the loaded file", "seconds": t, "mAP": r["mAP"]})
    if not args.no_video:
        t, v = best_of(lambda: video_map_from_detections(pairs, dets, (0.2, 0.5)), 1)
        rows.append({"task": "video_map_from_detections (link + 0.2/0.5)", "seconds": t, "mAP": v[0.5]["mAP"]})
    k = min(args.ref_pairs, args.pairs)
    if k > 0:
        t, r = best_of(lambda: reference_frame_map(pairs[:k], dets[:k], 0.5), 1)
        check = frame_map(pairs[:k], dets[:k], 0.5)["mAP"]
        assert abs(r - check) < 1e-9, (r, check)
        rows.append({"task": f"reference loops, {k} pairs, scaled x{args.pairs / k:g}",
                     "seconds": t * args.pairs / k, "mAP": None, "agrees_with_frame_map": True})

    print(f"\n| task | seconds | mAP@0.5 |\n|---|---:|---:|")
    for row in rows:
        m = "" if row["mAP"] is None else f"{row['mAP']:.4f}"
        print(f"| {row['task']} | {row['seconds']:.2f} | {m} |")
    meta = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "pairs": args.pairs, "reference_seconds": n_sec, "clips": n_clips,
            "detections": n_dets, "dets_per_clip": args.dets, "repeats": args.repeats,
            "note": "best of repeats, single process; the machine may be shared with other jobs"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
