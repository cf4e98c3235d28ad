"""Tests of stvr.model: shapes, losses, masks, streaming, determinism, RoI crops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stvr.config import preset
from stvr.data.batch import PairBatch
from stvr.model import STVRModel, _rank_in_groups, _sample, crop_features

S = 96  # 6 x 6 feature maps (the warp cell's 3 x 3 control grid needs more than 4 x 4)


def small_cfg(**kw):
    base = dict(image_size=S, tiny_width=4, backbone_channels=16, cell_bottleneck=8, rpn_channels=16,
                anchor_base_size=32.0, attention_dim=8, head_mid_channels=8, head_out_channels=32,
                head_blocks=1, cell="none")
    base.update(kw)
    return dataclasses.replace(preset("cpu").model, **base)


GT = [[0.1, 0.1, 0.45, 0.6], [0.5, 0.35, 0.9, 0.95]]


def make_batch(lengths=(3, 2), num_queries=(2, 1), extra_pad=0, seed=1):
    """Two pairs with moving squares; padded clips are zeros at the end."""
    g = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(lengths) + extra_pad
    nq = sum(num_queries)
    qc = torch.rand(nq, 3, 8, S, S, generator=g) * 2 - 1
    qb = torch.tensor([[0.2, 0.2, 0.6, 0.7]]).repeat(nq, 1)
    qi = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(num_queries)])
    rc = torch.zeros(b, length, 3, 8, S, S)
    mask = torch.zeros(b, length, dtype=torch.bool)
    gb, gl = [], []
    for i, n in enumerate(lengths):
        rc[i, :n] = torch.rand(n, 3, 8, S, S, generator=g) * 2 - 1
        for t in range(n):   # bright box where the query-match GT is
            y1, x1 = int(0.1 * S), int(0.1 * S)
            rc[i, t, :, :, y1:int(0.6 * S), x1:int(0.45 * S)] = 0.9
        mask[i, :n] = True
        gb.append([torch.tensor(GT) if t < n else torch.zeros(0, 4) for t in range(length)])
        gl.append([torch.tensor([2, 1]) if t < n else torch.zeros(0, dtype=torch.long) for t in range(length)])
    return PairBatch(qc, qb, qi, rc, mask, gb, gl, pair_ids=list(range(b)))


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return STVRModel(small_cfg(**kw))


def test_crop_features_emulates_tf_crop_and_resize():
    feats = torch.randn(2, 3, 6, 5)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.33, 0.5, 0.34, 0.52]])
    idx = torch.tensor([0, 1, 1])
    out = crop_features(feats, boxes, idx, crop_size=14, pool=1)
    # TF: y_i = y1 * (h - 1) + i * (y2 - y1) * (h - 1) / 13, bilinear
    h, w = 6, 5
    i = torch.arange(14.0)
    ref = []
    for b, k in zip(boxes, idx):
        ys = b[1] * (h - 1) + i * (b[3] - b[1]) * (h - 1) / 13
        xs = b[0] * (w - 1) + i * (b[2] - b[0]) * (w - 1) / 13
        grid = torch.stack(torch.meshgrid(xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1, indexing="xy"), -1)
        ref.append(F.grid_sample(feats[k:k + 1], grid[None], align_corners=True)[0])
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=1e-5)
    pooled = crop_features(feats, boxes, idx)
    assert pooled.shape == (3, 3, 7, 7)
    torch.testing.assert_close(pooled, F.max_pool2d(out, 2, 2))


@pytest.mark.parametrize("gather_elements", [16 << 20, 1000])    # one chunk, and several
def test_bilinear_roi_samples_equal_torchvision_roi_align(monkeypatch, gather_elements):
    from torchvision.ops import roi_align

    from stvr.model import query

    monkeypatch.setattr(query, "_GATHER_ELEMENTS", gather_elements)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 5, 8, 7, generator=g, dtype=torch.float64, requires_grad=True)
    # boxes inside, across the border, wholly outside (zeros beyond [-1, n]), tiny, one cell wide
    xy = torch.rand(40, 4, generator=g, dtype=torch.float64) * 12 - 2.5
    boxes = torch.cat([xy[:, :2].minimum(xy[:, 2:]), xy[:, :2].maximum(xy[:, 2:])], 1)
    boxes = torch.cat([boxes, torch.tensor([[-6.0, -6.0, -3.0, -2.0], [3.0, 2.0, 3.01, 2.02],
                                            [0.0, 0.0, 7.0, 8.0]], dtype=torch.float64)])
    idx = torch.randint(0, 4, (len(boxes),), generator=g)
    upstream = torch.randn(len(boxes), 5, 6, 6, generator=g, dtype=torch.float64)
    ref = roi_align(feats, torch.cat([idx[:, None].double(), boxes], 1), (6, 6), 1.0, 1, True)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), feats)
    out = query.bilinear_roi_samples(feats, boxes, idx, 6)
    (grad,) = torch.autograd.grad((out * upstream).sum(), feats)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    assert out[len(boxes) - 3].abs().max() == 0                  # wholly outside the map
    assert query.bilinear_roi_samples(feats, boxes[:0], idx[:0], 6).shape == (0, 5, 6, 6)


def test_anchors_official_grid():
    model = STVRModel(small_cfg(anchor_scales=(0.25, 0.5, 1.0, 2.0), anchor_aspect_ratios=(0.5, 1.0, 2.0)))
    anchors = model.anchors(6, 6, torch.device("cpu"))
    assert anchors.shape == (6 * 6 * 12, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.allclose(centres[:12], torch.zeros(12, 2))               # offset 0
    assert torch.allclose(centres[12 * 7], torch.tensor([16.0, 16.0]))    # stride 16
    wh = anchors[:12, 2:] - anchors[:12, :2]
    # scale 0.25, ratio 0.5: h = 8 / sqrt(.5), w = 8 * sqrt(.5)
    torch.testing.assert_close(wh[0], torch.tensor([8 * 0.5 ** 0.5, 8 / 0.5 ** 0.5]))
    torch.testing.assert_close(wh[:, 0] * wh[:, 1], torch.tensor([8.0, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]) ** 2)


def test_helpers_rank_and_sample():
    g = torch.tensor([2, 0, 2, 1, 0, 2])
    assert _rank_in_groups(g).tolist() == [0, 0, 1, 0, 1, 2]
    labels = torch.tensor([[1] * 10 + [0] * 30 + [-1] * 5, [1] * 2 + [0] * 3 + [-1] * 40])
    pos, neg = _sample(labels, 16, 0.25)
    assert pos.sum(1).tolist() == [4, 2] and neg.sum(1).tolist() == [12, 3]
    assert bool((labels[pos] == 1).all() and (labels[neg] == 0).all())


@pytest.mark.parametrize("cell", ["none", "conv", "warp", "traj", "flow"])
def test_forward_backward_every_cell(cell):
    model = build(cell=cell).train()
    losses = model(make_batch())
    assert set(losses) == {"rpn_objectness", "rpn_box", "box_classifier", "box_reg", "loss"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    cfg = model.cfg
    total = (cfg.rpn_obj_weight * losses["rpn_objectness"] + cfg.rpn_loc_weight * losses["rpn_box"]
             + cfg.box_cls_weight * losses["box_classifier"] + cfg.box_loc_weight * losses["box_reg"])
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    groups = ["backbone", "rpn", "attention", "head"] + ([] if cell == "none" else ["cell"])
    for name in groups:
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        assert params and all(p.grad is not None for p in params), name
        assert any(p.grad.abs().sum() > 0 for p in params), name
    if cell == "none":
        assert model.cell is None
    model.eval()
    dets = model(make_batch())
    assert [len(d) for d in dets] == [3, 2]


def test_intermediate_shapes_and_detection_format():
    model = build(cell="conv").eval()
    batch = make_batch(num_queries=(3, 1))
    with torch.no_grad():
        q = model.encode_query(batch.query_clips, batch.query_boxes)
        assert q.shape == (4, 16, 7, 7)
        feats = model.run_backbone(batch.reference_clips[0])
        assert feats.shape == (3, 16, 6, 6)
        maps, state = model.propagate(feats[None])
        assert maps.shape == (1, 3, 16, 6, 6) and state[0].shape == (1, 16, 6, 6)
        _, _, anchors, props, valid = model._proposals(maps[0])
        assert props.shape == (3, model.cfg.max_proposals, 4)
        assert (valid.sum(1) <= model.cfg.max_proposals).all() and valid.any()
        assert bool(((props[valid] >= 0) & (props[valid] <= S)).all())
        dets = model(batch)
    assert len(dets) == 2 and [len(d) for d in dets] == [3, 2]
    for pair in dets:
        for d in pair:
            assert d.dim() == 2 and d.shape[1] == 5 and 0 < d.shape[0] <= model.cfg.det_per_clip
            assert d.shape[0] <= model.cfg.det_per_class
            assert bool((d[:, :4] >= 0).all() and (d[:, :4] <= 1).all())
            assert bool((d[:, 2] >= d[:, 0]).all() and (d[:, 3] >= d[:, 1]).all())
            assert bool((d[1:, 4] <= d[:-1, 4]).all()) and bool(((d[:, 4] > 0) & (d[:, 4] < 1)).all())


def test_padded_clips_do_not_contribute():
    model = build(cell="conv").train()
    torch.manual_seed(5)
    base = model(make_batch())
    torch.manual_seed(5)
    padded = model(make_batch(extra_pad=1))          # L = 4 instead of 3, one more empty clip per pair
    torch.testing.assert_close(padded["rpn_objectness"], base["rpn_objectness"])
    torch.testing.assert_close(padded["rpn_box"], base["rpn_box"])
    # second stage divides by B * L (padded clips counted, official), sums over real clips only
    torch.testing.assert_close(padded["box_classifier"], base["box_classifier"] * 3 / 4)
    torch.testing.assert_close(padded["box_reg"], base["box_reg"] * 3 / 4)
    model.eval()
    a, b = model(make_batch()), model(make_batch(extra_pad=1))
    assert [len(p) for p in b] == [3, 2]
    for pa, pb in zip(a, b):
        for da, db in zip(pa, pb):
            torch.testing.assert_close(da, db)


def test_loss_clips_normalizes_like_padding_without_running_padded_clips():
    """``batch.loss_clips`` (training: reference_seconds x 3) gives the official B x 6 divisor
    of the second stage without running zero clips through the network."""
    model = build(cell="conv").train()
    torch.manual_seed(5)
    padded = model(make_batch(extra_pad=3))          # L = 6
    batch = make_batch()                             # L = 3
    batch.loss_clips = 6
    torch.manual_seed(5)
    virtual = model(batch)
    for key in ("rpn_objectness", "rpn_box", "box_classifier", "box_reg"):
        torch.testing.assert_close(virtual[key], padded[key])
    batch.loss_clips = 2                             # never below the real length
    torch.manual_seed(5)
    plain = model(batch)
    torch.manual_seed(5)
    torch.testing.assert_close(plain["box_reg"], model(make_batch())["box_reg"])
    assert make_batch().to("cpu").loss_clips is None and batch.to("cpu").loss_clips == 2


def test_query_attention_is_per_pair():
    model = build(cell="none").eval()
    batch = make_batch(num_queries=(3, 2))
    other = make_batch(num_queries=(3, 2))
    other.query_clips[3:] = torch.rand_like(other.query_clips[3:]) * 2 - 1   # pair 1's queries only
    other.query_boxes[3:] = torch.tensor([0.5, 0.5, 0.9, 0.8])
    a, b = model(batch), model(other)
    for da, db in zip(a[0], b[0]):
        torch.testing.assert_close(da, db)
    assert not torch.equal(a[1][0], b[1][0])


@pytest.mark.parametrize("group,split,vote", [(3, 3, False), (1, 2, False), (3, 3, True)])
def test_streaming_matches_batch_forward(group, split, vote):
    model = build(cell="conv", match_clips=group, det_box_voting=0.5 if vote else 0.0,
                  det_box_voting_group=vote).eval()
    batch = make_batch(lengths=(7,), num_queries=(2,))
    full = model(batch)[0]
    q = model.encode_query(batch.query_clips, batch.query_boxes)
    ref = batch.reference_clips[0]
    first, state = model.detect_clips(q, ref[:split])
    second, state = model.detect_clips(q, ref[split:], state)
    assert len(first) + len(second) == 7 and state["clips"] == 7
    for d, e in zip(first + second, full):
        torch.testing.assert_close(d, e)


def test_clip_groups_number_the_groups_of_each_pair():
    from stvr.model.network import clip_groups

    pair = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    time = torch.tensor([0, 1, 2, 3, 0, 1, 3])
    assert clip_groups(pair, time, 3).tolist() == [0, 0, 0, 1, 2, 2, 3]
    assert clip_groups(pair, time, 1).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert clip_groups(pair[:0], time[:0], 3).tolist() == []


def test_box_voting_over_a_group_gets_the_groups_of_each_pair(monkeypatch):
    """With ``det_box_voting_group`` the post-processing gets each clip's group of
    ``model.match_clips`` clips (per pair, counted from the reference's first clip), without it
    none; the scores do not depend on the voting."""
    import stvr.model.network as network

    seen = []
    original = network.postprocess_detections

    def spy(*args, **kwargs):
        seen.append(args[10] if len(args) > 10 else kwargs.get("clip_group"))
        return original(*args, **kwargs)

    monkeypatch.setattr(network, "postprocess_detections", spy)
    model = build(cell="none", match_clips=3, det_box_voting=0.5, det_box_voting_group=False).eval()
    batch = make_batch(lengths=(6, 4), num_queries=(1, 1))
    per_clip = model(batch)
    model.cfg = dataclasses.replace(model.cfg, det_box_voting_group=True)
    grouped = model(batch)
    assert seen[0] is None and seen[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    for g_pair, c_pair in zip(grouped, per_clip):
        assert len(g_pair) == len(c_pair)
        for g, c in zip(g_pair, c_pair):
            torch.testing.assert_close(g[:, 4], c[:, 4])


def test_group_mean_averages_the_clips_of_a_group_per_pair():
    from stvr.model.network import group_mean

    maps = torch.arange(7, dtype=torch.float64).view(7, 1, 1, 1) ** 2
    pair = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    time = torch.tensor([0, 1, 2, 3, 0, 1, 3])
    out = group_mean(maps, pair, time, 3).flatten().tolist()
    assert out == [5 / 3, 5 / 3, 5 / 3, 9.0, 41 / 2, 41 / 2, 36.0]
    assert group_mean(maps, pair, time, 1) is maps
    assert group_mean(maps, pair, time, 2).flatten().tolist() == [0.5, 0.5, 6.5, 6.5, 20.5, 20.5, 36.0]


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("comparison", [dict(match_cosine=True, match_features="concat"),
                                        dict(match_cosine=False, match_features="compare"),
                                        dict(match_cosine=False, match_features="similarity", match_source="backbone")],
                         ids=["cosine", "compare", "similarity-backbone"])
def test_match_comparisons_read_the_clips_of_their_group(group, comparison):
    """Clip baseline (no cell): a clip's scores depend on the other clips only through the
    proposal's crop mean over its group of ``model.match_clips`` clips, in the match cosine and
    in the similarity / compare features alike."""
    model = build(cell="none", match_clips=group, **comparison).eval()
    batch = make_batch(lengths=(6,), num_queries=(1,))
    before = model(batch)[0]
    batch.reference_clips[0, 2] = torch.rand(3, 8, S, S, generator=torch.Generator().manual_seed(9)) * 2 - 1
    after = model(batch)[0]
    for t in (0, 1):      # the same group as clip 2 when group = 3
        assert torch.equal(before[t], after[t]) == (group == 1)
    for t in (3, 4, 5):   # another group
        torch.testing.assert_close(before[t], after[t])


def test_flow_cell_streaming_uses_previous_clip():
    model = build(cell="flow", match_clips=1).eval()
    batch = make_batch(lengths=(4,), num_queries=(1,))
    full = model(batch)[0]
    q = model.encode_query(batch.query_clips, batch.query_boxes)
    ref = batch.reference_clips[0]
    a, state = model.detect_clips(q, ref[:1])
    b, _ = model.detect_clips(q, ref[1:], state)
    for d, e in zip(a + b, full):
        torch.testing.assert_close(d, e)


def test_record_offsets_warp():
    model = build(cell="warp").eval()
    model.record_offsets = True
    model(make_batch())
    assert len(model.last_offsets) == 3
    assert all(o.shape == (2, 9, 2) for o in model.last_offsets)
    assert model.control_points.shape == (9, 2)


def test_binary_head():
    model = build(head="binary").train()
    losses = model(make_batch())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.head.cls_score.weight.grad is not None
    dets = model.eval()(make_batch())
    assert dets[0][0].shape[1] == 5 and dets[0][0].shape[0] <= model.cfg.det_per_class


def test_deterministic_with_seed():
    a = build(seed=3, cell="conv").train()
    b = build(seed=3, cell="conv").train()
    torch.manual_seed(7)
    la = a(make_batch())
    torch.manual_seed(7)
    lb = b(make_batch())
    for k in la:
        assert torch.equal(la[k], lb[k]), k


@pytest.mark.slow
def test_overfits_one_batch():
    model = build(cell="none").train()
    batch = make_batch(lengths=(2, 2), num_queries=(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(40):
        losses = model(batch)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        history.append(float(losses["loss"].detach()))
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5, history


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of 16"):
        STVRModel(small_cfg(image_size=100))
    with pytest.raises(ValueError, match="head"):
        STVRModel(small_cfg(head="mlp"))


def test_model_info_command(capsys):
    from stvr.cli import main
    from stvr.commands.model import model_summary

    summary = model_summary(small_cfg(cell="conv"))
    params = summary["parameters"]
    assert params["total"] == sum(params[k] for k in ("backbone", "cell", "rpn", "attention", "head"))
    model = build(cell="conv")
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["rpn"] == sum(p.numel() for p in model.rpn.parameters())
    flops = summary["flops_per_clip"]
    assert all(flops[k] > 0 for k in ("backbone", "cell", "rpn", "attention", "head"))
    # RPN 3x3 conv: 2 * (h*w) * Cin * Cout * 9 FLOPs at least
    assert flops["rpn"] >= 2 * 36 * 16 * 16 * 9
    assert main(["model", "info", "--preset", "cpu", "--set", "model.cell=none", "--no-flops"]) == 0
    out = capsys.readouterr().out
    assert "cell=none" in out and "backbone" in out
    assert main(["model", "info", "--set", "model.cell=bogus"]) == 2


def test_clips_without_ground_truth_give_finite_losses():
    batch = make_batch()
    batch.gt_boxes[0][1] = torch.zeros(0, 4)
    batch.gt_labels[0][1] = torch.zeros(0, dtype=torch.long)
    batch.gt_boxes[1] = [torch.zeros(0, 4)] * 3
    batch.gt_labels[1] = [torch.zeros(0, dtype=torch.long)] * 3
    model = build(cell="conv").train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_iou_head_adds_its_loss_and_scores():
    torch.manual_seed(0)
    model = build(cell="conv", iou_head=True, iou_loss_weight=0.5).train()
    assert model.head.iou_pred is not None
    losses = model(make_batch())
    assert set(losses) == {"rpn_objectness", "rpn_box", "box_classifier", "box_reg", "box_iou", "loss"}
    cfg = model.cfg
    total = (cfg.rpn_obj_weight * losses["rpn_objectness"] + cfg.rpn_loc_weight * losses["rpn_box"]
             + cfg.box_cls_weight * losses["box_classifier"] + cfg.box_loc_weight * losses["box_reg"]
             + 0.5 * losses["box_iou"])
    torch.testing.assert_close(losses["loss"], total)
    # BCE against targets in [0, 1] from a zero-initialized logit: log 2 over the normalized weights
    assert 0.0 < float(losses["box_iou"].detach()) <= float(torch.log(torch.tensor(2.0))) + 1e-6
    losses["loss"].backward()
    assert model.head.iou_pred.weight.grad.abs().sum() > 0
    # eval: scores are p(match) * sigmoid(iou logit) -- with a zero IoU layer, 1/2 for every box
    torch.nn.init.zeros_(model.head.iou_pred.weight)
    model.eval()
    with torch.no_grad():
        dets = model(make_batch())
        model.cfg = dataclasses.replace(cfg, det_iou_power=0.0)
        plain = model(make_batch())
    for a, b in zip(dets, plain):
        for x, y in zip(a, b):
            torch.testing.assert_close(x[:, 4], y[:, 4] * 0.5)
            torch.testing.assert_close(x[:, :4], y[:, :4])


def test_iou_head_learns_the_localization_quality():
    torch.manual_seed(0)
    model = build(cell="none", iou_head=True).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    batch = make_batch()
    losses = []
    for _ in range(60):
        torch.manual_seed(1)        # the same sampled proposals every step
        loss = model(batch)["box_iou"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the loss oscillates from step to step (and with the thread count): compare the last ten steps
    assert np.mean(losses[-10:]) < 0.8 * losses[0]


@pytest.mark.parametrize("cell", ["none", "warp"])
def test_feature_stride_8_model_runs_on_the_finer_map(cell):
    model = build(cell=cell, feature_stride=8).train()
    assert model.feature_size == S // 8
    losses = model(make_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.rpn.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(make_batch())
        feats = model.run_backbone(make_batch().query_clips)
    assert feats.shape[-2:] == (S // 8, S // 8)
    assert [len(d) for d in dets] == [3, 2]
    assert model.anchors(S // 8, S // 8, torch.device("cpu")).shape[0] == (S // 8) ** 2 * 12


# What the cpu and paper presets set differently in the head (sizes stay small_cfg's)
_PRESET_HEADS = {
    "cpu": dict(roi_mapping="pixel", match_features="compare", match_cosine=True, box_add_gt=True),
    "paper": dict(roi_mapping="tf", match_features="concat", match_cosine=False, box_add_gt=False),
}
_OPTIONS = [dict(head="binary"), dict(match_features="similarity"), dict(match_source="backbone"),
            dict(iou_head=True), dict(freeze_backbone=True), dict(feature_stride=8)]
_CASES = ([(head, cell, {}) for head in _PRESET_HEADS for cell in ["none", "conv", "warp", "traj", "flow"]]
          + [(head, "warp", o) for head in _PRESET_HEADS for o in _OPTIONS])


@pytest.mark.parametrize("head,cell,options", _CASES,
                         ids=[f"{h}-{c}-" + ",".join(f"{k}={v}" for k, v in o.items()) for h, c, o in _CASES])
def test_every_trainable_parameter_reaches_the_loss(head, cell, options):
    """Multi-process training runs DDP without ``find_unused_parameters`` (train.py): each
    trainable parameter must get a gradient in every step, also from a batch without positives."""
    assert preset(head).model.match_features == _PRESET_HEADS[head]["match_features"]
    model = build(cell=cell, **{**_PRESET_HEADS[head], **options}).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 10
    for positives in (True, False):
        batch = make_batch()
        if not positives:
            batch.gt_boxes = [[torch.zeros(0, 4)] * len(clips) for clips in batch.gt_boxes]
            batch.gt_labels = [[torch.zeros(0, dtype=torch.long)] * len(clips) for clips in batch.gt_labels]
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], positives
