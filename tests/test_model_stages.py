"""The stages of stvr.model on their own (torchvision-style modules): RPN anchors, targets,
losses and proposals; second-stage sampling, losses and post-processing; query crops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from stvr.model import rpn, roi_heads
from stvr.model.ops import balanced_sample, batched_iou, matrix_nms_decay, rank_in_groups
from stvr.model.query import crop_features, crop_queries

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))
S = 64


def rpn_cfg(**kw):
    base = dict(rpn_fg_iou=0.7, rpn_bg_iou=0.3, rpn_batch_per_clip=256, rpn_positive_fraction=0.5,
                rpn_nms_iou=0.7, max_proposals=4)
    base.update(kw)
    return SimpleNamespace(**base)


def test_rpn_targets_hand_built():
    anchors = torch.tensor([[10., 10., 30., 30.],     # = the GT box: positive
                            [12., 10., 32., 30.],     # IoU 0.82 >= 0.7: positive
                            [20., 10., 40., 30.],     # IoU 1/3: between the thresholds, ignored
                            [40., 40., 60., 60.],     # no overlap: negative
                            [50., 50., 70., 70.]])    # not inside the 64 x 64 image: ignored
    gt = torch.tensor([[[10., 10., 30., 30.], [0., 0., 0., 0.]]])
    valid = torch.tensor([[True, False]])
    t = rpn.rpn_targets(gt, valid, anchors, CODER, rpn_cfg(), S)
    assert t.positive[0].tolist() == [True, True, False, False, False]
    assert t.sampled[0].tolist() == [True, True, False, True, False]
    assert t.n_sampled.tolist() == [3.0]
    assert t.pos_clip.tolist() == [0, 0] and t.pos_anchor.tolist() == [0, 1]
    torch.testing.assert_close(t.box_targets[0], torch.zeros(4))
    torch.testing.assert_close(t.box_targets[1], CODER.encode_single(gt[0, :1], anchors[1:2])[0])


def test_rpn_best_anchor_forced_positive_and_losses():
    anchors = torch.tensor([[0., 0., 20., 20.], [30., 30., 50., 50.]])
    gt = torch.tensor([[[0., 0., 32., 32.]]])          # best IoU 0.39 < 0.7: still positive
    t = rpn.rpn_targets(gt, torch.ones(1, 1, dtype=torch.bool), anchors, CODER, rpn_cfg(), S)
    assert t.positive[0].tolist() == [True, False] and t.sampled[0].tolist() == [True, True]
    obj = torch.zeros(1, 2, requires_grad=True)
    deltas = torch.zeros(1, 2, 4, requires_grad=True)
    obj_loss, box_loss = rpn.rpn_losses(obj, deltas, t)
    torch.testing.assert_close(obj_loss, torch.log(torch.tensor(2.0)))   # BCE at logit 0, 2 sampled / 2
    expected = torch.nn.functional.smooth_l1_loss(torch.zeros(4), t.box_targets[0], reduction="sum") / 2
    torch.testing.assert_close(box_loss, expected)
    (obj_loss + box_loss).backward()
    assert obj.grad.abs().sum() > 0 and deltas.grad[0, 1].abs().sum() == 0


def test_rpn_sampling_keeps_the_positive_fraction():
    torch.manual_seed(0)
    labels = torch.tensor([[1] * 10 + [0] * 20 + [-1] * 5])
    pos, neg = balanced_sample(labels, 8, 0.25)
    assert int(pos.sum()) == 2 and int(neg.sum()) == 6
    assert bool((labels[pos] == 1).all()) and bool((labels[neg] == 0).all())


def test_rpn_proposals_nms_and_cap():
    cfg = rpn_cfg(max_proposals=2, rpn_nms_iou=0.5)
    anchors = torch.tensor([[0., 0., 20., 20.], [1., 0., 21., 20.], [40., 40., 60., 60.], [0., 40., 20., 60.]])
    obj = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    props, valid = rpn.rpn_proposals(obj, torch.zeros(1, 4, 4), anchors, CODER, cfg, S, training=False)
    assert props.shape == (1, 2, 4) and valid.all()
    # anchor 1 is suppressed by anchor 0 (IoU 0.9); the next best are anchors 0 and 2
    torch.testing.assert_close(props[0], anchors[[0, 2]])


def test_anchor_grid_is_the_official_one():
    cfg = SimpleNamespace(anchor_base_size=32.0, anchor_scales=(1.0,), anchor_aspect_ratios=(1.0, 4.0))
    cell = rpn.official_cell_anchors(cfg)
    torch.testing.assert_close(cell, torch.tensor([[-16., -16., 16., 16.], [-32., -8., 32., 8.]]))
    grid = rpn.grid_anchors(rpn.anchor_generator(cfg), S, 4, 4, torch.device("cpu"))
    assert grid.shape == (4 * 4 * 2, 4)
    torch.testing.assert_close(grid[2], cell[0] + torch.tensor([16., 0., 16., 0.]))   # second column


def box_cfg(**kw):
    base = dict(box_add_gt=False, box_fg_iou=0.5, box_batch_per_clip=4, box_positive_fraction=0.25,
                det_score_threshold=0.0, det_nms_iou=0.6, det_per_class=15, det_per_clip=30,
                det_box_voting=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_second_stage_sampling_and_weights():
    torch.manual_seed(0)
    gt = torch.tensor([[[10., 10., 30., 30.]]])
    gt_labels = torch.tensor([[2]])
    gt_valid = torch.ones(1, 1, dtype=torch.bool)
    proposals = torch.tensor([[[10., 10., 30., 30.], [11., 10., 31., 30.], [40., 40., 60., 60.],
                               [0., 40., 20., 60.], [40., 0., 60., 20.], [0., 0., 0., 0.]]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    t = roi_heads.box_targets(proposals, valid, gt, gt_labels, gt_valid, CODER, box_cfg(), total_clips=3)
    # 4 per clip, at most 25 % positive: one of the two positives, three of the three negatives
    assert len(t.clip_index) == 4 and len(t.pos_rows) == 1
    assert sorted(t.labels.tolist()) == [0, 0, 0, 2]
    torch.testing.assert_close(t.clip_weight, torch.tensor([1.0 / (4 * 3)]))
    # the invalid slot is never sampled
    assert not any(bool((b == 0).all()) for b in t.boxes)
    # with box_add_gt the ground truth joins the candidates
    t2 = roi_heads.box_targets(proposals[:, 2:5], valid[:, 2:5], gt, gt_labels, gt_valid, CODER,
                               box_cfg(box_add_gt=True), total_clips=1)
    assert t2.labels.tolist().count(2) == 1
    torch.testing.assert_close(t2.box_targets, torch.zeros(1, 4))


def test_second_stage_losses_and_postprocessing():
    t = roi_heads.BoxTargets(clip_index=torch.tensor([0, 0]), boxes=torch.tensor([[10., 10., 30., 30.]] * 2),
                             labels=torch.tensor([2, 0]), pos_rows=torch.tensor([0]),
                             box_targets=torch.zeros(1, 4), clip_weight=torch.tensor([0.5]))
    logits = torch.tensor([[0., 0., 5.], [5., 0., 0.]])
    codes = torch.zeros(2, 2, 4)
    cls_loss, reg_loss = roi_heads.box_losses(logits, codes, t, binary=False)
    expected = torch.nn.functional.cross_entropy(logits, t.labels, reduction="sum") * 0.5
    torch.testing.assert_close(cls_loss, expected)
    assert float(reg_loss) == 0.0
    dets = roi_heads.postprocess_detections(logits, codes, t.boxes, t.clip_index, 2, False, CODER,
                                            box_cfg(), S)
    assert len(dets) == 2 and dets[1].shape == (0, 5)
    # the query-match class only, NMS merges the duplicate box, boxes normalized
    assert dets[0].shape == (1, 5)
    torch.testing.assert_close(dets[0][0, :4], torch.tensor([10., 10., 30., 30.]) / S)


def test_query_crops_and_ops():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    q = crop_queries(feats, boxes, 14)
    torch.testing.assert_close(q, crop_features(feats, boxes, torch.arange(2), 14))
    assert q.shape == (2, 1, 7, 7)
    assert rank_in_groups(torch.tensor([1, 0, 1, 1, 0])).tolist() == [0, 0, 1, 2, 1]
    iou = batched_iou(torch.tensor([[[0., 0., 2., 2.]]]), torch.tensor([[1., 0., 3., 2.]]))
    torch.testing.assert_close(iou, torch.tensor([[[1.0 / 3.0]]]))


def test_stvr_model_keeps_its_old_names():
    import stvr.model as m

    for name in ("STVRModel", "crop_features", "QueryAttention", "BoxHead", "RPNHead",
                 "_rank_in_groups", "_sample", "_batched_iou", "_pad_boxes"):
        assert hasattr(m, name), name
    with pytest.raises(ValueError, match="RoI mapping"):
        crop_features(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), torch.zeros(1, dtype=torch.long),
                      mapping="bogus")


def test_iou_loss_targets_the_refined_box_iou_with_the_nearest_person():
    # two persons; proposal 0 = person 0, proposal 1 half on person 1, proposal 2 on nobody
    gt = torch.tensor([[[10., 10., 30., 30.], [35., 35., 55., 55.], [0., 0., 0., 0.]]])
    gt_valid = torch.tensor([[True, True, False]])
    boxes = torch.tensor([[10., 10., 30., 30.], [25., 35., 45., 55.], [0., 40., 20., 60.]])
    t = roi_heads.BoxTargets(clip_index=torch.zeros(3, dtype=torch.long), boxes=boxes,
                             labels=torch.tensor([2, 0, 0]), pos_rows=torch.tensor([0]),
                             box_targets=torch.zeros(1, 4), clip_weight=torch.tensor([0.25]))
    codes = torch.zeros(3, 2, 4)                  # refined box = proposal
    target = torch.tensor([1.0, 1.0 / 3.0, 0.0])  # 10 x 20 overlap of two 20 x 20 boxes: 200 / 600
    logits = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    loss = roi_heads.iou_loss(logits, codes, t, gt, gt_valid, CODER, image_size=S)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") * 0.25
    torch.testing.assert_close(loss, expected)
    # the gradient vanishes where the prediction is the target (sigmoid(logit) = IoU)
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g, (logits.sigmoid() - target).detach() * 0.25)
    # the target follows the refined (decoded, clipped) box, not the proposal: codes that move
    # proposal 1 onto person 1 give target 1; the last class's codes are the ones read
    codes2 = codes.clone()
    codes2[1, 1] = CODER.encode_single(gt[0, 1:2], boxes[1:2])[0]
    logit_one = torch.full((3,), 30.0)
    per_row = [float(roi_heads.iou_loss(logit_one[i:i + 1], codes2[i:i + 1],
                                        t._replace(clip_index=t.clip_index[i:i + 1], boxes=boxes[i:i + 1]),
                                        gt, gt_valid, CODER, S)) for i in range(3)]
    assert per_row[0] < 1e-6 and per_row[1] < 1e-6 and per_row[2] > 1.0
    # refined boxes are clipped to the image first: [45, 35, 65, 55] -> [45, 35, 64, 55], 200 / 580
    t3 = t._replace(clip_index=t.clip_index[:1], boxes=torch.tensor([[45., 35., 65., 55.]]))
    lg = torch.zeros(1, requires_grad=True)
    (g3,) = torch.autograd.grad(roi_heads.iou_loss(lg, codes[:1], t3, gt, gt_valid, CODER, S), lg)
    torch.testing.assert_close(g3, torch.tensor([(0.5 - 200.0 / 580.0) * 0.25]))
    # a clip without any person: target 0
    empty = roi_heads.iou_loss(torch.zeros(3), codes, t, gt[:, :0], gt_valid[:, :0], CODER, S)
    torch.testing.assert_close(empty, torch.tensor(3 * 0.25 * float(torch.log(torch.tensor(2.0)))))


def test_postprocessing_multiplies_by_the_predicted_iou():
    boxes = torch.tensor([[10., 10., 30., 30.], [40., 40., 60., 60.]])
    clip_index = torch.zeros(2, dtype=torch.long)
    logits = torch.tensor([[0., 0., 2.], [0., 0., 1.]])
    codes = torch.zeros(2, 2, 4)
    p = logits.softmax(-1)[:, 2]
    plain = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER, box_cfg(), S)[0]
    torch.testing.assert_close(plain[:, 4], p)
    quality = torch.tensor([0.2, 0.9])
    iou_logits = torch.log(quality / (1 - quality))
    for power in (0.0, 1.0, 2.0):
        det = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER,
                                               box_cfg(det_iou_power=power), S, iou_logits)[0]
        want = p * quality ** power
        order = torch.argsort(want, descending=True)      # detections come sorted by score
        torch.testing.assert_close(det[:, 4], want[order])
        torch.testing.assert_close(det[:, :4], boxes[order] / S)


def test_box_voting_hand_built():
    kept = torch.tensor([[0., 0., 10., 10.], [50., 50., 60., 60.]])
    kept_group = torch.tensor([0, 1])
    boxes = torch.tensor([[0., 0., 10., 10.],      # the first kept box itself, score 0.6
                          [2., 0., 12., 10.],      # IoU 80/120 = 0.67 with it, score 0.2
                          [0., 1., 10., 11.],      # IoU 90/110 = 0.82, score 0.2
                          [1., 0., 11., 10.],      # IoU 0.82 but another group (clip/class): ignored
                          [50., 50., 60., 60.]])   # the second kept box, alone in its group
    group = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([0.6, 0.2, 0.2, 0.9, 0.5])
    want0 = (0.6 * boxes[0] + 0.2 * boxes[1] + 0.2 * boxes[2]) / 1.0        # [0.4, 0.2, 10.4, 10.2]
    out = roi_heads.vote_boxes(kept, kept_group, boxes, scores, group, 0.5)
    torch.testing.assert_close(out[0], want0)
    # group 1: box 3 overlaps the second kept box by IoU 0, so only the box itself votes
    torch.testing.assert_close(out[1], kept[1])
    # a stricter threshold leaves out the 0.67 box
    out = roi_heads.vote_boxes(kept, kept_group, boxes, scores, group, 0.7)
    torch.testing.assert_close(out[0], (0.6 * boxes[0] + 0.2 * boxes[2]) / 0.8)
    # a kept box with no voter (not among the candidates, nothing overlapping) stays as it is
    lone = torch.tensor([[100., 100., 110., 110.]])
    torch.testing.assert_close(roi_heads.vote_boxes(lone, torch.tensor([0]), boxes, scores, group, 0.5), lone)


def test_postprocessing_votes_over_the_clips_of_a_group():
    """``det_box_voting_group``: a kept box's voters come from every clip of its group (the clips
    of a second), not only its own clip; NMS, the kept boxes per clip and the scores stay."""
    boxes = torch.tensor([[10., 10., 30., 30.],    # clip 0, the actor
                          [14., 10., 34., 30.],    # clip 1, the same actor 4 px on (IoU 320 / 480)
                          [40., 40., 60., 60.]])   # clip 1, far from both
    clip_index = torch.tensor([0, 1, 1])
    logits = torch.tensor([[0., 0., 2.], [0., 0., 1.], [0., 0., 0.5]])
    codes = torch.zeros(3, 2, 4)
    match = logits.softmax(-1)[:, 2]

    def run(group, clip_group):
        cfg = box_cfg(det_box_voting=0.5, det_box_voting_group=group)
        return roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 2, False, CODER, cfg, S,
                                                clip_group=clip_group)

    same = torch.tensor([0, 0])
    for dets in (run(False, same), run(True, None), run(True, torch.tensor([0, 1]))):   # per clip
        torch.testing.assert_close(dets[0][:, :4], boxes[:1] / S)
        torch.testing.assert_close(dets[1][:, :4], boxes[1:] / S)
    dets = run(True, same)
    # the match-class candidates of both clips vote (the other class's boxes never do)
    mean = (match[0] * boxes[0] + match[1] * boxes[1]) / (match[0] + match[1])
    torch.testing.assert_close(dets[0][:, :4], mean[None] / S)
    torch.testing.assert_close(dets[1][:, :4], torch.stack([mean, boxes[2]]) / S)
    torch.testing.assert_close(dets[0][:, 4], match[:1])
    torch.testing.assert_close(dets[1][:, 4], match[1:])


def test_postprocessing_with_box_voting():
    # two proposals on one actor, both refined to themselves (zero codes): NMS keeps the higher;
    # voting moves it toward the other by their score weights; the score stays
    boxes = torch.tensor([[10., 10., 30., 30.], [12., 10., 32., 30.], [40., 40., 60., 60.]])
    clip_index = torch.zeros(3, dtype=torch.long)
    logits = torch.tensor([[0., 0., 2.], [0., 0., 1.], [0., 0., 0.5]])
    codes = torch.zeros(3, 2, 4)
    p = logits.softmax(-1)
    plain = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER,
                                             box_cfg(det_nms_iou=0.5), S)[0]
    torch.testing.assert_close(plain[:, :4], boxes[[0, 2]] / S)
    voted = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER,
                                             box_cfg(det_nms_iou=0.5, det_box_voting=0.5), S)[0]
    torch.testing.assert_close(voted[:, 4], plain[:, 4])
    w = p[:2, 2]
    torch.testing.assert_close(voted[0, :4], (w[0] * boxes[0] + w[1] * boxes[1]) / w.sum() / S)
    torch.testing.assert_close(voted[1, :4], boxes[2] / S)       # the "other person" boxes do not vote


def naive_matrix_nms_decay(boxes, scores, groups, kind, sigma):
    """The definition, one candidate at a time (the test's reference)."""
    out = torch.ones_like(scores)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    rank = {i: r for r, i in enumerate(order)}
    iou = batched_iou(boxes[None], boxes[None])[0]
    f = (lambda x: 1 - x) if kind == "linear" else (lambda x: torch.exp(-x ** 2 / sigma))
    for j in range(len(scores)):
        for i in range(len(scores)):
            if groups[i] != groups[j] or rank[i] >= rank[j]:
                continue
            comp = max([float(iou[k, i]) for k in range(len(scores))
                        if groups[k] == groups[i] and rank[k] < rank[i]] + [0.0])
            out[j] = min(out[j], f(iou[i, j]) / f(torch.tensor(comp)))
    return out.clamp(max=1.0)


def test_matrix_nms_decay_hand_built():
    boxes = torch.tensor([[0., 0., 10., 10.],      # A, top score
                          [0., 0., 10., 20.],      # B: IoU 100 / 200 = 0.5 with A
                          [0., 10., 10., 30.],     # C: IoU 0 with A, 100 / 300 = 1/3 with B
                          [0., 0., 10., 10.]])     # D = A but in another group
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5])
    groups = torch.tensor([0, 0, 0, 1])
    lin = matrix_nms_decay(boxes, scores, groups, "linear")
    # B: (1 - 0.5) / (1 - 0) by A; C: by A 1, by B (1 - 1/3) / (1 - 0.5) > 1 -> 1 (B is itself
    # half suppressed, so it suppresses C less); D alone in its group
    torch.testing.assert_close(lin, torch.tensor([1.0, 0.5, 1.0, 1.0]))
    gauss = matrix_nms_decay(boxes, scores, groups, "gaussian", sigma=0.5)
    c = min(1.0, float(torch.exp(-(torch.tensor(1 / 9) - 0.25) / 0.5)))
    torch.testing.assert_close(gauss, torch.tensor([1.0, float(torch.exp(torch.tensor(-0.25 / 0.5))), c, 1.0]))
    # the order of the inputs does not matter, only the scores
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(matrix_nms_decay(boxes[perm], scores[perm], groups[perm], "linear"), lin[perm])
    with pytest.raises(ValueError, match="linear"):
        matrix_nms_decay(boxes, scores, groups, "cubic")
    assert matrix_nms_decay(boxes[:1], scores[:1], groups[:1]).tolist() == [1.0]
    assert matrix_nms_decay(boxes[:0], scores[:0], groups[:0]).numel() == 0


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_matrix_nms_decay_equals_its_definition(kind):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        k = int(torch.randint(2, 40, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 60
        boxes = torch.cat([xy, xy + 5 + torch.rand(k, 2, generator=g) * 30], 1)
        scores = torch.rand(k, generator=g)
        groups = torch.randint(0, 4, (k,), generator=g)
        want = naive_matrix_nms_decay(boxes, scores, groups, kind, 0.7)
        torch.testing.assert_close(matrix_nms_decay(boxes, scores, groups, kind, 0.7), want)


def test_postprocessing_with_score_decay():
    """``det_score_decay``: a duplicate that the hard NMS keeps (IoU 1/3 < 0.4 with the top box)
    comes out with its score decayed by 1 - 1/3; a box overlapping nothing keeps its score; the
    same detections and boxes as without the decay otherwise."""
    boxes = torch.tensor([[10., 10., 30., 30.], [10., 20., 30., 40.], [40., 40., 60., 60.]])
    clip_index = torch.zeros(3, dtype=torch.long)
    logits = torch.tensor([[0., 0., 2.], [0., 0., 1.], [0., 0., 0.5]])
    codes = torch.zeros(3, 2, 4)
    match = logits.softmax(-1)[:, 2]
    plain = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER,
                                             box_cfg(det_nms_iou=0.4, det_score_decay="none"), S)[0]
    torch.testing.assert_close(plain[:, 4], match)
    cfg = box_cfg(det_nms_iou=0.4, det_score_decay="linear", det_score_decay_sigma=0.5)
    decayed = roi_heads.postprocess_detections(logits, codes, boxes, clip_index, 1, False, CODER, cfg, S)[0]
    want = torch.stack([match[0], match[1] * (1 - 1 / 3), match[2]])
    order = torch.argsort(want, descending=True)
    torch.testing.assert_close(decayed[:, 4], want[order])
    torch.testing.assert_close(decayed[:, :4], boxes[order] / S)


def test_score_decay_leaves_box_voting_to_the_head_scores():
    """With box voting, a voter suppressed by the NMS still weighs by its own probability, not
    by its decayed score: the decay changes the ranking, not where the kept boxes lie."""
    boxes = torch.tensor([[10., 10., 30., 30.],    # kept
                          [12., 10., 32., 30.],    # IoU 360 / 440 with it: suppressed, votes
                          [40., 40., 60., 60.]])   # far away
    clip_index = torch.zeros(3, dtype=torch.long)
    logits = torch.tensor([[0., 0., 2.], [0., 0., 1.5], [0., 0., 0.5]])
    codes = torch.zeros(3, 2, 4)
    match = logits.softmax(-1)[:, 2]
    runs = {decay: roi_heads.postprocess_detections(
        logits, codes, boxes, clip_index, 1, False, CODER,
        box_cfg(det_nms_iou=0.4, det_box_voting=0.5, det_score_decay=decay, det_score_decay_sigma=0.5), S)[0]
        for decay in ("none", "linear")}
    torch.testing.assert_close(runs["linear"], runs["none"])     # nothing kept overlaps another
    voted = (match[0] * boxes[0] + match[1] * boxes[1]) / (match[0] + match[1])
    torch.testing.assert_close(runs["linear"][0, :4], voted / S)
    torch.testing.assert_close(runs["linear"][:, 4], match[[0, 2]])
