"""stvr.evaluation: frame-mAP (API.md section 4), video-mAP, and the ``stvr evaluate`` CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from stvr.cli import main as cli_main
from stvr.data.pairs import load_pairs, save_pairs
from stvr.evaluation import (
    average_precision,
    frame_map,
    frame_map_multi,
    label_key,
    video_map,
    video_map_from_detections,
)
from stvr.predict import save_detections
from stvr.tubes import Tube

A = [0.1, 0.1, 0.4, 0.5]  # a ground-truth box
FAR = [0.6, 0.6, 0.9, 0.9]  # a box that does not overlap A


def pair(gt, label=(11,), vid="ref", start=0):
    """A valid object-form pair with reference ``gt`` (one list of boxes per second)."""
    return {
        "query": {"id": "q", "frames": [0], "boxes": [[0.1, 0.1, 0.5, 0.5]], "label": list(label)},
        "reference": {"id": vid, "start": start, "end": start + len(gt), "gt": [list(g) for g in gt]},
    }


def det(box, score):
    return list(box) + [score]


# ----------------------------------------------------------------------------- reference implementation
def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_compute_average_precision(precision, recall):
    """ActivityNet ``metrics.compute_average_precision``, in plain Python."""
    if not precision:
        return 0.0
    recall = [0.0] + list(recall) + [1.0]
    precision = [0.0] + list(precision) + [0.0]
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i] - recall[i - 1]) * precision[i]
               for i in range(1, len(recall)) if recall[i] != recall[i - 1])


def ref_frame_map(pairs, detections, th, cps=3):
    """The STVR ``compute_ap.py`` procedure with loops; ties in score ranked false positives first."""
    pooled = defaultdict(lambda: {"dets": [], "num_gt": 0})
    for p, pdets in zip(pairs, detections):
        acc = pooled["+".join(str(a) for a in sorted(p["query"]["label"]))]
        for i, boxes in enumerate(p["reference"]["gt"]):
            acc["num_gt"] += cps * len(boxes)
            for j in range(cps):
                taken = [False] * len(boxes)
                for d in sorted(pdets[cps * i + j], key=lambda r: -r[4]):
                    if not boxes:
                        acc["dets"].append((d[4], False))
                        continue
                    ious = [ref_iou(d, g) for g in boxes]
                    k = ious.index(max(ious))
                    if ious[k] >= th and not taken[k]:
                        taken[k] = True
                        acc["dets"].append((d[4], True))
                    else:
                        acc["dets"].append((d[4], False))
    ap = {}
    for key, acc in pooled.items():
        if acc["num_gt"] == 0:
            continue
        ranked = sorted(acc["dets"], key=lambda st: (-st[0], st[1]))  # FP first among ties
        tp = fp = 0
        precision, recall = [], []
        for _, is_tp in ranked:
            tp += is_tp
            fp += not is_tp
            precision.append(tp / (tp + fp))
            recall.append(tp / acc["num_gt"])
        ap[key] = ref_compute_average_precision(precision, recall)
    return ap


def random_case(rng, n_pairs=25, n_labels=4):
    """Random pairs/detections on a coarse grid (many IoU and score ties, duplicates, empty clips)."""
    grid = np.linspace(0.0, 1.0, 9)

    def box():
        x = np.sort(rng.choice(grid, 2, replace=False))
        y = np.sort(rng.choice(grid, 2, replace=False))
        return [float(x[0]), float(y[0]), float(x[1]), float(y[1])]

    pairs, dets = [], []
    for _ in range(n_pairs):
        n_sec = int(rng.integers(1, 4))
        gt = [[box() for _ in range(int(rng.integers(0, 3)))] for _ in range(n_sec)]
        label = [int(rng.integers(1, n_labels + 1))] + ([80] if rng.random() < 0.3 else [])
        pairs.append(pair(gt, label=label))
        pd = []
        for j in range(3 * n_sec + int(rng.integers(0, 2))):  # sometimes an extra clip (ignored)
            clip = []
            for _ in range(int(rng.integers(0, 5))):
                g = gt[min(j // 3, n_sec - 1)]
                if g and rng.random() < 0.6:
                    b = list(g[int(rng.integers(len(g)))])
                    jit = rng.choice([0.0, 0.125], 4)
                    b = [b[0] - jit[0], b[1] - jit[1], b[2] + jit[2], b[3] + jit[3]]
                else:
                    b = box()
                clip.append(b + [float(rng.choice([0.2, 0.4, 0.5, 0.7, 0.9]))])
            pd.append(clip)
        dets.append(pd)
    return pairs, dets


# ----------------------------------------------------------------------------- hand-built cases
def test_perfect_detections_give_one():
    pairs = [pair([[A], [A, FAR]], label=(11, 74)), pair([[FAR]], label=(5,))]
    dets = [
        [[det(A, 0.9)]] * 3 + [[det(A, 0.8), det(FAR, 0.7)]] * 3,
        [[det(FAR, 0.6)]] * 3,
    ]
    r = frame_map(pairs, dets)
    assert r == {"mAP": 1.0, "AP": {"5": 1.0, "11+74": 1.0}, "num_labels": 2}


def test_false_positive_above_true_positive():
    # one second, one box -> 3 ground-truth boxes; ranking FP(0.9), TP(0.8): P = 1/2 at R = 1/3
    r = frame_map([pair([[A]])], [[[det(FAR, 0.9), det(A, 0.8)], [], []]])
    assert r["AP"]["11"] == pytest.approx(1 / 6, abs=1e-12)
    # with a true positive in every clip: FP, TP, TP, TP -> precision 3/4 at recall 1
    r = frame_map([pair([[A]])], [[[det(FAR, 0.9), det(A, 0.8)], [det(A, 0.7)], [det(A, 0.6)]]])
    assert r["mAP"] == pytest.approx(3 / 4, abs=1e-12)


def test_duplicate_detection_is_false_positive():
    # clip 0: TP 0.9, duplicate 0.8 on the same box (FP); clip 1: TP 0.7
    # P = 1, 1/2, 2/3 at R = 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    r = frame_map([pair([[A]])], [[[det(A, 0.9), det(A, 0.8)], [det(A, 0.7)], []]])
    assert r["mAP"] == pytest.approx(5 / 9, abs=1e-12)


def test_empty_clips_and_labels_without_detections():
    pairs = [pair([[A], [A]], label=(1,)), pair([[A]], label=(2,)), pair([[], [A]], label=(3,))]
    dets = [
        [[det(A, 0.9)], [], [], [], [], []],  # 1 TP out of 6
        [[], [], []],  # label 2: ground truth, no detection -> AP 0
        [[det(A, 0.5)], [], [], [det(A, 0.5)], [det(A, 0.5)], [det(A, 0.5)]],  # FP then 3 TPs, tied
    ]
    r = frame_map(pairs, dets)
    # label 3: the four detections tie at 0.5 -> one step: P = 3/4 at R = 1
    assert r["AP"] == pytest.approx({"1": 1 / 6, "2": 0.0, "3": 3 / 4}, abs=1e-12)
    assert r["num_labels"] == 3
    assert r["mAP"] == pytest.approx((1 / 6 + 0 + 3 / 4) / 3, abs=1e-12)


def test_label_without_ground_truth_is_left_out():
    pairs = [pair([[A]], label=(1,)), pair([[], []], label=(2,))]
    dets = [[[det(A, 0.9)]] * 3, [[det(A, 0.99)]] * 6]  # label 2: only false positives
    r = frame_map(pairs, dets)
    assert r == {"mAP": 1.0, "AP": {"1": 1.0}, "num_labels": 1}


def test_no_ground_truth_at_all_gives_nan():
    r = frame_map([pair([[], []], label=(2,))], [[[det(A, 0.9)]] * 6])
    assert math.isnan(r["mAP"]) and r["AP"] == {} and r["num_labels"] == 0
    r = frame_map([], [])
    assert math.isnan(r["mAP"]) and r["num_labels"] == 0
    # a pair without seconds anywhere in the list
    r = frame_map([pair([[A]], label=(1,)), {"query": {"label": [2]}, "reference": {"gt": []}}],
                  [[[det(A, 0.9)]] * 3, []])
    assert r == {"mAP": 1.0, "AP": {"1": 1.0}, "num_labels": 1}


def test_tie_order_independence():
    # a TP and an FP with the same score: one step -> P = 1/2 at R = 1/3 whatever the order
    for clip in ([det(A, 0.9), det(FAR, 0.9)], [det(FAR, 0.9), det(A, 0.9)]):
        r = frame_map([pair([[A]])], [[clip, [], []]])
        assert r["mAP"] == pytest.approx(1 / 6, abs=1e-12)
    # ties across pairs and clips: permuting pairs and detections within clips changes nothing
    rng = np.random.default_rng(3)
    pairs, dets = random_case(rng, n_pairs=20)
    base = frame_map(pairs, dets)
    perm = rng.permutation(len(pairs))
    shuffled = [[[c[k] for k in rng.permutation(len(c))] for c in dets[i]] for i in perm]
    again = frame_map([pairs[i] for i in perm], shuffled)
    assert again["AP"] == pytest.approx(base["AP"], abs=1e-12)


def test_ground_truth_counted_once_per_clip():
    dets = [[[det(A, 0.9)], [], []]]  # the box found in one of the three clips of its second
    assert frame_map([pair([[A]])], dets)["mAP"] == pytest.approx(1 / 3, abs=1e-12)
    assert frame_map([pair([[A]])], dets, clips_per_second=1)["mAP"] == 1.0
    assert frame_map([pair([[A]])], [[[det(A, 0.9)], []]], clips_per_second=2)["mAP"] == 0.5
    # two boxes in a second, both found in every clip: 6 of 6
    two = [[det(A, 0.9), det(FAR, 0.8)]] * 3
    assert frame_map([pair([[A, FAR]])], [two])["mAP"] == 1.0


def test_argmax_matching_without_fall_back():
    g1, g2 = [0.0, 0.0, 0.4, 0.4], [0.1, 0.0, 0.5, 0.4]  # IoU(g1, g2) = 0.6
    d2 = [0.04, 0.0, 0.44, 0.4]  # IoU 0.818 with g1, 0.739 with g2: both >= 0.5, argmax g1
    clip = [det(g1, 0.9), det(d2, 0.8)]  # d1 takes g1; d2's argmax g1 is taken -> FP (no fall-back)
    r = frame_map([pair([[g1, g2]])], [[clip, [], []]])
    assert r["mAP"] == pytest.approx(1 / 6, abs=1e-12)  # 1 TP of 6, ranked first
    # the same detections each with their own box: 2 TPs of 6
    r = frame_map([pair([[g1, g2]])], [[[det(g1, 0.9), det(g2, 0.8)], [], []]])
    assert r["mAP"] == pytest.approx(1 / 3, abs=1e-12)


def test_iou_ties_take_the_first_listed_box():
    g1, g2 = [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5]
    d = [0.125, 0.0, 0.625, 0.5]  # IoU 0.6 with both, exactly
    clip = [det(d, 0.9), det(g2, 0.8)]
    # d takes g1 (listed first), then g2's own detection is a TP: 2 of 6
    assert frame_map([pair([[g1, g2]])], [[clip, [], []]])["mAP"] == pytest.approx(1 / 3, abs=1e-12)
    # g2 listed first: d takes g2, the second detection's argmax g2 is taken: 1 of 6
    assert frame_map([pair([[g2, g1]])], [[clip, [], []]])["mAP"] == pytest.approx(1 / 6, abs=1e-12)


def test_iou_threshold_is_inclusive_and_thresholds_differ():
    g = [0.0, 0.0, 0.5, 0.5]
    d = [0.125, 0.0, 0.625, 0.5]  # IoU 0.375 / 0.625 = 0.6
    dets = [[[det(d, 0.9)]] * 3]
    assert frame_map([pair([[g]])], dets, iou_threshold=0.6)["mAP"] == 1.0
    assert frame_map([pair([[g]])], dets, iou_threshold=0.7)["mAP"] == 0.0
    multi = frame_map_multi([pair([[g]])], dets)
    assert sorted(multi) == [0.3, 0.5, 0.7]
    assert [multi[t]["mAP"] for t in (0.3, 0.5, 0.7)] == [1.0, 1.0, 0.0]


def test_second_without_ground_truth_makes_false_positives():
    # second 0 has no ground truth: its detections (even on the box of second 1) are FPs
    pairs = [pair([[], [A]])]
    dets = [[[det(A, 0.95)], [], [], [det(A, 0.9)], [det(A, 0.9)], [det(A, 0.9)]]]
    # FP 0.95, then 3 TPs: P = 3/4 at R = 1
    assert frame_map(pairs, dets)["mAP"] == pytest.approx(0.75, abs=1e-12)


def test_official_split_yxyx(tmp_path):
    gt_xyxy = [0.2, 0.1, 0.9, 0.5]
    official = [[
        {"id": "q", "frames": ["0902"], "boxes": [[0.1, 0.1, 0.5, 0.5]], "label": [11]},
        {"id": "r", "start": 902, "end": 903, "gt": [[[0.1, 0.2, 0.5, 0.9]]]},  # yxyx
    ]]
    path = tmp_path / "official.json"
    path.write_text(json.dumps(official))
    dets = [[[det(gt_xyxy, 0.9)]] * 3]
    assert frame_map(load_pairs(path, box_order="yxyx"), dets)["mAP"] == 1.0
    # read without the box order, the transposed ground truth does not match (IoU 0.19)
    assert frame_map(load_pairs(path), dets)["mAP"] == 0.0
    # frame_map also takes the [query, reference] list form directly
    assert frame_map([[official[0][0], {"gt": [[gt_xyxy]]}]], dets)["mAP"] == 1.0


def test_array_and_tensor_inputs():
    pairs = [pair([[A], [FAR]])]
    lists = [[[det(A, 0.9), det(FAR, 0.3)]] * 3 + [[det(FAR, 0.8)]] * 3]
    r = frame_map(pairs, lists)
    tensors = [[torch.tensor(c, dtype=torch.float32) for c in lists[0]]]
    dense = [np.array([c + [det(FAR, 0.0)] * (2 - len(c)) for c in lists[0]])]  # [clips, 2, 5]
    assert frame_map(pairs, tensors)["AP"] == pytest.approx(r["AP"])
    assert frame_map(pairs, [torch.tensor(dense[0])])["AP"] == pytest.approx(
        frame_map(pairs, dense)["AP"])


@pytest.mark.parametrize("bad, match", [
    (([pair([[A]])], []), "detections cover 0 pairs"),
    (([pair([[A], [A]])], [[[det(A, 0.9)]] * 5]), "needs 6"),
    (([pair([[A]])], [[[det([0.5, 0.1, 0.4, 0.5], 0.9)], [], []]]), "x1 > x2"),
    (([pair([[A]])], [[[], [det([0.1, 0.6, 0.4, 0.5], 0.9)], []]]), "pair 0, clip 1"),
    (([pair([[A]])], [[[det(A, float("nan"))], [], []]]), "non-finite score"),
    (([pair([[A]])], [[[], [], [det(A, float("inf"))]]]), "non-finite score"),
    (([pair([[A]])], [[[A], [], []]]), r"\[K, 5\]"),
    (([pair([[A], [[0.5, 0.1, 0.4, 0.5]]])], [[[]] * 6]), "pair 0, second 1 ground truth"),
])
def test_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        frame_map(*bad)


def test_value_error_arguments():
    with pytest.raises(ValueError, match="clips_per_second"):
        frame_map([pair([[A]])], [[[]] * 3], clips_per_second=0)
    with pytest.raises(ValueError, match="finite"):
        frame_map([pair([[A]])], [[[]] * 3], iou_threshold=float("nan"))


def test_extra_clips_are_ignored():
    dets = [[[det(A, 0.9)]] * 3 + [[det([0.5, 0.1, 0.4, 0.5], float("nan"))]]]
    assert frame_map([pair([[A]])], dets)["mAP"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_reference_implementation(seed):
    pairs, dets = random_case(np.random.default_rng(seed))
    for th in (0.3, 0.5, 0.7):
        ours = frame_map(pairs, dets, iou_threshold=th)
        ref = ref_frame_map(pairs, dets, th)
        assert ours["AP"].keys() == ref.keys()
        assert ours["AP"] == pytest.approx(ref, abs=1e-12)
        assert ours["mAP"] == pytest.approx(np.mean(list(ref.values())), abs=1e-12)
    multi = frame_map_multi(pairs, dets)
    assert multi[0.5] == frame_map(pairs, dets, 0.5)


def test_average_precision_function():
    assert average_precision([0.9, 0.8], [True, False], 2) == pytest.approx(0.5)
    assert average_precision([0.8, 0.9], [True, False], 2) == pytest.approx(0.25)  # FP first: P 1/2 at R 1/2
    assert average_precision([], [], 3) == 0.0
    assert math.isnan(average_precision([0.5], [False], 0))
    # ActivityNet example: TP, FP, TP with 2 GT -> P 1, 1/2, 2/3 -> AP = 1/2 + 1/2 * 2/3
    assert average_precision([3, 2, 1], [True, False, True], 2) == pytest.approx(0.5 + 1 / 3)


def test_label_key():
    assert label_key([80, 11, 74]) == "11+74+80"
    assert label_key((5,)) == "5"
    assert label_key(7) == "7"
    assert label_key("3+5") == "3+5"


# ----------------------------------------------------------------------------- video-mAP
def moving_gt(n_sec):
    """Per-second boxes of an actor moving right by 0.05 per second."""
    return [[[0.1 + 0.05 * s, 0.2, 0.4 + 0.05 * s, 0.6]] for s in range(n_sec)]


def gt_tube(gt, start_clip=0, end_clip=None):
    boxes = np.repeat(np.array([g[0] for g in gt]), 3, axis=0)[start_clip:end_clip]
    return Tube(start_clip, boxes, np.full(len(boxes), 0.9))


def test_video_map_perfect_and_partial():
    gt = moving_gt(4)
    pairs = [pair(gt)]
    r = video_map(pairs, [[gt_tube(gt)]])
    assert r[0.2] == {"mAP": 1.0, "AP": {"11": 1.0}, "num_labels": 1} and r[0.5]["mAP"] == 1.0
    # 6 of 12 clips, exact boxes: ST-IoU = 6/12 = 0.5 -> TP at both thresholds (>=)
    r = video_map(pairs, [[gt_tube(gt, 0, 6)]])
    assert r[0.2]["mAP"] == 1.0 and r[0.5]["mAP"] == 1.0
    # 5 of 12 clips: ST-IoU 0.417 -> TP at 0.2 only
    r = video_map(pairs, [[gt_tube(gt, 0, 5).to_dict()]])  # dict form accepted
    assert r[0.2]["mAP"] == 1.0 and r[0.5]["mAP"] == 0.0


def test_video_map_duplicates_and_false_positives():
    gt = moving_gt(3)
    good = gt_tube(gt)
    dup = Tube(0, good.boxes, np.full(9, 0.5))
    wrong = Tube(0, np.tile([0.7, 0.7, 0.9, 0.9], (9, 1)), np.full(9, 0.95))
    # ranking: wrong (FP), good (TP), dup (FP: its ground-truth tube is matched) -> P 1/2 at R 1
    r = video_map([pair(gt)], [[dup, good, wrong]])
    assert r[0.5]["mAP"] == pytest.approx(0.5, abs=1e-12)
    # two actors -> two ground-truth tubes; one found -> AP 1/2
    two = [[g[0], [0.6, 0.1, 0.9, 0.5]] for g in gt]
    r = video_map([pair(two)], [[good]])
    assert r[0.5]["mAP"] == pytest.approx(0.5, abs=1e-12)


def test_video_map_labels_and_nan():
    gt = moving_gt(2)
    pairs = [pair(gt, label=(1,)), pair(gt, label=(2,)), pair([[], []], label=(3,))]
    r = video_map(pairs, [[gt_tube(gt)], [], [gt_tube(gt)]], iou_thresholds=(0.5,))
    assert r == {0.5: {"mAP": 0.5, "AP": {"1": 1.0, "2": 0.0}, "num_labels": 2}}
    r = video_map([pair([[], []])], [[gt_tube(gt)]])
    assert math.isnan(r[0.2]["mAP"]) and r[0.2]["num_labels"] == 0
    with pytest.raises(ValueError, match="tubes cover 2 pairs"):
        video_map(pairs[:1], [[], []])
    with pytest.raises(ValueError, match="non-finite tube score"):
        video_map(pairs[:1], [[Tube(0, [A], [float("nan")])]])


def test_video_map_from_detections():
    gt = moving_gt(3)
    per_clip = [[det(g[0], 0.9)] for g in gt for _ in range(3)]
    r = video_map_from_detections([pair(gt)], [per_clip])
    assert r[0.2]["mAP"] == 1.0 and r[0.5]["mAP"] == 1.0
    # the same detections found only in the first second: 3 of 9 clips -> ST-IoU 1/3
    first = per_clip[:3] + [[] for _ in range(6)]
    r = video_map_from_detections([pair(gt)], [first])
    assert r[0.2]["mAP"] == 1.0 and r[0.5]["mAP"] == 0.0
    with pytest.raises(ValueError, match="needs 9"):
        video_map_from_detections([pair(gt)], [per_clip[:8]])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def files(tmp_path):
    gt = moving_gt(3)
    pairs = [pair(gt, label=(11, 74)), pair([[A], [A]], label=(5,))]
    dets = [
        [[det(g[0], 0.9)] for g in gt for _ in range(3)],
        [[det(A, 0.8), det(FAR, 0.85)]] * 3 + [[]] * 3,
    ]
    pp, dp = tmp_path / "pairs.json", tmp_path / "dets.json"
    save_pairs(pairs, pp)
    save_detections(dets, dp)
    return pp, dp, load_pairs(pp), dets


def run_cli(capsys, *argv):
    code = cli_main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_iou_prints_exactly_frame_map(capsys, files):
    pp, dp, pairs, dets = files
    code, out, _ = run_cli(capsys, pp, dp, "--iou", 0.7)
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(frame_map(pairs, dets, 0.7)))
    code, out, _ = run_cli(capsys, pp, dp, "--iou", 0.5, "--video-map")
    got = json.loads(out)
    assert set(got) == {"mAP", "AP", "num_labels", "video_mAP"} and set(got["video_mAP"]) == {"0.2", "0.5"}


def test_cli_default_report(capsys, files, tmp_path):
    pp, dp, pairs, dets = files
    code, out, _ = run_cli(capsys, pp, dp, "--out", tmp_path / "r.json")
    assert code == 0
    got = json.loads(out)
    assert json.loads((tmp_path / "r.json").read_text()) == got
    headline = frame_map(pairs, dets, 0.5)
    assert {k: got[k] for k in ("mAP", "AP", "num_labels")} == json.loads(json.dumps(headline))
    assert set(got["frame_mAP"]) == {"0.3", "0.5", "0.7"}
    assert got["frame_mAP"]["0.5"] == {k: got[k] for k in ("mAP", "AP", "num_labels")}
    assert got["frame_mAP"]["0.3"] == json.loads(json.dumps(frame_map(pairs, dets, 0.3)))
    # label 5: FP 0.85 above TP 0.8 in each of 3 clips, 6 ground-truth boxes -> P 1/2 at R 1/2
    assert got["AP"] == pytest.approx({"5": 0.25, "11+74": 1.0})
    assert got["video_mAP"]["0.5"]["AP"]["11+74"] == 1.0
    code, out, _ = run_cli(capsys, pp, dp, "--no-video-map")
    assert "video_mAP" not in json.loads(out)


def test_cli_nan_is_null_and_errors(capsys, tmp_path):
    pp, dp = tmp_path / "p.json", tmp_path / "d.json"
    save_pairs([pair([[], []])], pp)
    save_detections([[[det(A, 0.9)]] * 6], dp)
    code, out, _ = run_cli(capsys, pp, dp, "--iou", 0.5, "--indent", -1)
    assert code == 0 and out.strip() == '{"mAP": null, "AP": {}, "num_labels": 0}'
    save_detections([], dp)
    code, out, err = run_cli(capsys, pp, dp)
    assert code == 2 and out == "" and "detections cover 0 pairs" in err
    code, out, err = run_cli(capsys, pp, tmp_path / "missing.json")
    assert code == 2 and "missing.json" in err


@pytest.mark.slow
def test_cli_subprocess(files):
    pp, dp, pairs, dets = files
    proc = subprocess.run([sys.executable, "-m", "stvr.cli", "evaluate", str(pp), str(dp), "--iou", "0.3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(frame_map(pairs, dets, 0.3)))


def test_cli_official_box_order(capsys, tmp_path):
    official = [[
        {"id": "q", "frames": [902], "boxes": [[0.1, 0.1, 0.5, 0.5]], "label": [11]},
        {"id": "r", "start": 902, "end": 903, "gt": [[[0.1, 0.2, 0.5, 0.9]]]},  # yxyx
    ]]
    pp, dp = tmp_path / "official.json", tmp_path / "d.json"
    pp.write_text(json.dumps(official))
    save_detections([[[det([0.2, 0.1, 0.9, 0.5], 0.9)]] * 3], dp)
    code, out, _ = run_cli(capsys, pp, dp, "--iou", 0.5, "--box-order", "yxyx")
    assert code == 0 and json.loads(out) == {"mAP": 1.0, "AP": {"11": 1.0}, "num_labels": 1}
    code, out, _ = run_cli(capsys, pp, dp, "--iou", 0.5)
    assert code == 0 and json.loads(out)["mAP"] == 0.0
