"""How well does a frozen backbone match actions by itself? (issue 11)

Every annotated actor of each reference clip gets its *exact* box, scored by the
cosine between its crop mean (the backbone's map cropped at the box exactly as
the matching network crops, average-pooled) and the query's (the mean over the
crop means of all clips of the query tubelet). No detector, no training: the
frame-mAP and match AUC measure only how well the backbone's features tell the
query's combined label from the others, on the evaluation pairs of a dataset
root (which hold combinations never shown in training). The chance matcher
(the same boxes, random scores) is printed beside it.

This is the quick check of a pretrained backbone (``stvr pretrain``) on many
seeds before the end-to-end training (``stvr demo``, ~8 minutes a seed):

    python benchmarks/bench_backbone_match.py --roots data/v4-s0 data/v4-s7 \\
        --weights builtin runs/other.safetensors --split val

``--groups 1 3``: also score each box by the mean map of the 3 clips of its second (the cpu
preset's ``model.match_clips=3``) instead of its own clip's. ``--set model.tiny_width=32``:
cpu-preset overrides for every ``--weights`` (e.g. for the weights of a wider backbone).
``--score action``: score each box by minus the L1 distance between the action probabilities of its
crop mean and the query's, read by the action probe of ``model.match_action_distance``
(:func:`stvr.pretrain.fit_action_probe`: a linear multi-label classifier fitted on the root's
training actors; ``--set model.action_probe_hidden=64 --set model.action_probe_seconds=0``: the
probe with a hidden layer, fitted on every training second) instead of the cosine; ``--score cosine
action`` prints both. ``--score action-agree``: the same probe, scored by the log-probability that the box's actions agree with the
query's, ``sum_a log(p_a q_a + (1 - p_a)(1 - q_a))`` (independent actions): a confident disagreement
on one action costs more than several uncertain ones.

Prints a Markdown table and writes ``benchmarks/results/bench_backbone_match[-TAG].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stvr.backbones import build_backbone
from stvr.config import apply_overrides, preset
from stvr.data.clip_cache import ClipCache
from stvr.data.pairs import load_dataset_json, load_pairs, resolve_video_path
from stvr.data.video import frames_to_clips
from stvr.evaluation import frame_map, load_actors, match_diagnostics
from stvr.model.query import crop_features


def clip_maps(root: Path, cfg, backbone, keys: list[tuple[str, int]], batch: int = 32) -> dict:
    """``{(video_id, second): float32 [clips_per_second, C, h, w]}`` backbone maps of every clip."""
    info = load_dataset_json(root)
    fps = int(info.get("fps", 24))
    cache = ClipCache(root / "cache", size=cfg.image_size, fps=fps)
    per_second = fps // cfg.clip_frames
    clips = []
    for vid, sec in keys:
        frames = np.asarray(cache.frames(vid, resolve_video_path(root, info, vid), sec, sec + 1))
        clips.append(frames_to_clips(np.ascontiguousarray(frames), cfg.clip_frames)[:per_second])
    flat = torch.cat(clips)
    with torch.no_grad():
        maps = torch.cat([backbone(flat[i:i + batch]) for i in range(0, len(flat), batch)])
    return dict(zip(keys, maps.view(len(keys), per_second, *maps.shape[1:])))


def crop_means(maps: torch.Tensor, boxes: np.ndarray, cfg) -> torch.Tensor:
    """``maps [M, C, h, w]`` (one map per box) and boxes ``[M, 4]`` -> ``[M, C]``."""
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    crops = crop_features(maps, b, torch.arange(len(b)), cfg.roi_crop_size, mapping=cfg.roi_mapping,
                          image_size=cfg.image_size)
    return crops.mean((2, 3))


def agreement_log_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_a log(p_a q_a + (1 - p_a)(1 - q_a))`` ``[K]`` of action probabilities ``p [K, A]``
    and ``q [1 or K, A]``: the log-probability that two actors with independent actions agree on
    every action (0 when both are certain and equal)."""
    agree = p * q + (1 - p) * (1 - q)
    return agree.clamp_min(1e-6).log().sum(1)


def action_probe_model(root: Path, cfg) -> torch.nn.Module:
    """An :class:`stvr.model.STVRModel` of ``cfg`` (pretrained backbone) whose action probe
    (``model.match_action_distance``) is fitted on the training actors of ``root``."""
    from stvr.data.actors import actor_index
    from stvr.model import STVRModel
    from stvr.pretrain import fit_action_probe

    ids = tuple(actor_index(root, "train").action_ids)
    model = STVRModel(dataclasses.replace(cfg, match_action_distance=True, freeze_backbone=True,
                                          action_ids=ids)).eval()
    fit_action_probe(model, root, max_seconds=cfg.action_probe_seconds or None, seed=0)
    return model


