"""`stvr.experiments`: which run folders the experiment commands (`stvr demo`, `stvr bench
table1`) may reuse, and how a finished run takes a new detection post-processing without
retraining (`adopt_postprocessing`)."""

from __future__ import annotations

import dataclasses
import json

from stvr.checkpoint import weights_digests
from stvr.config import config_to_dict, preset, save_config
from stvr.experiments import adopt_postprocessing, config_matches, only_postprocessing_differs


def _cfg(**model):
    cfg = preset("cpu")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def _run_folder(tmp_path, cfg, names=("last",)):
    """A run folder as training leaves it: config.json, the checkpoints' JSON and weight files."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    for name in names:
        state = {"step": 7, "format": "stvr-checkpoint-1", "config": config_to_dict(cfg), "rng": {"python": [3, 1]},
                 "weights_sha256": weights_digests(cfg), "best": {"map": 0.25, "step": 5}}
        (run / f"{name}.json").write_text(json.dumps(state, indent=1) + "\n")
        (run / f"{name}.safetensors").write_bytes(b"not read here " + name.encode())
    return run


def _files(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_only_postprocessing_differs():
    a = json.loads(json.dumps(config_to_dict(_cfg())))
    b = json.loads(json.dumps(config_to_dict(_cfg(det_nms_iou=0.3, det_score_decay="none"))))
    c = json.loads(json.dumps(config_to_dict(_cfg(box_fg_iou=0.6))))
    assert only_postprocessing_differs(a, b) and only_postprocessing_differs(b, a)
    assert not only_postprocessing_differs(a, a)            # the same config: nothing differs
    assert not only_postprocessing_differs(a, c)            # training reads box_fg_iou
    assert not only_postprocessing_differs(None, a)


def test_adopt_postprocessing_rewrites_only_the_det_fields(tmp_path):
    old = _cfg(det_score_decay="linear", det_nms_iou=0.4)
    run = _run_folder(tmp_path, old, names=("last", "best"))
    before = _files(run)
    new = _cfg(det_score_decay="none", det_nms_iou=0.4)
    assert not config_matches(run, new)
    assert adopt_postprocessing(run, new) == {"det_score_decay": "linear"}
    assert config_matches(run, new)                        # now resumable / reusable as it is
    after = _files(run)
    assert set(after) == set(before)                        # no temporary file left behind
    for name in ("last.safetensors", "best.safetensors"):
        assert after[name] == before[name]                  # the weights are not touched
    for name in ("last.json", "best.json"):
        was, now = json.loads(before[name]), json.loads(after[name])
        assert now["config"]["model"]["det_score_decay"] == "none"
        now["config"]["model"]["det_score_decay"] = "linear"
        assert now == was                                   # nothing else changed
    assert json.loads(after["config.json"]) == json.loads(json.dumps(config_to_dict(new)))
    assert adopt_postprocessing(run, new) is None           # already adopted: nothing to do
    assert _files(run) == after


def test_adopt_postprocessing_refuses_other_training_weights_or_checkpoints(tmp_path):
    old = _cfg()
    run = _run_folder(tmp_path, old, names=("last", "best"))
    before = _files(run)
    # a field training reads
    assert adopt_postprocessing(run, _cfg(box_fg_iou=0.6, det_score_decay="none")) is None
    # trained from other starting weights (e.g. the shipped weights of an older release)
    state = json.loads(before["last.json"])
    state["weights_sha256"]["backbone_weights"] = "0" * 64
    (run / "last.json").write_text(json.dumps(state, indent=1) + "\n")
    assert adopt_postprocessing(run, _cfg(det_score_decay="none")) is None
    (run / "last.json").write_bytes(before["last.json"])
    # a checkpoint of another training config in the folder: nothing is written at all
    state = json.loads(before["best.json"])
    state["config"]["model"]["box_fg_iou"] = 0.6
    (run / "best.json").write_text(json.dumps(state, indent=1) + "\n")
    changed = _files(run)
    assert adopt_postprocessing(run, _cfg(det_score_decay="none")) is None
    assert _files(run) == changed
    # no run at all
    assert adopt_postprocessing(tmp_path / "nothing", old) is None
    assert not (tmp_path / "nothing").exists()
