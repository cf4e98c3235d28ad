"""stvr.evaluation.match_diagnostics (API.md section 4, "Matching diagnostics"),
load_actors, ``stvr evaluate --data`` and the diagnostics in the demo / Table 1 tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stvr.cli import main as cli_main
from stvr.data.pairs import save_pairs
from stvr.evaluation import frame_map, load_actors, match_diagnostics, roc_auc
from stvr.predict import save_detections

A = [0.05, 0.05, 0.25, 0.45]
B = [0.35, 0.10, 0.55, 0.50]
C = [0.70, 0.30, 0.95, 0.80]
D = [0.10, 0.60, 0.30, 0.95]


def pair(gt, label=(1,), vid="v", start=10):
    return {
        "query": {"id": "q", "frames": [0], "boxes": [[0.1, 0.1, 0.5, 0.5]], "label": list(label)},
        "reference": {"id": vid, "start": start, "end": start + len(gt), "gt": [list(g) for g in gt]},
    }


def det(box, score):
    return list(box) + [float(score)]


# ----------------------------------------------------------------------------- reference implementation
from test_evaluation import ref_iou  # noqa: E402  (the plain-Python IoU of the frame-mAP reference)


def ref_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def ref_diagnostics(pairs, dets, actors, th=0.5, cps=3, seeds=3):
    """Plain-Python loops over (pair, clip, actor), straight from API.md."""
    n_inst, n_cov, scores, labels, chance_boxes = 0, 0, [], [], []
    for p, pd in zip(pairs, dets):
        ref = p["reference"]
        per_pair = []
        for j in range(cps * len(ref["gt"])):
            gt = ref["gt"][j // cps]
            acts = actors.get((ref["id"], ref["start"] + j // cps), [])
            per_pair.append([list(a) for a in acts])
            for a in acts:
                n_inst += 1
                cover = [d[4] for d in pd[j] if ref_iou(d[:4], a) >= th]
                if cover:
                    n_cov += 1
                    scores.append(max(cover))
                    labels.append(any(ref_iou(a, g) >= 0.99 for g in gt))
        chance_boxes.append(per_pair)
    maps = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        chance = [[[a + [float(rng.random())] for a in clip] for clip in pp] for pp in chance_boxes]
        maps.append(frame_map(pairs, chance, th, cps)["mAP"])
    return {"actor_recall": n_cov / n_inst if n_inst else math.nan,
            "match_auc": ref_auc(scores, labels), "chance_mAP": float(np.mean(maps)) if maps else math.nan}


def same(a, b):
    return all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-12) for k in a)


# ----------------------------------------------------------------------------- hand-built cases
def two_second_case(score_gt, score_other):
    """Second 10: actors A (gt), B, C; second 11: actors B (gt), C. Detections box every actor."""
    pairs = [pair([[A], [B]])]
    actors = {("v", 10): [A, B, C], ("v", 11): [B, C]}
    clips = [[det(A, score_gt), det(B, score_other), det(C, score_other)]] * 3 \
        + [[det(B, score_gt), det(C, score_other)]] * 3
    return pairs, [clips], actors


def test_perfect_and_reversed_matcher():
    pairs, dets, actors = two_second_case(0.9, 0.2)
    r = match_diagnostics(pairs, dets, actors)
    assert set(r) == {"actor_recall", "match_auc", "chance_mAP"}
    assert r["actor_recall"] == 1.0 and r["match_auc"] == 1.0
    pairs, dets, actors = two_second_case(0.2, 0.9)
    r = match_diagnostics(pairs, dets, actors)
    assert r["actor_recall"] == 1.0 and r["match_auc"] == 0.0


def test_equal_scores_box_every_actor():
    pairs, dets, actors = two_second_case(0.5, 0.5)
    r = match_diagnostics(pairs, dets, actors)
    assert r["actor_recall"] == 1.0 and r["match_auc"] == 0.5


def test_actor_score_is_the_best_covering_detection():
    pairs = [pair([[A]])]
    actors = {("v", 10): [A, B]}
    # B covered by a high-scoring detection and a low one: B's score is the max -> AUC 0
    clip = [det(A, 0.6), det(B, 0.3), det(B, 0.8), det(C, 0.99)]  # C is no actor: ignored
    r = match_diagnostics(pairs, [[clip] * 3], actors)
    assert r["match_auc"] == 0.0 and r["actor_recall"] == 1.0


def test_recall_with_missed_actors_is_the_exact_fraction():
    pairs = [pair([[A], [B]])]
    actors = {("v", 10): [A, B, C], ("v", 11): [B, C, D]}
    shifted = [A[0] + 0.15, A[1], A[2] + 0.15, A[3]]    # IoU with A = 1/7 < 0.5
    assert ref_iou(shifted, A) < 0.5
    clips = [[det(A, 0.9)], [det(A, 0.9), det(C, 0.1)], [det(shifted, 0.9)],
             [], [det(D, 0.5)], [det(B, 0.7), det(C, 0.2), det(D, 0.1)]]
    r = match_diagnostics(pairs, [clips], actors)
    # covered: 1 + 2 + 0 + 0 + 1 + 3 = 7 of 3 * 3 + 3 * 3 = 18 (pair, clip, actor)
    assert r["actor_recall"] == 7 / 18
    assert r == pytest.approx(ref_diagnostics(pairs, [clips], actors), nan_ok=True)
    # a threshold just below 1/7 covers A in clip 2 as well (not B: IoU 0.123)
    r = match_diagnostics(pairs, [clips], actors, iou_threshold=0.13)
    assert r["actor_recall"] == 8 / 18


def test_random_scores_give_chance_auc():
    rng = np.random.default_rng(123)
    pairs, dets, actors = [], [], {}
    for i in range(300):
        vid = f"video{i}"
        boxes = [A, B, C, D]
        actors[(vid, 10)] = boxes
        actors[(vid, 11)] = boxes
        pairs.append(pair([[boxes[i % 4]], [boxes[(i + 1) % 4]]], vid=vid, label=(1 + i % 3,)))
        dets.append([[det(b, rng.random()) for b in boxes] for _ in range(6)])
    r = match_diagnostics(pairs, dets, actors)
    # 1800 positives and 5400 negatives: the AUC's standard deviation is ~0.008
    assert r["actor_recall"] == 1.0
    assert abs(r["match_auc"] - 0.5) < 0.04
    # a mildly informative score is seen as such
    dets2 = [[[d[:4] + [d[4] + (0.5 if ref_iou(d[:4], p["reference"]["gt"][j // 3][0]) > 0.99 else 0.0)]
               for d in clip] for j, clip in enumerate(pd)] for p, pd in zip(pairs, dets)]
    assert match_diagnostics(pairs, dets2, actors)["match_auc"] > 0.8


def test_chance_map_is_the_mean_of_frame_map_over_seeds():
    pairs = [pair([[A], [B]], label=(1,)), pair([[C, D]], label=(2,), vid="w", start=3),
             pair([[], [A]], label=(1,), vid="w", start=4)]
    actors = {("v", 10): [A, B, C], ("v", 11): [B, D], ("w", 3): [C, D, A],
              ("w", 4): [B], ("w", 5): [A, C]}
    dets = [[[det(A, 0.5)]] * 6, [[]] * 3, [[det(A, 0.1)]] * 6]
    for seeds in (1, 3, 5):
        expected = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            chance = []
            for p in pairs:
                ref = p["reference"]
                clips = []
                for j in range(3 * len(ref["gt"])):
                    acts = actors[(ref["id"], ref["start"] + j // 3)]
                    clips.append([list(a) + [rng.random()] for a in acts])
                chance.append(clips)
            expected.append(frame_map(pairs, chance)["mAP"])
        got = match_diagnostics(pairs, dets, actors, chance_seeds=seeds)["chance_mAP"]
        assert got == pytest.approx(float(np.mean(expected)), abs=1e-12)
        assert 0.0 < got < 1.0
    assert math.isnan(match_diagnostics(pairs, dets, actors, chance_seeds=0)["chance_mAP"])


def test_nan_auc_without_negatives_or_positives():
    pairs = [pair([[A], [B]])]
    only_gt = {("v", 10): [A], ("v", 11): [B]}
    dets = [[[det(A, 0.3)]] * 3 + [[det(B, 0.7)]] * 3]
    r = match_diagnostics(pairs, dets, only_gt)
    assert r["actor_recall"] == 1.0 and math.isnan(r["match_auc"])
    assert r["chance_mAP"] == 1.0          # the exact boxes of the only actors
    no_gt = {("v", 10): [C], ("v", 11): [C]}
    r = match_diagnostics(pairs, [[[det(C, 0.3)]] * 6], no_gt)
    assert r["actor_recall"] == 1.0 and math.isnan(r["match_auc"]) and r["chance_mAP"] == 0.0
    # no detection covers anyone: recall 0, AUC NaN; no actor at all: recall NaN
    r = match_diagnostics(pairs, [[[]] * 6], {("v", 10): [A, C]})
    assert r["actor_recall"] == 0.0 and math.isnan(r["match_auc"])
    r = match_diagnostics(pairs, [[[det(A, 0.3)]] * 6], {})
    assert math.isnan(r["actor_recall"]) and math.isnan(r["match_auc"])


def test_positive_needs_iou_099_with_a_ground_truth_box():
    near = [A[0] + 0.01, A[1], A[2], A[3]]           # IoU 0.95 with A: another actor
    assert 0.5 < ref_iou(near, A) < 0.99
    pairs = [pair([[A]])]
    r = match_diagnostics(pairs, [[[det(near, 0.9), det(B, 0.1)]] * 3], {("v", 10): [near, B]})
    assert math.isnan(r["match_auc"])                 # no positive among the actors


def test_matches_the_reference_on_random_cases():
    rng = np.random.default_rng(7)
    grid = [[x, y, x + w, y + h] for x in (0.0, 0.2, 0.5) for y in (0.0, 0.3) for w in (0.2, 0.4) for h in (0.3, 0.5)]
    for trial in range(12):
        pairs, dets, actors = [], [], {}
        for i in range(int(rng.integers(1, 6))):
            vid, start, n_sec = f"v{int(rng.integers(0, 3))}", int(rng.integers(0, 4)), int(rng.integers(1, 4))
            gt = []
            for s in range(n_sec):
                key = (vid, start + s)
                if key not in actors:
                    actors[key] = [grid[k] for k in rng.choice(len(grid), int(rng.integers(0, 5)), replace=False)]
                acts = actors[key]
                gt.append([a for a in acts if rng.random() < 0.4])
            pairs.append(pair(gt, label=(int(rng.integers(1, 4)),), vid=vid, start=start))
            dets.append([[det(grid[int(rng.integers(0, len(grid)))], rng.choice([0.1, 0.5, 0.9]))
                          for _ in range(int(rng.integers(0, 5)))] for _ in range(3 * n_sec)])
        got = match_diagnostics(pairs, dets, actors, iou_threshold=0.4)
        want = ref_diagnostics(pairs, dets, actors, th=0.4)
        assert same(got, want), (trial, got, want)


def test_roc_auc_ties_and_brute_force():
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [True, True])) and math.isnan(roc_auc([], []))
    rng = np.random.default_rng(0)
    s = rng.choice([0.1, 0.2, 0.3, 0.4], 200)
    y = rng.random(200) < 0.3
    assert roc_auc(s, y) == pytest.approx(ref_auc(s.tolist(), y.tolist()), abs=1e-12)


def test_errors_follow_frame_map():
    pairs, dets, actors = two_second_case(0.9, 0.2)
    with pytest.raises(ValueError, match="detections cover"):
        match_diagnostics(pairs, dets + dets, actors)
    with pytest.raises(ValueError, match="non-finite score"):
        match_diagnostics(pairs, [[[det(A, math.nan)]] * 6], actors)
    with pytest.raises(ValueError, match="needs"):
        match_diagnostics(pairs, [[[det(A, 0.5)]] * 5], actors)
    with pytest.raises(ValueError, match=r"actors\[\('v', 10\)\]"):
        match_diagnostics(pairs, dets, {("v", 10): [[0.5, 0.1, 0.2, 0.3]]})


# ----------------------------------------------------------------------------- dataset roots and the CLI
def write_root(root):
    ann = root / "annotations"
    ann.mkdir(parents=True)
    # person 2 of v@10 has two actions (two rows, one box); person 1 listed after it
    (ann / "train.csv").write_text(
        "v,10,0.35,0.10,0.55,0.50,3,2\n"
        "v,10,0.35,0.10,0.55,0.50,4,2\n"
        "v,10,0.05,0.05,0.25,0.45,1,1\n"
        "v,11,0.35,0.10,0.55,0.50,1,2\n")
    (ann / "val.csv").write_text("v,11,0.70,0.30,0.95,0.80,2,5\nw,3,0.10,0.60,0.30,0.95,1,0\n")
    return root


def test_load_actors(tmp_path):
    root = write_root(tmp_path / "root")
    actors = load_actors(root)
    assert actors == {("v", 10): [A, B], ("v", 11): [B, C], ("w", 3): [D]}
    with pytest.raises(FileNotFoundError, match="annotations"):
        load_actors(tmp_path / "nothing")


def test_cli_data_adds_diagnostics(tmp_path, capsys):
    root = write_root(tmp_path / "root")
    pairs = [pair([[A], [B]])]
    dets = [[[det(A, 0.9), det(B, 0.2)]] * 3 + [[det(B, 0.8), det(C, 0.1)]] * 3]
    pp, dp = tmp_path / "p.json", tmp_path / "d.json"
    save_pairs(pairs, pp)
    save_detections(dets, dp)
    for extra in ([], ["--iou", "0.5"]):
        assert cli_main(["evaluate", str(pp), str(dp), "--data", str(root), "--no-video-map", *extra]) == 0
        got = json.loads(capsys.readouterr().out)
        want = match_diagnostics(pairs, dets, load_actors(root))
        assert got["diagnostics"] == pytest.approx(want)
        assert got["diagnostics"]["match_auc"] == 1.0 and got["diagnostics"]["actor_recall"] == 1.0
        assert got["mAP"] == pytest.approx(frame_map(pairs, dets)["mAP"])
    assert cli_main(["evaluate", str(pp), str(dp), "--no-video-map"]) == 0
    assert "diagnostics" not in json.loads(capsys.readouterr().out)
    # NaN AUC (no negative actor) is printed as null
    (root / "annotations" / "train.csv").write_text("v,10,0.05,0.05,0.25,0.45,1,1\nv,11,0.35,0.10,0.55,0.50,1,2\n")
    (root / "annotations" / "val.csv").write_text("")
    assert cli_main(["evaluate", str(pp), str(dp), "--data", str(root), "--iou", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["diagnostics"]["match_auc"] is None
    code = cli_main(["evaluate", str(pp), str(dp), "--data", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "annotations" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- training validation
def _tiny_val_set(n=2, seconds=1):
    """Pairs of noise frames with a bright actor at BOX (the query's match) and actors elsewhere."""
    import torch

    from stvr.data.dataset import PairSample

    S, box = 96, [0.25, 0.3, 0.6, 0.8]

    class ValSet(torch.utils.data.Dataset):
        clips_per_second = 3

        def __init__(self):
            self.pairs = [pair([[box]] * seconds, label=(1 + i % 2,), vid=f"r{i}", start=0) for i in range(n)]
            self.actors = {(f"r{i}", s): [box, [0.0, 0.0, 0.2, 0.25], [0.7, 0.6, 0.95, 0.95]]
                           for i in range(n) for s in range(seconds)}

        def __len__(self):
            return n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            clips = torch.rand(3 * seconds, 3, 8, S, S, generator=g) * 0.6 - 0.8
            x1, y1, x2, y2 = (int(round(v * S)) for v in box)
            clips[:, :, :, y1:y2, x1:x2] = 0.9
            b = torch.tensor(box)
            return PairSample(query_clips=clips[:3], query_boxes=b.repeat(3, 1), reference_clips=clips,
                              gt_boxes=[b[None].clone() for _ in range(3 * seconds)],
                              gt_labels=[torch.tensor([2]) for _ in range(3 * seconds)], pair_id=i)

    return ValSet()


def test_validate_reports_match_auc_and_actor_recall():
    import torch

    from stvr import train as T
    from stvr.config import apply_overrides, preset
    from stvr.model import STVRModel
    from stvr.predict import predict_pairs

    cfg = apply_overrides(preset("cpu"), ["model.image_size=96"])
    torch.manual_seed(0)
    model = STVRModel(cfg.model).eval()
    val = _tiny_val_set()
    scores = T.validate(model, val)
    assert set(scores) == {"0.3", "0.5", "0.7", "match_auc", "actor_recall"}
    dets = predict_pairs(model, val, progress=False)
    want = match_diagnostics(val.pairs, dets, val.actors)
    assert scores["actor_recall"] == pytest.approx(want["actor_recall"])
    assert (math.isnan(scores["match_auc"]) and math.isnan(want["match_auc"])) \
        or scores["match_auc"] == pytest.approx(want["match_auc"])
    # without actors (no attribute, no dataset root) the two keys are left out
    del val.actors
    assert set(T.validate(model, val)) == {"0.3", "0.5", "0.7"}


def test_validation_actors_from_the_dataset_root(tmp_path):
    from stvr.train import validation_actors

    root = write_root(tmp_path / "root")

    class WithRoot:
        pass

    ds = WithRoot()
    ds.root = root
    assert validation_actors(ds) == load_actors(root) and ds.actors == load_actors(root)
    ds2 = WithRoot()
    ds2.root = tmp_path / "no-root"
    assert validation_actors(ds2) is None


def test_val_log_gets_the_diagnostics_columns(tmp_path):
    import csv

    from stvr import train as T

    path = tmp_path / "val_log.csv"
    path.write_text("step,mAP@0.3,mAP@0.5,mAP@0.7\n10,0.1,0.2,0.3\n")   # a log of an older version
    logger = T._CsvLog(path, ["step", "mAP@0.3", "mAP@0.5", "mAP@0.7", *T.VAL_DIAGNOSTICS], append=True)
    logger.write({"step": 20, "mAP@0.5": 0.4, "match_auc": 0.75, "actor_recall": 0.9})
    rows = list(csv.DictReader(path.open()))
    assert rows[0] == {"step": "10", "mAP@0.3": "0.1", "mAP@0.5": "0.2", "mAP@0.7": "0.3",
                       "match_auc": "", "actor_recall": ""}
    assert rows[1]["match_auc"] == "0.75" and rows[1]["actor_recall"] == "0.9"


def test_training_logs_match_auc(tmp_path):
    import csv

    from stvr import train as T
    from stvr.config import apply_overrides, preset

    cfg = apply_overrides(preset("cpu"), ["model.image_size=96", "train.batch_size=2", "train.eval_every=2",
                                          "train.checkpoint_every=2", "train.device=cpu",
                                          "data.flip_probability=0"])
    out = tmp_path / "run"
    T.train(cfg, out, max_steps=2, train_set=_tiny_val_set(4), val_set=_tiny_val_set(2), progress=False)
    rows = list(csv.DictReader((out / "val_log.csv").open()))
    assert [r["step"] for r in rows] == ["2"]
    assert set(T.VAL_DIAGNOSTICS) <= set(rows[0])
    assert 0.0 <= float(rows[0]["actor_recall"]) <= 1.0
    auc = float(rows[0]["match_auc"])
    assert math.isnan(auc) or 0.0 <= auc <= 1.0


# ----------------------------------------------------------------------------- demo and Table 1 tables
def _fake_result(m05, auc, recall, chance=0.19):
    return {"frame_mAP": {"0.3": m05 + 0.1, "0.5": m05, "0.7": None}, "video_mAP": {"0.2": 0.3, "0.5": None},
            "diagnostics": {"actor_recall": recall, "match_auc": auc, "chance_mAP": chance}}


def test_demo_results_table_has_diagnostics_and_a_chance_row():
    from stvr.commands.demo import results_table

    table = results_table({"warp LSTM, trained": _fake_result(0.4, 0.83, 0.95),
                           "untrained (random init)": _fake_result(0.002, None, 0.1)})
    lines = table.splitlines()
    assert "actor recall" in lines[0] and "match AUC" in lines[0]
    assert lines[2].endswith("| 40.0 | n/a | 30.0 | n/a | 95.0 | 0.83 |")
    assert lines[3].endswith("| 10.0 | n/a |")
    assert lines[4].startswith("| chance") and "| 19.0 |" in lines[4]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    # results without diagnostics (no annotations): n/a and no chance row
    plain = results_table({"m": {"frame_mAP": {"0.5": 0.1}}})
    assert plain.splitlines()[-1].endswith("| n/a | n/a |") and "chance" not in plain


def test_table1_aggregates_match_auc_and_prints_the_chance_row():
    from stvr.commands import bench

    runs = {"warp": [dict(_fake_result(v, a, 0.9), seed=s) for s, v, a in ((0, 0.2, 0.6), (1, 0.4, 0.8))],
            "clip": [dict(_fake_result(0.1, None, 0.5), seed=0)]}
    agg = bench.aggregate(runs)
    assert agg["warp"]["match_auc"]["mean"] == pytest.approx(0.7) and agg["warp"]["match_auc"]["n"] == 2
    assert agg["warp"]["match_auc"]["per_seed"] == [0.6, 0.8]
    assert agg["clip"]["match_auc"] == {"mean": None, "std": None, "n": 0, "per_seed": [None]}
    assert agg["warp"]["actor_recall"]["mean"] == pytest.approx(0.9)
    from stvr.experiments import chance_map

    meta = {"data": "d", "test_pairs": 10, "test_labels": 3, "preset": "cpu", "steps": 5, "seeds": [0, 1],
            "missing": [], "machine": "x", "run_seconds": 1.0,
            "chance_mAP@0.5": chance_map(r for rs in runs.values() for r in rs)}
    md = bench.markdown(agg, meta)
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "match AUC" in header and "actor recall" in header
    warp = next(line for line in md.splitlines() if line.startswith("| Warp LSTM"))
    assert "| 0.70 ± 0.14 |" in warp and "| 90.0 ± 0.0 |" in warp
    chance = next(line for line in md.splitlines() if line.startswith("| Chance"))
    assert "| 19.0 |" in chance and chance.count("|") == header.count("|")
    assert "- Warp LSTM: 20.0 [0.60], 40.0 [0.80]" in md
    meta["chance_mAP@0.5"] = None
    assert "| Chance" not in bench.markdown(agg, meta)


def test_table1_adds_diagnostics_to_a_finished_run(tmp_path):
    from stvr.commands import bench
    from stvr.config import apply_overrides, preset

    pairs, dets, actors = two_second_case(0.9, 0.2)

    class FakeTestSet:
        clips_per_second = 3

    ds = FakeTestSet()
    ds.pairs, ds.actors = pairs, actors
    cfg = apply_overrides(preset("cpu"), [f"data.root={tmp_path}"])
    save_detections(dets, tmp_path / "test_detections.json")
    res = {"frame_mAP": {"0.5": 0.5}}
    bench._add_diagnostics(res, tmp_path, cfg, {(cfg.model.image_size, cfg.data.root): ds})
    assert res["diagnostics"] == pytest.approx(match_diagnostics(pairs, dets, actors))
    assert json.loads((tmp_path / "results.json").read_text())["diagnostics"] == res["diagnostics"]


def test_bench_match_relations_splits_the_match_auc_by_how_labels_relate(tmp_path):
    # benchmarks/bench_match_relations.py: the negatives split into nested / overlap / disjoint
    # labels; each kind's AUC against the positives; the pooled AUC is match_diagnostics' own
    from test_synthetic import _benchmark

    bench = _benchmark("bench_match_relations")
    assert bench.relation(frozenset({2, 4}), frozenset({2, 4})) == "positive"
    assert bench.relation(frozenset({2, 3, 4}), frozenset({2, 4})) == "nested"
    assert bench.relation(frozenset({2}), frozenset({2, 4})) == "nested"
    assert bench.relation(frozenset({2, 7}), frozenset({2, 4})) == "overlap"
    assert bench.relation(frozenset({3, 5}), frozenset({2, 4})) == "disjoint"

    E = [0.60, 0.05, 0.90, 0.35]
    # AVA rows: one per (person, action); second 10 of video "v" holds five people
    rows = [("v", 10, A, 2, 0), ("v", 10, A, 4, 0),          # positive (2+4)
            ("v", 10, B, 2, 1), ("v", 10, B, 3, 1), ("v", 10, B, 4, 1),   # nested (2+3+4)
            ("v", 10, C, 2, 2), ("v", 10, C, 7, 2),          # overlap (2+7)
            ("v", 10, D, 5, 3),                              # disjoint (5)
            ("v", 10, E, 6, 4)]                              # disjoint (6), never detected
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "val.csv").write_text(
        "".join(f"{v},{s:04d},{','.join(map(str, b))},{a},{p}\n" for v, s, b, a, p in rows))
    actors = bench.load_actor_labels(tmp_path)
    assert [(sorted(ids), box) for ids, box in actors[("v", 10)]] == [
        ([2, 4], A), ([2, 3, 4], B), ([2, 7], C), ([5], D), ([6], E)]

    pairs = [pair([[A]], label=(2, 4))]
    # three clips of the second: the positive scored 0.5 / 0.9 / 0.2, the nested actor always
    # above 0.5 in the first clip (0.6), tied in the second (0.9), below in the third (0.1)
    dets = [[[det(A, 0.5), det(B, 0.6), det(C, 0.5), det(D, 0.1)],
             [det(A, 0.9), det(B, 0.9), det(C, 0.3)],
             [det(A, 0.2), det(B, 0.1), det(D, 0.05)]]]
    r = bench.match_auc_by_relation(pairs, dets, actors)
    assert r["positives"] == 3 and r["negatives"] == {"nested": 3, "overlap": 2, "disjoint": 2}
    pos = [0.5, 0.9, 0.2]
    assert r["nested"] == pytest.approx(ref_auc(pos + [0.6, 0.9, 0.1], [1] * 3 + [0] * 3))
    assert r["overlap"] == pytest.approx(ref_auc(pos + [0.5, 0.3], [1] * 3 + [0] * 2))
    assert r["disjoint"] == pytest.approx(ref_auc(pos + [0.1, 0.05], [1] * 3 + [0] * 2)) and r["disjoint"] == 1.0
    pooled = match_diagnostics(pairs, dets, {k: [b for _, b in v] for k, v in actors.items()}, chance_seeds=0)
    assert r["all"] == pytest.approx(pooled["match_auc"])
    # an uncovered actor (E) is no instance; without detections a kind is NaN
    r = bench.match_auc_by_relation(pairs, [[[det(A, 0.5)], [], []]], actors)
    assert r["negatives"] == {"nested": 0, "overlap": 0, "disjoint": 0} and math.isnan(r["nested"])


