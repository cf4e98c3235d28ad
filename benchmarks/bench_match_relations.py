"""Which other actors does a trained matcher confuse with the query's action? (issue 11)

``match_auc`` of ``stvr evaluate`` pools every annotated actor that a detection
covers (IoU >= 0.5): the actors doing the query's label are positives, all
others negatives. Here the negatives are split by how their label (set of
action ids at that second) relates to the query's label ``Q``:

* ``nested``: a proper subset or superset of ``Q`` (``2+4`` against ``2+3+4``);
* ``overlap``: shares at least one action id with ``Q``, not nested;
* ``disjoint``: shares none.

and the ROC AUC of the positives against each kind is reported, with the share
of negatives of each kind. A matcher that only tells actions apart when they
have nothing in common scores high on ``disjoint`` and near 0.5 on the others.

    python benchmarks/bench_match_relations.py \\
        --run runs/demo:data/synthetic runs/s64:data/v4-s64-96

Each ``--run`` is ``RUN_FOLDER:DATASET_ROOT`` (the run folder holds the
``test_detections.json`` that ``stvr demo`` writes) or
``DETECTIONS.json:DATASET_ROOT``. Prints a Markdown table and writes
``benchmarks/results/bench_match_relations[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stvr.data.ava import read_annotations
from stvr.evaluation import roc_auc
from stvr.tubes import iou_broadcast

KINDS = ("nested", "overlap", "disjoint")


def load_actor_labels(root: str | Path, splits: Sequence[str] = ("train", "val")
                      ) -> dict[tuple[str, int], list[tuple[frozenset[int], list[float]]]]:
    """``{(video_id, second): [(action ids, [x1, y1, x2, y2]), ...]}``: every annotated
    person box of ``<root>/annotations/<split>.csv`` with the set of its action ids."""
    people: dict[tuple[str, int, int], tuple[set[int], list[float]]] = {}
    for split in splits:
        f = Path(root) / "annotations" / f"{split}.csv"
        if f.is_file():
            for row in read_annotations(f):
                people.setdefault((row.video_id, row.second, row.person_id), (set(), list(row.box)))[0].add(row.action_id)
    actors: dict[tuple[str, int], list[tuple[frozenset[int], list[float]]]] = defaultdict(list)
    for (video, second, _), (ids, box) in sorted(people.items()):
        actors[(video, second)].append((frozenset(ids), box))
    return dict(actors)


def relation(label: frozenset[int], query: frozenset[int]) -> str:
    """``"positive"`` (same label), ``"nested"``, ``"overlap"`` or ``"disjoint"``."""
    if label == query:
        return "positive"
    if label < query or query < label:
        return "nested"
    return "overlap" if label & query else "disjoint"


def match_auc_by_relation(pairs: Sequence[Any], detections: Sequence[Any],
                          actors: dict[tuple[str, int], list[tuple[frozenset[int], list[float]]]],
                          iou_threshold: float = 0.5, clips_per_second: int = 3) -> dict:
    """Match AUC of the positives against each kind of negative.

    Args:
        pairs: the evaluation pairs (``query.label`` a list of action ids,
            ``reference.id`` / ``reference.start`` in seconds).
        detections: ``detections[pair][clip]`` = ``[[x1, y1, x2, y2, score], ...]``.
        actors: :func:`load_actor_labels` of the dataset root.
        iou_threshold: a detection covers an actor at IoU >= this.
        clips_per_second: reference clip ``j`` shows second ``start + j // clips_per_second``.

    An instance is an (pair, clip, actor) that some detection of that clip covers,
    scored by the highest covering score, as ``match_diagnostics`` counts them.

    Returns:
        ``{"positives": int, "all": auc, KIND: auc, "negatives": {KIND: count}}``
        (AUC NaN for a kind without instances).
    """
    scores: dict[str, list[float]] = defaultdict(list)
    for pair, dets in zip(pairs, detections):
        query = frozenset(int(a) for a in pair["query"]["label"])
        video, start = pair["reference"]["id"], int(pair["reference"]["start"])
        for j, clip in enumerate(dets):
            clip_dets = np.asarray(clip, dtype=np.float64).reshape(-1, 5)
            people = actors.get((video, start + j // clips_per_second), [])
            if not len(clip_dets) or not people:
                continue
            boxes = np.asarray([box for _, box in people], dtype=np.float64)
            covered = iou_broadcast(boxes[:, None], clip_dets[None, :, :4]) >= iou_threshold
            best = np.where(covered, clip_dets[None, :, 4], -np.inf).max(1)
            for (label, _), ok, score in zip(people, covered.any(1), best):
                if ok:
                    scores[relation(label, query)].append(float(score))
    pos = np.asarray(scores["positive"])

    def auc(neg: np.ndarray) -> float:
        return roc_auc(np.r_[pos, neg], np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)])

    out: dict = {"positives": len(pos), "negatives": {k: len(scores[k]) for k in KINDS}}
    out["all"] = auc(np.concatenate([np.asarray(scores[k]) for k in KINDS]))
    out.update({k: auc(np.asarray(scores[k])) for k in KINDS})
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="+", required=True,
                    help="RUN_FOLDER:DATASET_ROOT or DETECTIONS.json:DATASET_ROOT (test split)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args(argv)
    rows = {}
    roots: dict[str, tuple[list, dict]] = {}          # pairs and actors, read once per dataset root
    print("| run | positives | match AUC | nested | overlap | disjoint | negatives nested / overlap / disjoint |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for item in args.run:
        run, _, root = item.rpartition(":")
        path = Path(run)
        dets_path = path / "test_detections.json" if path.is_dir() else path
        if root not in roots:
            roots[root] = json.loads((Path(root) / "pairs" / "test.json").read_text()), load_actor_labels(root)
        pairs, actors = roots[root]
        r = match_auc_by_relation(pairs, json.loads(dets_path.read_text()), actors)
        rows[item] = r
        n = r["negatives"]
        total = max(sum(n.values()), 1)
        print(f"| {run} | {r['positives']} | {r['all']:.3f} | {r['nested']:.3f} | {r['overlap']:.3f} | "
              f"{r['disjoint']:.3f} | {' / '.join(f'{100 * n[k] / total:.0f} %' for k in KINDS)} |")
    out = Path(__file__).parent / "results" / f"bench_match_relations{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"split": "test", "runs": rows}, indent=1))
    print(f"({out})")
    return rows


if __name__ == "__main__":
    main()
