"""Actor clips, backbone pretraining (``stvr pretrain``), the shipped weights, the RoI
mapping, the generator's atom timing and the training-pair levers of issue 11."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stvr.backbones import BUILTIN_TINY_WEIGHTS, TinyBackbone, load_tiny_weights
from conftest import make_synth_root, tiny_synth_config
from stvr.config import DataConfig, apply_overrides, preset
from stvr.data import synthetic as SY
from stvr.data.actors import ActorClipDataset, actor_index
from stvr.model import STVRModel, crop_features
from stvr.pretrain import BUILTIN_RECIPE

TINY = tiny_synth_config(5, speed=(12.0, 24.0))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synth_root(tmp_path_factory, "pre", TINY)


# ----------------------------------------------------------------------------- actor clips


def test_actor_index_matches_the_annotations(root):
    from stvr.data.ava import read_annotations

    rows = read_annotations(root / "annotations" / "train.csv")
    idx = actor_index(root, "train")
    keys = {(r.video_id, r.second, r.person_id) for r in rows}
    assert len(idx) == len(keys)
    assert idx.action_ids == sorted({r.action_id for r in rows})
    for r in rows[:40]:
        k = [i for i in range(len(idx)) if (idx.video_ids[i], idx.seconds[i], idx.person_ids[i])
             == (r.video_id, r.second, r.person_id)]
        assert len(k) == 1
        assert idx.targets[k[0], idx.action_ids.index(r.action_id)] == 1.0
        np.testing.assert_allclose(idx.boxes[k[0]], r.box, atol=1e-6)
    # every entry has 1-3 atoms
    assert set(idx.targets.sum(1).tolist()) <= {1.0, 2.0, 3.0}
    # columns given from outside: validation targets over the training ids
    v = actor_index(root, "val", idx.action_ids)
    assert v.targets.shape[1] == len(idx.action_ids)


def test_actor_clip_dataset_items_and_flip(root):
    idx = actor_index(root, "train")
    ds = ActorClipDataset(root, idx, image_size=64)
    assert len(ds) == 3 * len(idx)
    clip, box, y = ds[4]
    assert clip.shape == (3, 8, 64, 64) and clip.dtype == torch.float32
    assert -1.0 <= float(clip.min()) and float(clip.max()) <= 1.0
    np.testing.assert_allclose(box.numpy(), idx.boxes[1])
    # item 4 = second clip (frames 8..15) of entry 1
    frames = ds.frames(4)
    assert frames.shape == (8, 64, 64, 3)
    np.testing.assert_allclose(clip.numpy(), frames.transpose(3, 0, 1, 2) / 127.5 - 1.0, atol=1e-6)
    flipped = ActorClipDataset(root, idx, image_size=64, flip=True, seed=1)
    n_flip = 0
    for i in range(12):
        c, b, _ = flipped[i]
        c0, b0, _ = ds[i]
        if torch.equal(c, c0):
            torch.testing.assert_close(b, b0)
        else:
            n_flip += 1
            torch.testing.assert_close(c, c0.flip(-1))
            torch.testing.assert_close(b, torch.tensor([1 - b0[2], b0[1], 1 - b0[0], b0[3]]))
    assert 0 < n_flip < 12


# ----------------------------------------------------------------------------- RoI mapping


def test_pixel_roi_mapping_reads_the_cells_under_the_box():
    # cell (i, j) of a stride-16 map holds its own column index j; cell j is centred on pixel 16 j
    w = 8
    feats = torch.arange(w, dtype=torch.float32).expand(1, 1, w, w).contiguous()
    for j in (1, 3, 6):
        c = 16 * j + 0.5                                     # pixel centre of the cell's pixel
        box = torch.tensor([[c - 8, c - 8, c + 8, c + 8]]) / 128.0
        out = crop_features(feats, box, torch.zeros(1, dtype=torch.long), 14, pool=1, mapping="pixel",
                            image_size=128)
        assert abs(float(out.mean()) - j) < 1e-4          # centred on cell j
        assert float(out.min()) >= j - 0.5 - 1e-4 and float(out.max()) <= j + 0.5 + 1e-4
        tf = crop_features(feats, box, torch.zeros(1, dtype=torch.long), 14, pool=1, mapping="tf")
        assert float(tf.mean()) < j - 0.05               # TF's corner mapping reads toward the top-left
    with pytest.raises(ValueError, match="RoI mapping"):
        crop_features(feats, box, torch.zeros(1, dtype=torch.long), mapping="nope")


# ----------------------------------------------------------------------------- pretraining


def test_pretraining_reduces_its_loss_and_loads_into_the_cpu_preset(root, tmp_path):
    from stvr.pretrain import pretrain_backbone

    cfg = dataclasses.replace(preset("cpu").model, image_size=64, backbone_weights=None)
    out = tmp_path / "tiny.safetensors"
    s = pretrain_backbone(root, cfg, out, steps=80, batch_size=8, lr=1e-2, seed=0, progress=False, val_clips=60)
    assert out.is_file()
    assert s["steps"] == 80 and s["train_clips"] > 0
    assert s["loss_last"] < s["loss_first"] - 0.05, s
    assert set(s["val_auc"]) == {str(a) for a in s["action_ids"]}
    # the file loads into the cpu preset's backbone and changes it
    full = apply_overrides(preset("cpu"), [f"model.backbone_weights={out}", "model.image_size=64"])
    model = STVRModel(full.model)
    fresh = TinyBackbone(full.model.tiny_width, full.model.backbone_channels)
    meta = load_tiny_weights(fresh, str(out))
    assert json.loads(meta["summary"])["steps"] == 80
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)
    # a file for another width is refused with a message naming the setting
    with pytest.raises(ValueError, match="backbone_weights"):
        load_tiny_weights(TinyBackbone(8, 64), str(out))
    with pytest.raises(ValueError, match="does not exist"):
        load_tiny_weights(TinyBackbone(16, 64), str(tmp_path / "missing.safetensors"))


def test_recolor_clips_scrambles_static_colour_and_keeps_changes_over_time():
    from stvr.pretrain import recolor_clips

    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 3, 1, 6, 6) * 2 - 1
    static = base.expand(-1, -1, 8, -1, -1).contiguous()
    out = recolor_clips(static, g)
    assert out.shape == static.shape and out.min() >= -1 and out.max() <= 1
    # the same colour change in every frame: a static clip stays static
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    # each clip is some permutation / inversion of its channels, scaled about its mean
    for i in range(8):
        x, y = static[i, :, 0].reshape(3, -1), out[i, :, 0].reshape(3, -1)
        corr = torch.corrcoef(torch.cat([x, y]))[3:, :3].abs()       # |corr| output ch vs input ch
        assert torch.allclose(corr.max(1).values, torch.ones(3), atol=1e-4)
        assert sorted(corr.argmax(1).tolist()) == [0, 1, 2]
    # and the clips do not all get the same change
    perms = {tuple(torch.corrcoef(torch.cat([static[i, :, 0].reshape(3, -1), out[i, :, 0].reshape(3, -1)]))[3:, :3]
                   .abs().argmax(1).tolist()) for i in range(64)}
    assert len(perms) >= 4
    # a change over time keeps its timing: a brightness step at frame 4 stays a step at frame 4
    step = static.clone()
    step[:, :, 4:] = (step[:, :, 4:] + 0.5).clamp(-1, 1)
    out2 = recolor_clips(step, torch.Generator().manual_seed(1))
    diff = (out2[:, :, 1:] - out2[:, :, :-1]).abs().amax((0, 1, 3, 4))
    assert diff[3] > 0.05 and float(diff[[0, 1, 2, 4, 5, 6]].max()) == 0.0
    # deterministic per generator seed
    torch.testing.assert_close(recolor_clips(static, torch.Generator().manual_seed(5)),
                               recolor_clips(static, torch.Generator().manual_seed(5)))


def test_shipped_weights_are_the_cpu_presets_default():
    cfg = preset("cpu").model
    assert cfg.backbone_weights == "builtin"
    assert BUILTIN_TINY_WEIGHTS.is_file() and BUILTIN_TINY_WEIGHTS.stat().st_size < 4_000_000
    b = TinyBackbone(cfg.tiny_width, cfg.backbone_channels)
    meta = load_tiny_weights(b, "builtin")
    assert "stvr pretrain" in meta["recipe"]
    summary = json.loads(meta["summary"])
    assert summary["val_auc_mean"] > 0.8          # it names the atoms of held-out validation actors
    assert json.loads(meta["model"])["roi_mapping"] == cfg.roi_mapping
    # made on the data the generator makes today (a generator bump calls for new weights)
    assert meta["generator_version"] == str(SY.GENERATOR_VERSION)
    assert meta["recipe"] in BUILTIN_RECIPE
    # a random backbone stays available
    assert STVRModel(dataclasses.replace(cfg, backbone_weights=None)).backbone is not None


def test_cli_pretrain(root, tmp_path, capsys):
    from stvr.cli import main

    out = tmp_path / "w.safetensors"
    rc = main(["pretrain", "--data", str(root), "--out", str(out), "--steps", "3", "--batch-size", "4",
               "--set", "model.image_size=64", "--color-augment", "--quiet"])
    assert rc == 0 and out.is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    meta = load_tiny_weights(TinyBackbone(16, 64), str(out))
    assert meta["color_augment"] == "true" and "--color-augment" in meta["recipe"]


# ----------------------------------------------------------------------------- generator timing


def test_atoms_are_deterministic_per_seed_and_switch_at_integer_seconds():
    a1, _ = SY.plan_dataset(TINY)
    a2, _ = SY.plan_dataset(TINY)
    b, _ = SY.plan_dataset(dataclasses.replace(TINY, seed=6))
    assert [x.labels for s in a1 for x in s.actors] == [x.labels for s in a2 for x in s.actors]
    assert [x.spin_w for s in a1 for x in s.actors] == [x.spin_w for s in a2 for x in s.actors]
    assert [x.labels for s in a1 for x in s.actors] != [x.labels for s in b for x in s.actors]
    actor = a1[0].actors[0]
    fps = a1[0].fps

    def params(tr):
        return np.concatenate([np.stack([tr.angle, tr.sx, tr.sy, tr.blink_phase.astype(float), tr.hue], 1),
                               tr.center, tr.scroll], 1)              # [frames, 9]

    actor.labels = [()] * 4
    still = params(SY._ActorTrack(actor, 4, fps))
    for atom in SY.ATOMS:
        actor.labels = [()] * 2 + [(atom,)] * 2          # the atom switches on at second 2
        p = params(SY._ActorTrack(actor, 4, fps))
        # nothing changes up to and including the first frame of second 2 (oscillations are zero there)
        np.testing.assert_allclose(p[: 2 * fps + 1], still[: 2 * fps + 1], atol=1e-9, err_msg=SY.ATOMS[atom])
        assert np.abs(p[2 * fps + 1: 3 * fps] - still[2 * fps + 1: 3 * fps]).max() > 1e-3, SY.ATOMS[atom]
        actor.labels = [(atom,)] * 2 + [()] * 2          # ... and off at second 2
        p = params(SY._ActorTrack(actor, 4, fps))
        assert np.abs(p[1: 2 * fps] - still[1: 2 * fps]).max() > 1e-3, SY.ATOMS[atom]
        # after it stops: oscillating atoms are back at rest; accumulating ones keep their offset
        d = p[2 * fps:] - still[2 * fps:]
        np.testing.assert_allclose(d - d[0], 0.0, atol=1e-9, err_msg=SY.ATOMS[atom])


# ----------------------------------------------------------------------------- training levers


def test_reference_from_another_actor(root):
    from stvr.data.dataset import TrainPairDataset

    same = TrainPairDataset(root, DataConfig(root=str(root)), image_size=64, seed=0)
    other = TrainPairDataset(root, DataConfig(root=str(root), reference_other_actor=True), image_size=64, seed=0)
    n_same_actor = {"same": 0, "other": 0}
    for name, ds in (("same", same), ("other", other)):
        for i in range(len(ds)):
            spec = ds.sample_spec(i)
            q, r = ds.tubelets[i], ds.tubelets[spec["reference_index"]]
            assert r.label == q.label
            if (q.video_id, q.person_id) == (r.video_id, r.person_id):
                n_same_actor[name] += 1
                if name == "other":   # only when the label has no other actor
                    assert all((t.video_id, t.person_id) == (q.video_id, q.person_id)
                               for t in ds.tubelets if t.label == q.label)
    assert n_same_actor["other"] < n_same_actor["same"]


def test_ground_truth_boxes_join_the_second_stage(monkeypatch):
    from test_model import GT, S, make_batch, small_cfg

    batch = make_batch()
    gt_px = torch.tensor(GT) * S
    hits = {}
    for add in (False, True):
        torch.manual_seed(0)
        model = STVRModel(small_cfg(box_add_gt=add)).train()
        seen = []
        orig = model._second_stage

        def spy(maps, boxes, *a, **k):
            seen.append(boxes.detach().clone())
            return orig(maps, boxes, *a, **k)

        monkeypatch.setattr(model, "_second_stage", spy)
        losses = model(batch)
        assert torch.isfinite(losses["loss"])
        boxes = seen[0]
        hits[add] = int(sum(((boxes - g).abs().sum(1) < 1e-4).sum() for g in gt_px))
    assert hits[False] == 0
    assert hits[True] >= 5          # 5 real clips; each samples at least one of its 2 GT boxes


def test_similarity_features_compare_the_crop_means():
    from stvr.model.network import fuse_features

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 4, 7, 7, generator=g), torch.randn(3, 4, 7, 7, generator=g)
    torch.testing.assert_close(fuse_features(p, q), torch.cat([p, q], 1))
    f = fuse_features(p, q, "similarity")
    assert f.shape == (3, 16, 7, 7)
    mp, mq = p.mean((2, 3)), q.mean((2, 3))
    torch.testing.assert_close(f[:, 8:12, 3, 5], mp * mq)
    torch.testing.assert_close(f[:, 12:, 0, 0], (mp - mq).abs())
    assert torch.equal(f[:, 8:, 0, 0], f[:, 8:, 6, 6])              # broadcast over the cells
    with pytest.raises(ValueError, match="match_features"):
        fuse_features(p, q, "nope")
    cfg = dataclasses.replace(preset("cpu").model, match_features="similarity", backbone_weights=None)
    model = STVRModel(cfg)
    assert model.head.blocks[0].conv1.in_channels == 4 * cfg.backbone_channels


def test_compare_features_leave_out_the_query_itself():
    from stvr.model.network import fuse_features

    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(2, 4, 7, 7, generator=g), torch.randn(2, 4, 7, 7, generator=g)
    f = fuse_features(p, q, "compare")
    assert f.shape == (2, 12, 7, 7)
    torch.testing.assert_close(f[:, :4], p)
    torch.testing.assert_close(f[:, 4:], fuse_features(p, q, "similarity")[:, 8:])
    # the query reaches the head only through the comparison: a query with the same crop
    # mean but other cells gives the same input
    q2 = q - q.mean((2, 3), keepdim=True) + q.mean((2, 3), keepdim=True) + torch.randn(2, 4, 7, 7, generator=g)
    q2 = q2 - q2.mean((2, 3), keepdim=True) + q.mean((2, 3), keepdim=True)
    torch.testing.assert_close(fuse_features(p, q2, "compare"), f)
    assert not torch.allclose(fuse_features(p, q2, "similarity"), fuse_features(p, q, "similarity"))
    cfg = dataclasses.replace(preset("cpu").model, match_features="compare", backbone_weights=None)
    assert STVRModel(cfg).head.blocks[0].conv1.in_channels == 3 * cfg.backbone_channels
    with pytest.raises(ValueError, match="compare"):
        from stvr.config import validate_config
        validate_config(apply_overrides(preset("cpu"), ["model.match_features=cosine"]))


def test_match_source_backbone_compares_the_clips_own_features(monkeypatch):
    """``model.match_source="backbone"``: the comparison reads the proposal's crop of the backbone
    maps (before the recurrent cell), not of the propagated maps."""
    from test_model import make_batch, small_cfg

    from stvr.model import network

    g = torch.Generator().manual_seed(2)
    p, q, own = (torch.randn(2, 4, 7, 7, generator=g) for _ in range(3))
    f = network.fuse_features(p, q, "similarity", own.mean((2, 3), keepdim=True))
    torch.testing.assert_close(f[:, :8], torch.cat([p, q], 1))
    torch.testing.assert_close(f[:, 8:12, 2, 2], own.mean((2, 3)) * q.mean((2, 3)))

    seen = {}
    real_fuse = network.fuse_features

    def spy(proposal, query, kind="concat", proposal_mean=None):
        seen[kind] = (proposal.detach().mean((2, 3)), None if proposal_mean is None else proposal_mean.detach())
        return real_fuse(proposal, query, kind, proposal_mean)

    monkeypatch.setattr(network, "fuse_features", spy)
    batch = make_batch()
    for source in ("propagated", "backbone"):
        torch.manual_seed(0)
        model = STVRModel(small_cfg(cell="conv", match_features="similarity", match_source=source,
                                    match_clips=1)).eval()      # per clip (match_clips: test_model.py)
        with torch.no_grad():
            model(batch)
        prop_mean, own_mean = seen["similarity"]
        if source == "propagated":
            assert own_mean is None
        else:
            assert own_mean.shape == (prop_mean.shape[0], prop_mean.shape[1], 1, 1)
            # a conv LSTM's output is not its input: the two crop means differ
            assert (own_mean.flatten(1) - prop_mean).abs().max() > 1e-3
    with pytest.raises(ValueError, match="match_source"):
        from stvr.config import validate_config
        validate_config(apply_overrides(preset("cpu"), ["model.match_source=cell"]))


def test_match_cosine_adds_a_learned_scale_times_the_cosine_to_the_match_logit():
    from test_model import make_batch, small_cfg

    from stvr.model.query import crop_features

    batch = make_batch()
    torch.manual_seed(0)
    with_cos = STVRModel(small_cfg(cell="conv", match_cosine=True)).train()
    plain = STVRModel(small_cfg(cell="conv", match_cosine=False))
    assert plain.head.match_log_scale is None
    plain.load_state_dict({k: v for k, v in with_cos.state_dict().items() if k != "head.match_log_scale"})
    plain.train()
    torch.testing.assert_close(with_cos.head.match_log_scale.exp(), torch.tensor(10.0))
    # the same proposals through both heads
    feats = torch.randn(3, 16, 4, 4)
    maps = torch.randn(3, 16, 4, 4)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0], [10.0, 0.0, 60.0, 50.0], [0.0, 0.0, 64.0, 64.0]])
    clip_index, clip_pair = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    qf, qi = torch.randn(3, 16, 7, 7), torch.tensor([0, 0, 1])
    torch.manual_seed(1)
    a = with_cos._second_stage(maps, boxes, clip_index, clip_pair, qf, qi, None, feats)[0]
    torch.manual_seed(1)
    b = plain._second_stage(maps, boxes, clip_index, clip_pair, qf, qi, None, feats)[0]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    # by hand: cosine between the backbone crop mean of the proposal and the attended query's mean
    own = crop_features(feats, boxes / with_cos.image_size, clip_index, 14, mapping="pixel",
                        image_size=with_cos.image_size).mean((2, 3))
    crops = crop_features(maps, boxes / with_cos.image_size, clip_index, 14, mapping="pixel",
                          image_size=with_cos.image_size)
    attended = with_cos.attention(crops, clip_pair[clip_index], qf, qi).mean((2, 3))
    cos = torch.nn.functional.cosine_similarity(own, attended, dim=1)
    torch.testing.assert_close(a[:, -1] - b[:, -1], 10.0 * cos)
    # the scale learns
    with_cos(batch)["loss"].backward()
    assert with_cos.head.match_log_scale.grad is not None and with_cos.head.match_log_scale.grad.abs() > 0
