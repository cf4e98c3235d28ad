"""Detection post-processing variants of trained checkpoints, from one forward pass (issue 11).

The post-processing (``model.det_*``: NMS, caps, score threshold, box voting, score decay) never
changes what a run learns, so it can be chosen on the validation pairs of finished runs without
retraining. This benchmark runs each checkpoint once over a split of its dataset root; every
call of the model's post-processing is repeated with each variant's ``model.det_*`` values, so
all variants see the same head outputs. For each variant it reports frame-mAP at IoU 0.3 / 0.5 /
0.7 and the matching diagnostics (actor recall, match AUC; API.md section 4).

    python benchmarks/bench_postprocessing.py --split val \\
        --run runs/demo-s5 data/v4-s5-96 --run runs/demo-s64 data/v4-s64-96 \\
        --variant shipped: --variant linear-decay:model.det_score_decay=linear \\
        --variant nms0.3:model.det_nms_iou=0.3

A variant is ``NAME:KEY=VALUE[,KEY=VALUE...]`` (no overrides: the checkpoint's own
post-processing). Without ``--variant`` the fifteenth pass's candidates are compared (the
checkpoint's own, linear / Gaussian Matrix-NMS decay, lower hard NMS). Prints a Markdown table
per split and the mean difference of each variant from the first, and writes
``benchmarks/results/bench_postprocessing[-TAG].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import stvr.model.network as network
from stvr.checkpoint import load_checkpoint
from stvr.config import coerce_value
from stvr.evaluation import frame_map_multi, load_actors, match_diagnostics
from stvr.experiments import test_dataset
from stvr.predict import predict_pairs

#: the candidates of the fifteenth pass (benchmarks/README.md, "Issue 11, fifteenth pass")
DEFAULT_VARIANTS = (
    "own:",
    "linear-nms0.3:model.det_score_decay=linear,model.det_nms_iou=0.3",
    "linear-nms0.4:model.det_score_decay=linear,model.det_nms_iou=0.4",
    "linear-nms0.5:model.det_score_decay=linear,model.det_nms_iou=0.5",
    "gaussian-nms0.4:model.det_score_decay=gaussian,model.det_nms_iou=0.4",
    "decay-off-nms0.4:model.det_score_decay=none,model.det_nms_iou=0.4",
    "nms0.3:model.det_score_decay=none,model.det_nms_iou=0.3",
    "nms0.25:model.det_score_decay=none,model.det_nms_iou=0.25",
)


def parse_variant(text: str, model_cfg: Any) -> tuple[str, dict[str, Any]]:
    """``"NAME:model.det_x=V,model.det_y=W"`` -> ``(NAME, {"det_x": V, "det_y": W})``, values
    coerced to the fields' types; only ``model.det_*`` fields (post-processing) are accepted."""
    name, _, spec = text.partition(":")
    if not name:
        raise ValueError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        field = key.strip().removeprefix("model.")
        if not sep or not field.startswith("det_") or not hasattr(model_cfg, field):
            raise ValueError(f"--variant {text!r}: {item!r} is not a model.det_* post-processing field")
        fields[field] = coerce_value(value.strip(), getattr(model_cfg, field))
    return name, fields


@contextlib.contextmanager
def every_variant(variants: dict[str, dict[str, Any]]) -> Iterator[dict[str, list]]:
    """While active, each call of the model's post-processing also runs with every variant's
    ``det_*`` values; yields ``{name: [per call, per clip [K, 5] lists]}``. The model's own
    output is the first variant's."""
    original = network.postprocess_detections
    captured: dict[str, list] = {name: [] for name in variants}

    def repeated(logits, codes, boxes, clip_index, num_clips, binary, coder, cfg, *args, **kwargs):
        first = None
        for name, fields in variants.items():
            out = original(logits, codes, boxes, clip_index, num_clips, binary, coder,
                           dataclasses.replace(cfg, **fields), *args, **kwargs)
            captured[name].append([d.detach().cpu().tolist() for d in out])
            first = out if first is None else first
        return first

    network.postprocess_detections = repeated
    try:
        yield captured
    finally:
        network.postprocess_detections = original