def test_bench_postprocessing_one_pass_equals_predicting_each_variant():
    # benchmarks/bench_postprocessing.py: one forward per pair, every variant's post-processing
    # on the same head outputs; each variant's detections are those of predict_pairs with the
    # model's det_* fields set to it, and the model's own post-processing is restored after
    import dataclasses

    import torch
    from test_synthetic import _benchmark

    from stvr.config import apply_overrides, preset
    from stvr.model import STVRModel
    from stvr.predict import predict_pairs

    bench = _benchmark("bench_postprocessing")
    cfg = apply_overrides(preset("cpu"), ["model.image_size=96"])
    torch.manual_seed(0)
    model = STVRModel(cfg.model).eval()
    own = dataclasses.replace(model.cfg)
    variants = dict(bench.parse_variant(v, model.cfg) for v in (
        "own:", "decay:model.det_score_decay=linear,model.det_nms_iou=0.5", "nms:model.det_nms_iou=0.2"))
    assert variants["decay"] == {"det_score_decay": "linear", "det_nms_iou": 0.5}
    val = _tiny_val_set()
    dets = bench.variant_detections(model, val, variants)
    for name, fields in variants.items():
        model.cfg = dataclasses.replace(own, **fields)
        want = predict_pairs(model, val, progress=False)
        assert dets[name] == want, name
    model.cfg = own
    assert dets["decay"] != dets["own"] and dets["nms"] != dets["own"]
    import stvr.model.network as network
    assert network.postprocess_detections is bench.network.postprocess_detections
    assert network.postprocess_detections.__name__ == "postprocess_detections"
    with pytest.raises(ValueError, match="post-processing field"):
        bench.parse_variant("x:model.lr=0.1", model.cfg)
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        bench.parse_variant(":model.det_nms_iou=0.3", model.cfg)
    scores = bench.score(val.pairs, dets["own"], val.actors)
    assert scores["mAP"]["0.5"] == pytest.approx(100 * frame_map(val.pairs, dets["own"], 0.5)["mAP"])