def exact_box_detections(root: Path, weights: str, split: str, group: int = 1,
                         overrides: tuple[str, ...] = (), score: str = "cosine") -> tuple[list, list, dict]:
    """``(pairs, detections, actors)``: every annotated actor of every reference clip at its exact
    box, scored by the cosine of its crop mean with the query's mean crop (API.md section 4).
    ``group=3``: the actor's crop mean is averaged over the 3 clips of its second (at the second's
    box), as the cpu preset's ``model.match_clips``. ``overrides``: ``--set`` strings applied to the
    cpu preset (e.g. ``model.tiny_width=32`` for the weights of a wider backbone). ``score="action"``:
    minus the L1 distance of action probabilities (:func:`action_probe_model`) instead of the cosine;
    ``score="action-agree"``: :func:`agreement_log_probability` of the same probabilities."""
    cfg = apply_overrides(preset("cpu"), overrides).model
    info = load_dataset_json(root)
    cfg.backbone_weights = None if weights == "none" else weights
    torch.manual_seed(0)                      # the random initialization of "none"
    probe = None
    if score in ("action", "action-agree"):
        model = action_probe_model(root, cfg)
        backbone, probe = model.backbone, model.action_probe
    elif score == "cosine":
        backbone = build_backbone(cfg).eval()
    else:
        raise ValueError(f"unknown score {score!r}; choose 'cosine', 'action' or 'action-agree'")
    pairs = load_pairs(root / "pairs" / f"{split}.json")
    actors = load_actors(root)
    per_second = int(info.get("fps", 24)) // cfg.clip_frames
    keys = set()
    for p in pairs:
        keys.update((p["query"]["id"], int(s)) for s in p["query"]["frames"])
        keys.update((p["reference"]["id"], s) for s in range(p["reference"]["start"], p["reference"]["end"]))
    maps = clip_maps(root, cfg, backbone, sorted(keys))
    detections = []
    for p in pairs:
        q = p["query"]
        qmaps = torch.cat([maps[(q["id"], int(s))] for s in q["frames"]])
        qboxes = np.repeat(np.asarray(q["boxes"], np.float32), per_second, axis=0)
        qmean = crop_means(qmaps, qboxes, cfg).mean(0)
        qvec = F.normalize(qmean, dim=0)
        ref = p["reference"]
        dets = []
        for s in range(ref["start"], ref["end"]):
            boxes = np.asarray(actors.get((ref["id"], s), []), np.float32).reshape(-1, 4)
            for first in range(0, per_second, group):      # one score per box and group of clips
                size = min(group, per_second - first)
                if len(boxes) == 0:
                    dets.extend([] for _ in range(size))
                    continue
                m = maps[(ref["id"], s)][first:first + size].mean(0).expand(len(boxes), -1, -1, -1)
                means = crop_means(m, boxes, cfg)
                if probe is None:
                    sc = F.normalize(means, dim=1) @ qvec
                elif score == "action":
                    with torch.no_grad():
                        sc = -probe.distance(means, qmean.expand_as(means))
                else:
                    with torch.no_grad():
                        sc = agreement_log_probability(probe.probabilities(means),
                                                       probe.probabilities(qmean[None]))
                rows = [[*map(float, b), float(c)] for b, c in zip(boxes, sc)]
                dets.extend([list(r) for r in rows] for _ in range(size))
        detections.append(dets)
    return pairs, detections, actors


def score_root(root: Path, weights: str, split: str, group: int = 1, overrides: tuple[str, ...] = (),
               score: str = "cosine") -> dict:
    """Frame-mAP@0.5, match AUC and chance frame-mAP (percent) of :func:`exact_box_detections`."""
    pairs, detections, actors = exact_box_detections(root, weights, split, group, overrides, score)
    per_second = len(detections[0]) // max(1, pairs[0]["reference"]["end"] - pairs[0]["reference"]["start"])
    fm = frame_map(pairs, detections, 0.5, per_second)
    diag = match_diagnostics(pairs, detections, actors, 0.5, per_second)
    return {"mAP": 100 * fm["mAP"], "match_auc": diag["match_auc"], "chance_mAP": 100 * diag["chance_mAP"],
            "actor_recall": diag["actor_recall"], "AP": {k: 100 * v for k, v in fm["AP"].items()},
            "pairs": len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roots", nargs="+", type=Path, required=True, help="dataset roots (one per seed)")
    ap.add_argument("--weights", nargs="+", default=["builtin"],
                    help="backbone weights: builtin, none (random init) or .safetensors files")
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--groups", nargs="+", type=int, default=[1],
                    help="clips whose mean map scores a reference box (1: its own clip; 3: the clips of "
                         "its second, as model.match_clips=3); one table row per value")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a cpu-preset field for every --weights (e.g. model.tiny_width=32)")
    ap.add_argument("--score", nargs="+", default=["cosine"], choices=["cosine", "action", "action-agree"],
                    help="cosine of crop means, minus the L1 distance of the action probe's "
                         "probabilities (model.match_action_distance), or the log-probability that "
                         "the probe's actions agree (action-agree); one table row per value")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"split": args.split, "overrides": args.overrides, "scores": args.score, "runs": []}
    t0 = time.perf_counter()
    print("| weights | score | clips | root | frame-mAP@0.5 | match AUC | chance | x chance |\n"
          "|---|---|---:|---|---:|---:|---:|---:|")
    for w, sc, g in itertools.product(args.weights, args.score, args.groups):
        row = []
        for root in args.roots:
            r = score_root(root, w, args.split, g, tuple(args.overrides), sc)
            r.update(weights=w, root=str(root), clips=g, score=sc)
            results["runs"].append(r)
            row.append(r)
            print(f"| {w} | {sc} | {g} | {root.name} | {r['mAP']:.1f} | {r['match_auc']:.3f} | "
                  f"{r['chance_mAP']:.1f} | {r['mAP'] / r['chance_mAP']:.2f} |", flush=True)
        print(f"| {w} | {sc} | {g} | **mean** | {np.mean([r['mAP'] for r in row]):.1f} | "
              f"{np.mean([r['match_auc'] for r in row]):.3f} | {np.mean([r['chance_mAP'] for r in row]):.1f} | "
              f"{np.mean([r['mAP'] / r['chance_mAP'] for r in row]):.2f} |", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(__file__).parent / "results" / f"bench_backbone_match{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"({results['seconds']} s; {out})")


if __name__ == "__main__":
    main()
