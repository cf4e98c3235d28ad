"""stvr.train / stvr.predict: training reduces the loss, checkpoints (safetensors + JSON),
exact resumption after an interruption, the learning-rate schedule and gradient clipping,
validation with the best checkpoint, predict on failed pairs, and the train -> predict CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from stvr import train as T
from stvr.config import apply_overrides, config_to_dict, preset
from stvr.data.dataset import PairSample
from stvr.predict import load_detections, predict_pairs, save_detections

S = 96          # smallest input whose 6x6 map still holds the warp's distinct control points
BOX = (0.25, 0.3, 0.6, 0.8)


def _cfg(*overrides: str):
    return apply_overrides(preset("cpu"), [
        f"model.image_size={S}", "train.batch_size=2", "train.log_every=1",
        "train.checkpoint_every=2", "train.eval_every=0", "train.device=cpu",
        "data.flip_probability=0", *overrides])


def _clip_with_box(gen: torch.Generator, n: int, box, shift: float = 0.0) -> torch.Tensor:
    """``[n, 3, 8, S, S]`` noise with a bright rectangle at ``box`` (moving right by ``shift``/clip)."""
    clips = torch.rand(n, 3, 8, S, S, generator=gen) * 0.6 - 0.8
    for k in range(n):
        x1, y1, x2, y2 = (int(round(v * S)) for v in BOX)
        dx = int(round(shift * k * S))
        clips[k, :, :, y1:y2, x1 + dx:x2 + dx] = 0.9
    return clips


class PairsInMemory(Dataset):
    """Query/reference pairs of noise frames with one bright actor (the query match) at BOX.

    ``pairs`` (pair-file form) makes it usable for validation / frame-mAP. Items listed
    in ``fail`` return None, as a pair whose video cannot be decoded.
    """

    def __init__(self, n: int = 8, seconds: int = 1, seed: int = 0, fail=()):
        self.n, self.seconds, self.seed, self.fail = n, seconds, seed, set(fail)
        self.clips_per_second = 3
        self.pairs = [{"query": {"id": f"q{i}", "frames": [0], "boxes": [list(BOX)], "label": [1 + i % 2]},
                       "reference": {"id": f"r{i}", "start": 0, "end": seconds,
                                     "gt": [[list(BOX)] for _ in range(seconds)]}}
                      for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.fail:
            return None
        g = torch.Generator().manual_seed(self.seed * 1000 + int(i))
        nr = 3 * self.seconds
        box = torch.tensor(BOX)
        return PairSample(
            query_clips=_clip_with_box(g, 3, BOX),
            query_boxes=box.repeat(3, 1),
            reference_clips=_clip_with_box(g, nr, BOX),
            gt_boxes=[box[None].clone() for _ in range(nr)],
            gt_labels=[torch.tensor([2]) for _ in range(nr)],
            pair_id=int(i),
        )


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_training_reduces_loss_and_keeps_the_best_checkpoint(tmp_path):
    cfg = _cfg("train.lr=0.01", "train.eval_every=10", "train.checkpoint_every=10", "train.keep_best=true")
    out = tmp_path / "run"
    summary = T.train(cfg, out, max_steps=30, train_set=PairsInMemory(8), val_set=PairsInMemory(2, seed=7),
                      progress=False)
    assert summary["step"] == 30 and summary["failed_samples"] == 0 and summary["skipped_batches"] == 0
    rows = _read_csv(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    loss = np.array([float(r["loss"]) for r in rows])
    assert np.isfinite(loss).all()
    assert loss[-6:].mean() < 0.75 * loss[:6].mean(), loss
    assert all(float(r["clips_per_second"]) > 0 for r in rows)
    # validation at steps 10, 20, 30; best.* is the argmax of mAP@0.5
    val = _read_csv(out / "val_log.csv")
    assert [int(r["step"]) for r in val] == [10, 20, 30]
    maps = [float(r["mAP@0.5"]) for r in val]
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == [10, 20, 30][int(np.argmax(maps))]
    assert best["best"]["map"] == pytest.approx(max(maps))
    assert summary["best_val_map"] == pytest.approx(max(maps)) and summary["best_step"] == best["step"]
    assert T.resolve_checkpoint(out)[0] == out / "best.safetensors"


def test_keep_best_false_logs_validation_but_the_run_resolves_to_its_last_checkpoint(tmp_path):
    cfg = _cfg("train.eval_every=2", "train.checkpoint_every=2", "train.keep_best=false")
    out = tmp_path / "run"
    summary = T.train(cfg, out, max_steps=4, train_set=PairsInMemory(4), val_set=PairsInMemory(2, seed=7),
                      progress=False)
    val = _read_csv(out / "val_log.csv")
    assert [int(r["step"]) for r in val] == [2, 4]
    assert not list(out.glob("best*"))
    maps = [float(r["mAP@0.5"]) for r in val]
    last = json.loads((out / "last.json").read_text())
    assert last["step"] == 4 and last["best"]["map"] == pytest.approx(max(maps))
    assert last["best"]["step"] == [2, 4][int(np.argmax(maps))] == summary["best_step"]
    assert T.resolve_checkpoint(out)[0] == out / "last.safetensors"
    assert preset("cpu").train.keep_best is False and preset("paper").train.keep_best is True


def test_runs_are_reused_only_from_the_same_starting_weights(tmp_path):
    import hashlib
    import shutil

    from stvr.backbones import BUILTIN_TINY_WEIGHTS
    from stvr.checkpoint import weights_digests
    from stvr.experiments import config_matches, weights_match

    builtin = hashlib.sha256(BUILTIN_TINY_WEIGHTS.read_bytes()).hexdigest()
    assert weights_digests(preset("cpu")) == {"backbone_weights": builtin, "i3d_weights": None}
    assert weights_digests(preset("paper")) == {"backbone_weights": None, "i3d_weights": None}
    mine = tmp_path / "mine.safetensors"
    shutil.copyfile(BUILTIN_TINY_WEIGHTS, mine)
    cfg = _cfg(f"model.backbone_weights={mine}")
    out = tmp_path / "run"
    assert not config_matches(out, cfg)                      # nothing there
    T.train(cfg, out, max_steps=1, train_set=PairsInMemory(2), progress=False)
    state = json.loads((out / "last.json").read_text())
    assert state["weights_sha256"]["backbone_weights"] == builtin
    assert config_matches(out, cfg) and weights_match(out, cfg)
    # the same config, but the file it names now holds other weights: not the same run
    mine.write_bytes(mine.read_bytes()[:-1] + b" ")
    assert not config_matches(out, cfg) and not weights_match(out, cfg)
    # a checkpoint written before the digests existed is taken as matching
    del state["weights_sha256"]
    (out / "last.json").write_text(json.dumps(state))
    assert config_matches(out, cfg)


def test_checkpoint_is_safetensors_plus_json_and_reloads(tmp_path):
    cfg = _cfg("model.cell=conv")
    out = tmp_path / "run"
    T.train(cfg, out, max_steps=2, train_set=PairsInMemory(4), progress=False)
    for name in ("last.safetensors", "last.optim.safetensors"):
        raw = (out / name).read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert json.loads(raw[8:8 + header_len])["__metadata__"]["step"] == "2"   # no pickle
        with safe_open(str(out / name), framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys() if "num_batches" not in k)
    state = json.loads((out / "last.json").read_text())
    assert state["step"] == 2
    assert state["config"] == json.loads(json.dumps(config_to_dict(cfg)))
    assert json.loads((out / "config.json").read_text()) == state["config"]
    (group,) = state["optimizer"]["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0 and not group["nesterov"]
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    model, cfg2, st = T.load_checkpoint(out, "cpu")
    assert not model.training and cfg2.model.cell == "conv" and st["step"] == 2
    weights = _params(out / "last.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    buffers = _params(out / "last.optim.safetensors")
    assert set(buffers) == {n for n, p in model.named_parameters() if p.requires_grad}   # frozen backbone: none
    assert not any(n.startswith("backbone.") for n in buffers) and model.backbone_frozen
    # resuming with another model config is refused (not silently mixed)
    with pytest.raises(ValueError, match=r"another model config \(fields \['cell'\]\)"):
        T.train(_cfg("model.cell=warp"), out, max_steps=3, train_set=PairsInMemory(4), progress=False)
    # a JSON that does not belong to the weights is refused
    state["step"] = 5
    (out / "last.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="holds step 2"):
        T.load_checkpoint(out / "last.safetensors")
    with pytest.raises(FileNotFoundError, match="no best.safetensors or last.safetensors"):
        T.load_checkpoint(tmp_path)


@pytest.mark.slow
def test_resume_after_interrupt_is_bit_identical(tmp_path, monkeypatch):
    cfg = _cfg()
    data = PairsInMemory(6)
    T.train(cfg, tmp_path / "full", max_steps=6, train_set=data, progress=False)
    # stop after 3 steps (checkpoint at 2 and at the stop), then resume to 6
    T.train(cfg, tmp_path / "cut", max_steps=6, stop_after=3, train_set=data, progress=False)
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["step"] == 3
    T.train(cfg, tmp_path / "cut", max_steps=6, train_set=data, progress=False)
    # killed in the middle of committing the step-4 checkpoint (after the commit point:
    # weights renamed, optimizer and JSON not yet), then resumed
    real_replace = T.os.replace
    renames = []

    def dying_replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("last.safetensors"):
            renames.append(dst)
            if len(renames) == 2:          # the weights of step 4 (step 2 was the first)
                raise KeyboardInterrupt("killed")

    monkeypatch.setattr(T.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "kill", max_steps=6, stop_after=4, train_set=data, progress=False)
    monkeypatch.setattr(T.os, "replace", real_replace)
    assert (tmp_path / "kill" / "last.json.tmp").exists()
    assert json.loads((tmp_path / "kill" / "last.json").read_text())["step"] == 2
    T.train(cfg, tmp_path / "kill", max_steps=6, train_set=data, progress=False)

    full = _params(tmp_path / "full" / "last.safetensors")
    for run in ("cut", "kill"):
        resumed = _params(tmp_path / run / "last.safetensors")
        assert set(resumed) == set(full)
        for k in full:
            assert torch.equal(full[k], resumed[k]), (run, k)
        momentum = _params(tmp_path / run / "last.optim.safetensors")
        for k, v in _params(tmp_path / "full" / "last.optim.safetensors").items():
            assert torch.equal(v, momentum[k]), (run, k)
        # the log is continuous: one row per step, identical losses
        a = _read_csv(tmp_path / "full" / "train_log.csv")
        b = _read_csv(tmp_path / run / "train_log.csv")
        assert [r["step"] for r in b] == [str(s) for s in range(1, 7)]
        assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert not list((tmp_path / "kill").glob("*.tmp"))


def test_learning_rate_schedule_momentum_and_gradient_clipping(tmp_path):
    cfg = _cfg("model.cell=none", "train.lr=0.1", "train.lr_steps=(2,3)", "train.lr_gamma=0.1")
    out = tmp_path / "run"
    T.train(cfg, out, max_steps=4, train_set=PairsInMemory(4), progress=False)
    lrs = [float(r["lr"]) for r in _read_csv(out / "train_log.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])
    # first SGD step: momentum buffer = clipped gradient, update = lr * clipped gradient,
    # so with a tiny clip norm the whole update has norm lr * clip
    clip = 1e-3
    cfg = _cfg("model.cell=none", "train.lr=0.5", f"train.grad_clip_norm={clip}")
    torch.manual_seed(cfg.train.seed)
    from stvr.model import STVRModel

    init = {k: v.detach().clone() for k, v in STVRModel(cfg.model).named_parameters()}
    T.train(cfg, tmp_path / "clip", max_steps=1, train_set=PairsInMemory(4), progress=False)
    after = _params(tmp_path / "clip" / "last.safetensors")
    delta = torch.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in init.items()))
    assert float(delta) == pytest.approx(0.5 * clip, rel=1e-3)
    row = _read_csv(tmp_path / "clip" / "train_log.csv")[0]
    assert float(row["grad_norm"]) > 100 * clip      # the logged norm is before clipping


# --------------------------------------------------------------------------- predict


class ReplacedPairs(PairsInMemory):
    """Items in ``fail`` "failed to load" and were replaced by the next item, the way
    TrainPairDataset replaces a sample whose video cannot be decoded (the failure
    travels with the sample)."""

    def __getitem__(self, i: int):
        if i in self.fail:
            sample = super().__getitem__((i + 1) % self.n)
            sample.failures = [(int(i), "VideoError: corrupt.mp4: invalid data")]
            return sample
        return super().__getitem__(i)


@pytest.mark.slow
def test_failed_samples_counted_with_loader_workers(tmp_path):
    # 4 items, batch 2, 2 steps = one epoch: item 1 fails once, item 3 once
    for workers in (0, 2):
        summary = T.train(_cfg(f"data.num_workers={workers}"), tmp_path / f"w{workers}", max_steps=2,
                          train_set=ReplacedPairs(4, fail=(1, 3)), progress=False)
        assert summary["failed_samples"] == 2 and summary["skipped_batches"] == 0


def test_predict_counts_failed_pairs_and_keeps_their_clips(tmp_path):
    cfg = _cfg("model.cell=conv")
    T.train(cfg, tmp_path / "run", max_steps=1, train_set=PairsInMemory(4), progress=False)
    model, _, _ = T.load_checkpoint(tmp_path / "run")
    data = PairsInMemory(4, seconds=2, fail={1, 2})
    failed: list[int] = []
    dets = predict_pairs(model, data, batch_size=2, progress=False, failed=failed)
    assert failed == [1, 2]
    assert [len(d) for d in dets] == [6, 6, 6, 6]
    assert dets[1] == [[]] * 6 and dets[2] == [[]] * 6
    for d in (dets[0], dets[3]):
        for clip in d:
            a = np.asarray(clip, dtype=np.float64).reshape(-1, 5)
            assert np.all(a[:, 4] >= 0) and np.all(a[:, 4] <= 1)
            assert np.all(np.diff(a[:, 4]) <= 0)                      # descending scores
            assert np.all(a[:, :2] <= a[:, 2:4]) and a[:, :4].min() >= 0 and a[:, :4].max() <= 1
    # same detections pair by pair, whatever the batching and the subset
    one = predict_pairs(model, data, batch_size=1, progress=False, indices=[3, 0])
    for got, want in zip(one, (dets[3], dets[0])):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g).reshape(-1, 5), np.asarray(w).reshape(-1, 5),
                                       atol=1e-5)
    path = tmp_path / "sub" / "dets.json"
    save_detections(dets, path)
    back = load_detections(path)
    assert len(back) == 4 and back[1] == [[]] * 6
    assert math.isclose(back[0][0][0][4], dets[0][0][0][4], abs_tol=1e-6)



def _tiny_root(root: Path) -> list[dict]:
    """A dataset root with two 2-s videos (a bright box at BOX on noise) and 2 test pairs."""
    from stvr.data.pairs import save_pairs
    from stvr.data.video import write_video

    rng = np.random.default_rng(0)
    (root / "videos").mkdir(parents=True)
    x1, y1, x2, y2 = (int(round(v * 64)) for v in BOX)
    for vid in ("a", "b"):
        frames = rng.integers(0, 80, size=(48, 64, 64, 3), dtype=np.uint8)
        frames[:, y1:y2, x1:x2] = 230
        write_video(root / "videos" / f"{vid}.mp4", frames, fps=24)
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "fps": 24, "videos": {v: f"videos/{v}.mp4" for v in ("a", "b")},
        "time_ranges": {"a": [0, 2], "b": [0, 2]}, "train_videos": [], "val_videos": ["a", "b"]}))
    pairs = [{"query": {"id": "a", "frames": [0], "boxes": [list(BOX)], "label": [1]},
              "reference": {"id": "b", "start": 0, "end": 2, "gt": [[list(BOX)], [list(BOX)]]}},
             {"query": {"id": "b", "frames": [1], "boxes": [list(BOX)], "label": [2]},
              "reference": {"id": "a", "start": 1, "end": 2, "gt": [[list(BOX)]]}}]
    save_pairs(pairs, root / "pairs" / "test.json")
    return pairs


def test_predict_cli_loads_a_trained_checkpoint(tmp_path, capsys):
    from stvr.cli import main
    from stvr.evaluation import frame_map

    T.train(_cfg("model.cell=warp"), tmp_path / "run", max_steps=2, train_set=PairsInMemory(4),
            progress=False)
    pairs = _tiny_root(tmp_path / "data")
    out = tmp_path / "dets.json"
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "2 pairs, 9 clips" in capsys.readouterr().out
    dets = load_detections(out)
    assert [len(d) for d in dets] == [6, 3]
    assert 0.0 <= frame_map(pairs, dets)["mAP"] <= 1.0
    # the weights file alone works too, and a missing checkpoint is a clear error
    assert main(["predict", "--checkpoint", str(tmp_path / "run" / "last.safetensors"), "--data",
                 str(tmp_path / "data"), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "data"),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no best.safetensors" in err and len(err.strip().splitlines()) == 1
    # a pair file outside the root, in the official yxyx order, gives the same detections
    import json

    official = [[{**p["query"], "boxes": [[b[1], b[0], b[3], b[2]] for b in p["query"]["boxes"]]},
                 {**p["reference"], "gt": [[[b[1], b[0], b[3], b[2]] for b in sec]
                                           for sec in p["reference"]["gt"]]}] for p in pairs]
    elsewhere = tmp_path / "elsewhere" / "official_test.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps(official))
    out2 = tmp_path / "dets_official.json"
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                 "--pairs", str(elsewhere), "--box-order", "yxyx", "--out", str(out2),
                 "--device", "cpu", "--quiet"]) == 0
    torch.testing.assert_close(
        [torch.tensor(c, dtype=torch.float64).reshape(-1, 5) for d in load_detections(out2) for c in d],
        [torch.tensor(c, dtype=torch.float64).reshape(-1, 5) for d in load_detections(out) for c in d])
    # --set changes the post-processing (model.det_*) and nothing else
    out3 = tmp_path / "dets_one.json"
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                 "--out", str(out3), "--device", "cpu", "--quiet", "--set", "model.det_per_clip=1"]) == 0
    one = load_detections(out3)
    assert [len(d) for d in one] == [6, 3] and all(len(c) <= 1 for d in one for c in d)
    assert [c[:1] for d in one for c in d] == [c[:1] for d in load_detections(out) for c in d]
    capsys.readouterr()
    for bad, message in ((["model.cell=conv"], "only the detection post-processing"),
                         (["model.det_box_voting_group=true", "model.det_box_voting=0"], "needs box voting")):
        sets = [w for o in bad for w in ("--set", o)]
        assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "refused.json"), "--device", "cpu", "--quiet", *sets]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused.json").exists()

# --------------------------------------------------------------------------- DDP (gloo, CPU)


def _ddp_worker(rank: int, world: int, port: int, runs: list, queue) -> None:
    """One DDP process: the training calls ``runs`` = [(out, steps, stop_after), ...] in turn."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        results = []
        for out, steps, stop_after in runs:
            summary = T.train(_cfg("model.cell=conv", "train.eval_every=2"), out, max_steps=steps,
                              stop_after=stop_after, train_set=PairsInMemory(8),
                              val_set=PairsInMemory(3, seed=5), progress=False)
            results.append((summary["step"], summary["best_val_map"]))
        queue.put((rank, results))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo_resume_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [(str(tmp_path / "full"), 3, None), (str(tmp_path / "cut"), 3, 1), (str(tmp_path / "cut"), 3, None)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, runs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    (r0, res0), (r1, res1) = sorted(queue.get(timeout=5) for _ in procs)
    assert (r0, r1) == (0, 1)
    assert [r[0] for r in res0] == [3, 1, 3] and [r[0] for r in res1] == [3, 1, 3]
    # validation at step 2 is sharded over the ranks and gathered: both ranks agree
    assert res0[0][1] is not None and res0 == res1
    a, b = _params(tmp_path / "full" / "last.safetensors"), _params(tmp_path / "cut" / "last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads((tmp_path / "full" / "last.json").read_text())
    assert len(state["rng_ranks"]) == 2
    # rank-0 logging only: one row per step
    assert [r["step"] for r in _read_csv(tmp_path / "full" / "train_log.csv")] == ["1", "2", "3"]


def test_ddp_error_for_a_parameter_without_gradient_names_the_setting():
    """DDP (find_unused_parameters off) fails at the step after a parameter missed the loss; the
    error then names stvr's setting, not only torch's constructor argument."""
    from types import SimpleNamespace

    def ddp_forward(batch):
        raise RuntimeError("Expected to have finished reduction in the prior iteration ... "
                           "passing the keyword argument `find_unused_parameters=True` ...")

    class Batch:
        failures: list = []

        def to(self, *a, **k):
            return self

    cfg = preset("cpu")
    run = SimpleNamespace(cfg=cfg, dist_info=SimpleNamespace(world_size=2), device=torch.device("cpu"),
                          model=ddp_forward, failures=0, step=7)
    with pytest.raises(RuntimeError, match=r"step 7: .*train\.ddp_find_unused_parameters=true") as info:
        T._train_step(run, Batch())
    assert "find_unused_parameters=True" in str(info.value.__cause__)
    cfg.train.ddp_find_unused_parameters = True            # already on: torch's own error, unchanged
    with pytest.raises(RuntimeError, match="^Expected to have finished"):
        T._train_step(run, Batch())
    assert preset("paper").train.ddp_find_unused_parameters is False
