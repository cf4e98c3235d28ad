"""`stvr demo` and `stvr bench table1` end to end on a tiny synthetic data set
(generation -> training -> prediction -> evaluation -> tables/figures), plus the
aggregation of Table 1."""

from __future__ import annotations

import json
import math

import pytest

from stvr.checkpoint import load_checkpoint, resolve_checkpoint
from stvr.cli import main
from stvr.commands import bench
from stvr.experiments import only_postprocessing_differs

SYNTH = ["num_train_videos=2", "num_val_videos=2", "seconds=5", "size=96", "num_val_labels=1",
         "num_test_labels=1", "heldout_probability=1.0"]
MODEL = ["model.image_size=96", "train.batch_size=2", "train.log_every=1", "train.device=cpu"]


def _flags(name: str, values: list[str]) -> list[str]:
    return [a for v in values for a in (name, v)]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_reuses_the_run(tmp_path, capsys):
    data, out = tmp_path / "synth", tmp_path / "demo"
    argv = ["demo", "--data", str(data), "--out", str(out), "--steps", "2", "--quiet", "--device", "cpu",
            "--procs", "1",
            *_flags("--synth", SYNTH), *_flags("--set", [*MODEL, "train.eval_every=2"])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| warp LSTM, trained |" in printed and "| untrained head (pretrained backbone) |" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and res["train"]["step"] == 2 and res["trained"]["checkpoint_step"] == 2
    assert res["config"]["model"]["cell"] == "warp" and res["config"]["preset"] == "cpu"
    pairs = json.loads((data / "pairs" / "test.json").read_text())
    for key in ("trained", "untrained"):
        r = res[key]
        assert r["num_pairs"] == len(pairs) > 0 and r["failed_pairs"] == []
        assert set(r["frame_mAP"]) == {"0.3", "0.5", "0.7"} and set(r["video_mAP"]) == {"0.2", "0.5"}
        assert all(0.0 <= v <= 1.0 for v in [*r["frame_mAP"].values(), *r["video_mAP"].values()])
    dets = json.loads((out / "test_detections.json").read_text())
    assert [len(d) for d in dets] == [3 * (p["reference"]["end"] - p["reference"]["start"]) for p in pairs]
    assert set(res["figures"]) == {"training_curves", "label_distribution", "results", "warp_grid"}
    for path in res["figures"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the cpu preset keeps no best.* (train.keep_best=False): the run folder means its last checkpoint
    assert not (out / "best.safetensors").exists() and (out / "val_log.csv").exists()
    assert resolve_checkpoint(out)[0] == out / "last.safetensors"
    # a second run reuses the data set and the finished training run
    mtime = (out / "last.safetensors").stat().st_mtime_ns
    assert main(argv + ["--no-figures"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert (out / "last.safetensors").stat().st_mtime_ns == mtime
    assert again["trained"]["frame_mAP"] == res["trained"]["frame_mAP"]
    assert again["data"]["summary"]["generated"] is False
    assert again["postprocessing_adopted_from"] is None
    # a run of the same training config with another detection post-processing is reused too, and
    # its folder (config.json, the checkpoint's JSON) takes the new one: `stvr relocalize` uses it
    val_log = (out / "val_log.csv").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--no-figures", "--set", "model.det_score_decay=none"]) == 0
    printed = capsys.readouterr().out
    assert "run reused with the new detection post-processing (det_score_decay 'linear' -> 'none')" in printed
    third = json.loads((out / "results.json").read_text())
    assert (out / "last.safetensors").stat().st_mtime_ns == mtime and (out / "val_log.csv").read_bytes() == val_log
    assert third["postprocessing_adopted_from"] == {"det_score_decay": "linear"}
    assert third["config"]["model"]["det_score_decay"] == "none" and third["trained"]["checkpoint_step"] == 2
    assert json.loads((out / "config.json").read_text())["model"]["det_score_decay"] == "none"
    model, cfg, state = load_checkpoint(out)
    assert model.cfg.det_score_decay == "none" and cfg.model.det_score_decay == "none" and state["step"] == 2


@pytest.mark.slow
def test_bench_table1_writes_tables_and_skips_finished_runs(tmp_path, capsys):
    argv = ["bench", "table1", "--data", str(tmp_path / "synth"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "results"), "--steps", "1", "--seeds", "0", "--methods", "clip", "warp",
            "--quiet", "--device", "cpu", "--no-video-map", *_flags("--synth", SYNTH), *_flags("--set", MODEL)]
    assert main(argv + ["--jobs", "2"]) == 0         # two runs in parallel processes
    md = (tmp_path / "results" / "table1.md").read_text()
    assert "| Clip |" in md and "| Warp LSTM |" in md and "ConvLSTM" not in md
    table = json.loads((tmp_path / "results" / "table1.json").read_text())
    assert set(table["methods"]) == {"clip", "warp"} and table["meta"]["missing"] == []
    run = json.loads((tmp_path / "runs" / "warp-seed0" / "results.json").read_text())
    assert run["cell"] == "warp" and run["steps"] == 1 and run["config"]["train"]["eval_every"] == 0
    assert table["methods"]["warp"]["frame_mAP@0.5"]["per_seed"] == [run["frame_mAP"]["0.5"]]
    # restart (one job): both runs are skipped, their results stay byte-identical
    before = (tmp_path / "runs" / "clip-seed0" / "results.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert (tmp_path / "runs" / "clip-seed0" / "results.json").read_bytes() == before
    # only the post-processing changes: the checkpoints predict again, nothing is retrained
    mtime = (tmp_path / "runs" / "clip-seed0" / "last.safetensors").stat().st_mtime_ns
    assert main(argv + ["--set", "model.det_box_voting=0.5", "--set", "model.det_nms_iou=0.3"]) == 0
    assert (tmp_path / "runs" / "clip-seed0" / "last.safetensors").stat().st_mtime_ns == mtime
    again = json.loads((tmp_path / "runs" / "clip-seed0" / "results.json").read_text())
    assert again["config"]["model"]["det_box_voting"] == 0.5 and again["config"]["model"]["det_nms_iou"] == 0.3
    assert again["reevaluated_from"]["det_box_voting"] == json.loads(before)["config"]["model"]["det_box_voting"]
    assert again["train"] == json.loads(before)["train"] and again["checkpoint_step"] == 1
    cfg = json.loads((tmp_path / "runs" / "clip-seed0" / "config.json").read_text())
    assert cfg["model"]["det_box_voting"] == 0.5
    # ... and so does its checkpoint's JSON (`stvr predict` on the run uses it)
    last = json.loads((tmp_path / "runs" / "clip-seed0" / "last.json").read_text())["config"]["model"]
    assert last["det_box_voting"] == 0.5 and last["det_nms_iou"] == 0.3
    # a run trained from other starting weights (e.g. the shipped weights of an older release) retrains
    state_path = tmp_path / "runs" / "clip-seed0" / "last.json"
    state = json.loads(state_path.read_text())
    assert state["weights_sha256"]["backbone_weights"] is not None
    state["weights_sha256"]["backbone_weights"] = "0" * 64
    state_path.write_text(json.dumps(state))
    assert main(argv + ["--set", "model.det_box_voting=0.5", "--set", "model.det_nms_iou=0.3"]) == 0
    assert (tmp_path / "runs" / "clip-seed0" / "last.safetensors").stat().st_mtime_ns != mtime
    assert json.loads(state_path.read_text())["weights_sha256"]["backbone_weights"] != "0" * 64
    assert "reevaluated_from" not in json.loads((tmp_path / "runs" / "clip-seed0" / "results.json").read_text())
    # a change that training reads retrains
    assert not only_postprocessing_differs(again["config"], {**again["config"], "model": {
        **again["config"]["model"], "box_fg_iou": 0.6}})


def test_aggregate_mean_and_sample_std():
    runs = {"warp": [{"seed": s, "frame_mAP": {"0.3": v, "0.5": v, "0.7": None}} for s, v in
                     ((0, 0.2), (1, 0.4), (2, 0.6))]}
    agg = bench.aggregate(runs)["warp"]
    e = agg["frame_mAP@0.5"]
    assert e["mean"] == pytest.approx(0.4) and e["std"] == pytest.approx(0.2) and e["n"] == 3
    assert agg["frame_mAP@0.7"] == {"mean": None, "std": None, "n": 0, "per_seed": [None] * 3}
    assert bench._cell(e) == "40.0 ± 20.0"
    assert agg["method"] == "Warp LSTM" and math.isclose(agg["paper_ava_map@0.5"], 21.8)