def variant_detections(model: torch.nn.Module, dataset: Any,
                       variants: dict[str, dict[str, Any]]) -> dict[str, list]:
    """Detections of ``dataset`` (one pair per forward) for every variant:
    ``{name: per pair, per clip [K, 5] lists}``, as :func:`stvr.predict.predict_pairs` gives
    for the model with that variant's ``det_*`` values."""
    with every_variant(variants) as captured:
        own = predict_pairs(model, dataset, batch_size=1, progress=False)
    out = {}
    for name, calls in captured.items():
        if len(calls) != len(own):
            raise RuntimeError(f"{len(calls)} post-processing calls for {len(own)} pairs (a pair that "
                               f"failed to load?)")
        out[name] = calls
    return out


def score(pairs: list, detections: list, actors: dict) -> dict[str, Any]:
    """Frame-mAP (percent) at 0.3 / 0.5 / 0.7 and the matching diagnostics of ``detections``."""
    fm = frame_map_multi(pairs, detections, (0.3, 0.5, 0.7), 3)
    diag = match_diagnostics(pairs, detections, actors, 0.5, 3)
    return {"mAP": {str(t): 100 * r["mAP"] for t, r in fm.items()}, "match_auc": diag["match_auc"],
            "actor_recall": diag["actor_recall"], "chance_mAP": 100 * diag["chance_mAP"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs=2, action="append", required=True, metavar=("RUN", "ROOT"),
                    help="a run folder (or checkpoint) and its dataset root; repeatable")
    ap.add_argument("--split", nargs="+", default=["val"], help="pair splits (default val)")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                    help="a post-processing variant (default: the fifteenth pass's candidates)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"variants": {}, "runs": []}
    for run, root in args.run:
        model, cfg, state = load_checkpoint(run)
        variants = dict(parse_variant(v, model.cfg) for v in (args.variant or DEFAULT_VARIANTS))
        results["variants"] = {k: {f: str(v) for f, v in fs.items()} for k, fs in variants.items()}
        cfg.data.root = root
        actors = load_actors(root)
        for split in args.split:
            ds = test_dataset(cfg, split)
            dets = variant_detections(model, ds, variants)
            row = {"run": run, "root": root, "split": split, "step": int(state["step"]),
                   "own": {k: v for k, v in vars(model.cfg).items() if k.startswith("det_")},
                   "scores": {name: score(ds.pairs, d, actors) for name, d in dets.items()}}
            results["runs"].append(row)
            print(f"{run} {split}: " + ", ".join(f"{n} {s['mAP']['0.5']:.1f} (rec {s['actor_recall']:.3f})"
                                                 for n, s in row["scores"].items()), flush=True)
    names = list(results["variants"])
    for split in args.split:
        rows = [r for r in results["runs"] if r["split"] == split]
        print(f"\n{split}: frame-mAP@0.5 / actor recall\n\n| run | " + " | ".join(names) + " |\n|---|"
              + "---:|" * len(names))
        for r in rows:
            print(f"| {r['run']} | " + " | ".join(f"{r['scores'][n]['mAP']['0.5']:.1f} / "
                                               f"{r['scores'][n]['actor_recall']:.3f}" for n in names) + " |")
        base = np.array([r["scores"][names[0]]["mAP"]["0.5"] for r in rows])
        for n in names[1:]:
            d = np.array([r["scores"][n]["mAP"]["0.5"] for r in rows]) - base
            rec = np.mean([r["scores"][n]["actor_recall"] - r["scores"][names[0]]["actor_recall"] for r in rows])
            print(f"{n} - {names[0]}: {d.mean():+.2f} (sd {d.std(ddof=1) if len(d) > 1 else 0.0:.2f}; "
                  f"{int((d > 0).sum())} of {len(d)} up), actor recall {rec:+.3f}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(__file__).parent / "results" / f"bench_postprocessing{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"({results['seconds']} s; {out})")


if __name__ == "__main__":
    main()
