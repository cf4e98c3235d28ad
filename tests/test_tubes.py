"""stvr.tubes: linking per-clip detections into tubes, tube IoU, tube NMS, serialization."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stvr.tubes import Tube, box_iou, link_detections, link_ground_truth, tube_iou, tube_iou_matrix, tube_nms


def moving(n, x0=0.1, y0=0.2, w=0.3, h=0.4, vx=0.02, vy=0.0):
    """``[n, 4]`` boxes of a box moving by (vx, vy) per clip."""
    t = np.arange(n)[:, None]
    return np.concatenate([x0 + vx * t, y0 + vy * t, x0 + w + vx * t, y0 + h + vy * t], axis=1)


def with_scores(boxes, score):
    return np.concatenate([boxes, np.full((len(boxes), 1), score)], axis=1)


# ----------------------------------------------------------------------------- box / tube IoU
def test_box_iou_known_values():
    a = [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]
    b = [[0.0, 0.0, 0.5, 1.0], [2.0, 2.0, 3.0, 3.0], [0.2, 0.2, 0.2, 0.2]]
    iou = box_iou(a, b)
    assert iou.shape == (2, 3) and iou.dtype == np.float64
    np.testing.assert_allclose(iou, [[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]], atol=1e-15)
    assert box_iou([[0.3, 0.3, 0.3, 0.3]], [[0.3, 0.3, 0.3, 0.3]])[0, 0] == 0.0  # empty union


def test_tube_iou_known_values():
    full, half = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]
    a = Tube(0, np.tile(full, (4, 1)), np.ones(4))  # clips 0..3
    b = Tube(2, np.tile(half, (4, 1)), np.ones(4))  # clips 2..5
    # temporal IoU 2/6 x mean box IoU 0.5 = 1/6
    assert tube_iou(a, b) == pytest.approx(1 / 6, abs=1e-15)
    assert tube_iou(b, a) == pytest.approx(1 / 6, abs=1e-15)
    assert tube_iou(a, a) == 1.0
    assert tube_iou(a, Tube(4, np.tile(full, (2, 1)), np.ones(2))) == 0.0  # adjacent, no overlap
    # per-frame definition (each clip's box over its 8 frames) gives the same value
    fa = np.zeros((48, 4)), np.zeros(48, bool)
    fb = np.zeros((48, 4)), np.zeros(48, bool)
    for (boxes, valid), t in ((fa, a), (fb, b)):
        boxes[t.start_clip * 8 : t.end_clip * 8] = np.repeat(t.boxes, 8, axis=0)
        valid[t.start_clip * 8 : t.end_clip * 8] = True
    both = fa[1] & fb[1]
    per_frame = np.mean([box_iou(fa[0][f : f + 1], fb[0][f : f + 1])[0, 0] for f in np.nonzero(both)[0]])
    assert tube_iou(a, b) == pytest.approx(both.sum() / (fa[1] | fb[1]).sum() * per_frame, abs=1e-15)
    m = tube_iou_matrix([a, b], [b, a, Tube(10, [full], [1.0])])
    np.testing.assert_allclose(m, [[1 / 6, 1.0, 0.0], [1.0, 1 / 6, 0.0]], atol=1e-15)
    assert tube_iou_matrix([], [a]).shape == (0, 1)


def test_tube_nms():
    base = Tube(0, moving(6), np.full(6, 0.9))
    near = Tube(0, moving(6) + 0.01, np.full(6, 0.8))  # ST-IoU ~ 0.9 with base
    other = Tube(0, moving(6, x0=0.6), np.full(6, 0.7))  # disjoint in space
    late = Tube(20, moving(6), np.full(6, 0.95))  # disjoint in time
    kept = tube_nms([near, other, base, late], iou_threshold=0.5)
    assert kept == [late, base, other]  # descending score, near suppressed
    assert tube_nms([near, base], iou_threshold=0.99) == [base, near]
    # threshold is strict (>), like torchvision.ops.nms
    same = Tube(0, base.boxes, np.full(6, 0.5))
    assert tube_nms([same, base], iou_threshold=1.0) == [base, same]
    assert tube_nms([]) == []


# ----------------------------------------------------------------------------- linking
def test_moving_box_becomes_one_tube():
    boxes = moving(12, vx=0.03, vy=0.01)
    dets = [with_scores(boxes[j : j + 1], 0.5 + 0.02 * j) for j in range(12)]
    tubes = link_detections(dets)
    assert len(tubes) == 1
    t = tubes[0]
    assert (t.start_clip, t.end_clip, t.num_clips) == (0, 12, 12)
    np.testing.assert_array_equal(t.boxes, boxes)
    np.testing.assert_allclose(t.scores, 0.5 + 0.02 * np.arange(12))
    assert t.detected.all()
    assert t.score == pytest.approx(np.mean(0.5 + 0.02 * np.arange(12)))


def test_distractors_start_their_own_tubes():
    boxes = moving(9)
    dets = [np.concatenate([with_scores(boxes[j : j + 1], 0.9),
                            [[0.7, 0.7, 0.8, 0.8, 0.3]] if j in (2, 3) else np.zeros((0, 5))])
            for j in range(9)]
    tubes = link_detections(dets, min_length=1)
    assert [(t.start_clip, t.num_clips) for t in tubes] == [(0, 9), (2, 2)]
    assert [(t.start_clip, t.num_clips) for t in link_detections(dets, min_length=3)] == [(0, 9)]


def test_crossing_actors_stay_two_tubes():
    n = 13
    a = moving(n, x0=0.0, y0=0.2, vx=0.05)  # moves right
    b = moving(n, x0=0.6, y0=0.3, vx=-0.05)  # moves left, same x as a at clip 6
    np.testing.assert_allclose(a[6, [0, 2]], b[6, [0, 2]])
    for order in (0, 1):  # detection order in the clip does not matter
        dets = []
        for j in range(n):
            rows = [with_scores(a[j : j + 1], 0.9), with_scores(b[j : j + 1], 0.6)]
            dets.append(np.concatenate(rows[::-1] if order else rows))
        for motion in (True, False):
            tubes = link_detections(dets, motion=motion)
            assert len(tubes) == 2
            ta, tb = tubes  # descending score: a (0.9) first
            assert ta.num_clips == tb.num_clips == n and ta.start_clip == tb.start_clip == 0
            np.testing.assert_array_equal(ta.boxes, a)
            np.testing.assert_array_equal(tb.boxes, b)


def test_one_clip_gap_is_bridged_with_interpolation():
    boxes = moving(10, vx=0.03)
    dets = [with_scores(boxes[j : j + 1], 0.8) if j != 4 else [] for j in range(10)]
    tubes = link_detections(dets)
    assert len(tubes) == 1
    t = tubes[0]
    assert t.num_clips == 10
    assert t.detected.tolist() == [j != 4 for j in range(10)]
    np.testing.assert_allclose(t.boxes[4], (boxes[3] + boxes[5]) / 2, atol=1e-15)
    np.testing.assert_allclose(t.boxes, boxes, atol=1e-15)  # linear motion is recovered exactly
    assert t.scores[4] == 0.0 and t.score == pytest.approx(0.8)  # gap clips not in the tube score
    # two missing clips, max_gap=2: bridged; max_gap=1: broken
    dets2 = [with_scores(boxes[j : j + 1], 0.8) if j not in (4, 5) else None for j in range(10)]
    assert [t.num_clips for t in link_detections(dets2, max_gap=2)] == [10]
    assert sorted(t.num_clips for t in link_detections(dets2, max_gap=1)) == [4, 4]
    assert sorted(t.num_clips for t in link_detections(dets, max_gap=0)) == [4, 5]


def test_long_gap_is_not_bridged():
    boxes = moving(12, vx=0.01)
    dets = [with_scores(boxes[j : j + 1], 0.8) if j not in (4, 5, 6) else [] for j in range(12)]
    tubes = link_detections(dets, max_gap=2)
    assert sorted((t.start_clip, t.num_clips) for t in tubes) == [(0, 4), (7, 5)]
    assert all(t.detected.all() for t in tubes)
    assert [t.num_clips for t in link_detections(dets, max_gap=3)] == [12]


def test_motion_prediction_bridges_a_gap_of_a_fast_actor():
    # 0.06 per clip, width 0.2: consecutive IoU 0.54, but 0.25 across a missed clip
    boxes = moving(10, w=0.2, vx=0.06)
    dets = [with_scores(boxes[j : j + 1], 0.8) if j != 5 else [] for j in range(10)]
    assert [t.num_clips for t in link_detections(dets, motion=True)] == [10]
    assert sorted(t.num_clips for t in link_detections(dets, motion=False)) == [4, 5]


def test_minimum_length():
    boxes = moving(2)
    dets = [with_scores(boxes[j : j + 1], 0.8) for j in range(2)]
    assert link_detections(dets, min_length=3) == []
    assert [t.num_clips for t in link_detections(dets, min_length=2)] == [2]
    # gap clips count towards the length
    dets = [with_scores(moving(3)[0:1], 0.8), [], with_scores(moving(3)[2:3], 0.8)]
    assert [t.num_clips for t in link_detections(dets, min_length=3)] == [3]


def test_duplicate_detections_are_merged_by_tube_nms():
    boxes = moving(8, vx=0.0)  # a standing actor detected twice per clip
    dets = [np.concatenate([with_scores(boxes[j : j + 1], 0.9), with_scores(boxes[j : j + 1] + 0.005, 0.7)])
            for j in range(8)]
    assert len(link_detections(dets, tube_nms_iou=None)) == 2
    tubes = link_detections(dets)
    assert len(tubes) == 1 and tubes[0].score == pytest.approx(0.9)


def test_link_options_and_inputs():
    boxes = moving(6)
    arrays = [with_scores(boxes[j : j + 1], 0.1 * (j + 1)) for j in range(6)]
    tensors = [torch.tensor(a, dtype=torch.float64) for a in arrays]
    t1, t2 = link_detections(arrays)[0], link_detections(tensors)[0]
    np.testing.assert_array_equal(t1.boxes, t2.boxes)
    # score threshold drops clips 0..2 -> tube starts at clip 3; start_clip offsets indices
    t = link_detections(arrays, score_threshold=0.35, start_clip=30)[0]
    assert (t.start_clip, t.end_clip) == (33, 36)
    two = [np.concatenate([a, with_scores(moving(1, x0=0.6), 0.05)]) for a in arrays]
    assert len(link_detections(two)) == 2 and len(link_detections(two, max_tubes=1)) == 1
    assert link_detections([]) == [] and link_detections([None, [], np.zeros((0, 5))]) == []


@pytest.mark.parametrize("dets, kw, match", [
    ([[[0.1, 0.1, 0.2, 0.2]]], {}, r"shape \[K, 5\]"),
    ([[[0.1, 0.1, 0.2, float("nan"), 0.5]]], {}, "non-finite"),
    ([[[0.3, 0.1, 0.2, 0.2, 0.5]]], {}, "x1 > x2"),
    ([], {"max_gap": -1}, "max_gap"),
    ([], {"min_length": 0}, "min_length"),
])
def test_link_errors(dets, kw, match):
    with pytest.raises(ValueError, match=match):
        link_detections(dets, **kw)


def test_link_ground_truth():
    a = moving(3, vx=0.05)  # one box per second
    gt = [[a[0].tolist(), [0.7, 0.7, 0.9, 0.9]], [a[1].tolist()], [a[2].tolist(), [0.7, 0.7, 0.9, 0.9]]]
    tubes = link_ground_truth(gt, clips_per_second=3)
    # the moving actor over all 9 clips; the other person absent in second 1 -> two tubes
    assert [(t.start_clip, t.num_clips) for t in tubes] == [(0, 9), (0, 3), (6, 3)]
    np.testing.assert_array_equal(tubes[0].boxes, np.repeat(a, 3, axis=0))
    assert all((t.scores == 1).all() for t in tubes)
    assert link_ground_truth([[], []]) == []


# ----------------------------------------------------------------------------- Tube object
def test_frame_boxes_interpolate_every_frame():
    b0, b1 = np.array([0.0, 0.0, 0.4, 0.4]), np.array([0.8, 0.4, 1.0, 0.8])
    t = Tube(5, [b0, b1], [0.9, 0.7])
    fb = t.frame_boxes(clip_frames=8)
    assert fb.shape == (16, 4)
    np.testing.assert_array_equal(t.frame_indices(8), np.arange(40, 56))
    # clip centres at frames 3.5 and 11.5: constant outside, linear in between
    np.testing.assert_array_equal(fb[:4], np.tile(b0, (4, 1)))
    np.testing.assert_array_equal(fb[12:], np.tile(b1, (4, 1)))
    for f in range(4, 12):
        np.testing.assert_allclose(fb[f], b0 + (f - 3.5) / 8 * (b1 - b0), atol=1e-15)
    assert t.time_span(3) == (5 / 3, 7 / 3)
    np.testing.assert_allclose(t.clip_times(3), [5 / 3, 2.0])
    one = Tube(0, [b0], [0.5])
    np.testing.assert_array_equal(one.frame_boxes(4), np.tile(b0, (4, 1)))


def test_round_trip_and_validation():
    t = Tube(3, moving(4), [0.9, 0.0, 0.8, 0.7], detected=[True, False, True, True])
    d = json.loads(json.dumps(t.to_dict()))
    assert (d["start_clip"], d["end_clip"]) == (3, 7)
    assert d["score"] == pytest.approx(0.8)  # mean over detected clips
    back = Tube.from_dict(d)
    assert back.start_clip == 3
    np.testing.assert_array_equal(back.boxes, t.boxes)
    np.testing.assert_array_equal(back.scores, t.scores)
    np.testing.assert_array_equal(back.detected, t.detected)
    assert len(back) == 4 and back.score == t.score
    with pytest.raises(ValueError, match="at least one clip"):
        Tube(0, np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        Tube(0, moving(2), [0.5])
    with pytest.raises(ValueError, match="detected flags"):
        Tube(0, moving(2), [0.5, 0.5], detected=[True])
