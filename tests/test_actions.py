"""The action distance term of the match logit (model.match_action_distance, stvr.model.actions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_synth_root, tiny_synth_config
from stvr.config import apply_overrides, preset
from stvr.data.actors import actor_index
from stvr.evaluation import roc_auc
from stvr.model import STVRModel, crop_features
from stvr.model.actions import INITIAL_SCALE, ActionProbe

TINY = tiny_synth_config(8)
ON = ["model.image_size=64", "model.match_action_distance=true"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synth_root(tmp_path_factory, "act", TINY)


def test_fit_recovers_linear_actions_and_keeps_the_standardization():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0]) + 4.0
    directions = torch.randn(6, 3, generator=g)
    y = ((x - 4.0) @ directions > 0).float()
    probe = ActionProbe(6, 3)
    assert not bool(probe.fitted)
    loss = probe.fit(x, y)
    assert bool(probe.fitted) and loss < 0.2
    torch.testing.assert_close(probe.mean, x.mean(0))
    torch.testing.assert_close(probe.std, x.std(0) + 1e-6)
    logits = probe.logits(x)
    for a in range(3):
        assert roc_auc(logits[:, a].numpy(), y[:, a].numpy() > 0) > 0.99
    assert ((logits > 0).float() == y).float().mean() > 0.95
    # the fit is deterministic
    again = ActionProbe(6, 3)
    again.fit(x, y)
    torch.testing.assert_close(again.weight, probe.weight)
    with pytest.raises(ValueError, match="targets"):
        probe.fit(x, y[:, :2])
    with pytest.raises(ValueError, match="at least one action"):
        ActionProbe(6, 0)


def test_hidden_layer_fits_what_a_linear_probe_cannot_and_round_trips():
    # actions that are not linear in the features (XOR of two directions): the linear probe stays
    # near chance, one hidden ReLU layer fits them; the fit is deterministic per seed
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 5, generator=g) * 2.0 + 1.0
    y = torch.stack([((x[:, 0] - 1) * (x[:, 1] - 1) > 0), ((x[:, 2] - 1) * (x[:, 3] - 1) > 0)], 1).float()
    linear, mlp = ActionProbe(5, 2), ActionProbe(5, 2, hidden=32)
    linear_loss, mlp_loss = linear.fit(x, y), mlp.fit(x, y, seed=3)
    assert linear_loss > 0.6 and mlp_loss < 0.25
    for a in range(2):
        assert roc_auc(linear.logits(x)[:, a].numpy(), y[:, a].numpy() > 0) < 0.65
        assert roc_auc(mlp.logits(x)[:, a].numpy(), y[:, a].numpy() > 0) > 0.97
    assert set(linear.state_dict()) == {"mean", "std", "weight", "bias", "fitted", "log_scale"}
    assert mlp.hidden_weight.shape == (32, 5) and mlp.weight.shape == (2, 32)
    # by hand: relu(W_h z + b_h) then the output layer
    z = (x[:4] - mlp.mean) / mlp.std
    h = torch.relu(z @ mlp.hidden_weight.T + mlp.hidden_bias)
    torch.testing.assert_close(mlp.logits(x[:4]), h @ mlp.weight.T + mlp.bias)
    again = ActionProbe(5, 2, hidden=32)
    again.fit(x, y, seed=3)
    torch.testing.assert_close(again.hidden_weight, mlp.hidden_weight)
    torch.testing.assert_close(again.weight, mlp.weight)
    other = ActionProbe(5, 2, hidden=32)
    other.fit(x, y, seed=4)
    assert not torch.equal(other.hidden_weight, mlp.hidden_weight)
    loaded = ActionProbe(5, 2, hidden=32)
    loaded.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(loaded.distance(x[:6], x[6:12]), mlp.distance(x[:6], x[6:12]))
    with pytest.raises(RuntimeError):                 # a linear probe's weights do not fit a hidden one
        ActionProbe(5, 2, hidden=32).load_state_dict(linear.state_dict())
    with pytest.raises(ValueError, match="hidden width"):
        ActionProbe(5, 2, hidden=-1)


def test_distance_and_match_logit_by_hand():
    probe = ActionProbe(2, 2)
    probe.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    probe.bias.copy_(torch.tensor([0.5, 0.0]))
    probe.std.fill_(2.0)
    p = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    q = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # proposal 0: z = (1, 0) -> logits (1.5, 0); query 0: z = (0, 0) -> (0.5, 0)
    want0 = abs(sig(1.5) - sig(0.5)) + 0.0
    d = probe.distance(p, q)
    assert d[0].item() == pytest.approx(want0, abs=1e-6) and d[1].item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    out = probe.add_to_match_logit(logits, d)
    torch.testing.assert_close(out[:, :2], logits[:, :2])
    assert out[0, 2].item() == pytest.approx(3.0 - INITIAL_SCALE * want0, abs=1e-5)
    assert out[1, 2].item() == pytest.approx(0.0, abs=1e-6)


def test_the_model_subtracts_the_scaled_distance_to_its_pairs_query_mean():
    cfg = apply_overrides(preset("cpu"), ON + ["model.action_ids=1,2,3"]).model
    model = STVRModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    probe = model.action_probe
    probe.weight.copy_(torch.randn(3, 64, generator=g))
    probe.bias.copy_(torch.randn(3, generator=g))
    c, h = cfg.backbone_channels, model.feature_size
    maps = torch.randn(3, c, h, h, generator=g)
    backbone_maps = torch.randn(3, c, h, h, generator=g)
    clip_pair = torch.tensor([0, 0, 1])
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0], [0.0, 0.0, 64.0, 64.0],
                          [20.0, 20.0, 44.0, 44.0]])
    clip_index = torch.tensor([0, 1, 2, 2])
    query = torch.randn(3, c, 7, 7, generator=g)
    query_index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        with_term = model._second_stage(maps, boxes, clip_index, clip_pair, query, query_index, maps, backbone_maps)
        saved = probe.log_scale.data.clone()
        probe.log_scale.data.fill_(-1e4)             # s = 0: the model without the term
        without = model._second_stage(maps, boxes, clip_index, clip_pair, query, query_index, maps, backbone_maps)
        probe.log_scale.data.copy_(saved)
    own = crop_features(backbone_maps, boxes / 64, clip_index, cfg.roi_crop_size, mapping=cfg.roi_mapping,
                        image_size=64).mean((2, 3))
    qm = query.mean((2, 3))
    query_mean = torch.stack([qm[:2].mean(0), qm[2]])[clip_pair[clip_index]]
    distance = (probe.probabilities(own) - probe.probabilities(query_mean)).abs().sum(1)
    assert distance.min() > 0.01
    torch.testing.assert_close(with_term[0][:, :-1], without[0][:, :-1])
    torch.testing.assert_close(with_term[1], without[1])
    torch.testing.assert_close(with_term[0][:, -1], without[0][:, -1] - INITIAL_SCALE * distance,
                               rtol=1e-4, atol=1e-4)


def test_the_term_needs_a_frozen_pretrained_backbone_and_distinct_action_ids():
    with pytest.raises(ValueError, match="freeze_backbone"):
        apply_overrides(preset("cpu"), ON + ["model.freeze_backbone=false"])
    from stvr.config import validate_config

    with pytest.raises(ValueError, match="action_ids"):
        validate_config(apply_overrides(preset("cpu"), ON + ["model.action_ids=1,1"]))
    cfg = apply_overrides(preset("cpu"), ON + ["model.action_ids=1,2"]).model
    cfg.backbone_weights = None                      # frozen, but nothing pretrained to freeze
    with pytest.raises(ValueError, match="frozen pretrained backbone"):
        STVRModel(cfg)
    with pytest.raises(ValueError, match="action_ids"):
        STVRModel(apply_overrides(preset("cpu"), ON).model)


def test_auto_is_on_exactly_where_the_backbone_is_frozen_and_pretrained(root):
    from stvr.config import config_from_dict, config_to_dict, resolve_action_distance, validate_config
    from stvr.train import with_action_ids

    auto = apply_overrides(preset("cpu"), ["model.image_size=64", "model.match_action_distance=auto",
                                           f"data.root={root}"])
    assert auto.model.match_action_distance == "auto" and resolve_action_distance(auto.model) is True
    # the setting parses back from and to true / false, keeps "auto" through a saved config, refuses others
    assert apply_overrides(auto, ["model.match_action_distance=false"]).model.match_action_distance is False
    assert apply_overrides(auto, ["model.match_action_distance=on"]).model.match_action_distance is True
    assert config_from_dict(config_to_dict(auto)).model.match_action_distance == "auto"
    with pytest.raises(ValueError, match="match_action_distance"):
        apply_overrides(auto, ["model.match_action_distance=sometimes"])
    bad = config_to_dict(auto)
    bad["model"]["match_action_distance"] = "yes"
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        validate_config(config_from_dict(bad))
    # off wherever the probe could not stay valid: a trained or a random backbone (no error)
    unfrozen = apply_overrides(auto, ["model.freeze_backbone=false"])
    random_init = apply_overrides(auto, ["model.backbone_weights=none"])
    paper = apply_overrides(preset("paper"), ["model.match_action_distance=auto", "model.i3d_random_init=true"])
    for cfg in (unfrozen, random_init, paper):
        assert resolve_action_distance(cfg.model) is False
        assert with_action_ids(cfg) is cfg
        assert STVRModel(apply_overrides(cfg, ["model.action_ids=1,2"]).model).action_probe is None
    # training fills the training annotations' actions; the config keeps "auto", the model has the term
    resolved = with_action_ids(auto)
    assert resolved.model.match_action_distance == "auto"
    assert resolved.model.action_ids == tuple(actor_index(root, "train").action_ids)
    assert STVRModel(resolved.model).action_probe.num_actions == len(resolved.model.action_ids)
    # ... off without training annotations to fit the probe on (an in-memory training set); an
    # explicit true says what is missing
    elsewhere = apply_overrides(auto, [f"data.root={root / 'nowhere'}"])
    assert with_action_ids(elsewhere) is elsewhere
    with pytest.raises(ValueError, match="training annotations"):
        with_action_ids(apply_overrides(elsewhere, ["model.match_action_distance=true"]))
    # the training set's own root decides: an in-memory set (no root) leaves the term off even when
    # data.root holds annotations (they may be of other data), a set with a root reads its own
    from stvr.train import _with_training_action_ids

    assert _with_training_action_ids(auto, object()) is auto
    own = type("OwnRoot", (), {"root": root})()
    assert _with_training_action_ids(elsewhere, own).model.action_ids == resolved.model.action_ids
    # a model built by hand from an "auto" config: the term only where it can exist, never an error
    assert STVRModel(auto.model).action_probe is None                       # no action ids given
    with_ids = apply_overrides(auto, ["model.action_ids=1,2,3"]).model
    assert STVRModel(with_ids).action_probe.num_actions == 3
    no_weights = apply_overrides(auto, ["model.action_ids=1,2,3"]).model
    no_weights.backbone_weights = None
    assert STVRModel(no_weights).action_probe is None


def test_training_fits_the_probe_on_training_actors_and_keeps_it(root, tmp_path):
    from stvr.checkpoint import load_checkpoint
    from stvr.pretrain import fit_action_probe
    from stvr.train import train, with_action_ids

    cfg = apply_overrides(preset("cpu"), ON + [
        f"data.root={root}", "train.batch_size=2", "train.eval_every=0", "train.log_every=1",
        "train.checkpoint_every=100"])
    train_ids = actor_index(root, "train").action_ids
    resolved = with_action_ids(cfg)
    assert resolved.model.action_ids == tuple(train_ids) and cfg.model.action_ids == ()
    off = apply_overrides(preset("cpu"), ["model.image_size=64", "model.match_action_distance=false"])
    assert with_action_ids(off) is off
    train(cfg, tmp_path / "run", max_steps=3, progress=False)
    model, saved_cfg, _ = load_checkpoint(tmp_path / "run")
    assert saved_cfg.model.action_ids == tuple(train_ids)
    probe = model.action_probe
    assert bool(probe.fitted) and probe.weight.abs().sum() > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "last.safetensors"), framework="pt") as f:   # floats, as every run
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys() if "num_batches" not in k)
    # the fit is the one of fit_action_probe on the training actors (every one: a tiny root)
    fresh = STVRModel(resolved.model)
    stats = fit_action_probe(fresh, root, seed=0)
    assert stats["actors"] == len(actor_index(root, "train")) and 0.5 < stats["train_auc"] <= 1.0
    torch.testing.assert_close(fresh.action_probe.weight, probe.weight)
    torch.testing.assert_close(fresh.action_probe.mean, probe.mean)
    # model.action_probe_seconds draws that many annotated seconds (0: every one); the hidden width
    # is the model's
    seconds = {(v, int(t)) for v, t in zip(actor_index(root, "train").video_ids, actor_index(root, "train").seconds)}
    assert fit_action_probe(STVRModel(resolved.model), root, max_seconds=3)["seconds"] == 3
    assert fit_action_probe(STVRModel(resolved.model), root, max_seconds=None)["seconds"] == len(seconds)
    mlp_cfg = apply_overrides(resolved, ["model.action_probe_hidden=8", "model.action_probe_seconds=2"])
    train(mlp_cfg, tmp_path / "mlp", max_steps=1, progress=False)
    mlp, _, _ = load_checkpoint(tmp_path / "mlp")
    assert mlp.action_probe.hidden_weight.shape[0] == 8 and bool(mlp.action_probe.fitted)
    check = STVRModel(mlp_cfg.model)
    assert fit_action_probe(check, root, max_seconds=2, seed=0)["seconds"] == 2
    torch.testing.assert_close(check.action_probe.hidden_weight, mlp.action_probe.hidden_weight)
    # resuming keeps the fitted probe (it is not fitted again), and the scale learns
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    train(cfg, tmp_path / "run", max_steps=5, progress=False)
    model2, _, state = load_checkpoint(tmp_path / "run")
    assert int(state["step"]) == 5
    for k in ("mean", "std", "weight", "bias"):
        torch.testing.assert_close(model2.action_probe.state_dict()[k], before[k])
    assert model2.action_probe.log_scale.item() != pytest.approx(math.log(INITIAL_SCALE), abs=1e-9)
    # detections come out through the term (predict path)
    from stvr.data.dataset import EvalPairDataset
    from stvr.predict import predict_pairs

    val = EvalPairDataset(root, split="val", image_size=64)
    dets = predict_pairs(model2, val, progress=False, indices=[0])
    assert len(dets) == 1 and all(np.isfinite(np.asarray(d, dtype=float)).all() for d in dets[0] if len(d))


def _fit_worker(rank: int, world: int, port: int, root: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from stvr.pretrain import fit_action_probe

        model = STVRModel(apply_overrides(preset("cpu"), ON + ["model.action_ids=1,2,3,4,5,6,7,8"]).model)
        stats = fit_action_probe(model, root, batch_size=2)
        queue.put((rank, stats["actors"], model.action_probe.weight.numpy().copy(), model.action_probe.mean.numpy().copy()))
    finally:
        dist.destroy_process_group()


def test_processes_share_the_fit_and_get_the_probe_of_one_process(root):
    # under torch.distributed each process computes every world_size-th block of seconds and the
    # features are gathered in block order: every rank fits the probe a single process fits
    import socket

    import torch.multiprocessing as mp

    from stvr.pretrain import fit_action_probe

    single = STVRModel(apply_overrides(preset("cpu"), ON + ["model.action_ids=1,2,3,4,5,6,7,8"]).model)
    stats = fit_action_probe(single, root, batch_size=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fit_worker, args=(r, 2, port, str(root), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted((queue.get(timeout=5) for _ in procs), key=lambda r: r[0])
    for rank, actors, weight, mean in results:
        assert actors == stats["actors"]
        torch.testing.assert_close(torch.from_numpy(weight), single.action_probe.weight)
        torch.testing.assert_close(torch.from_numpy(mean), single.action_probe.mean)
