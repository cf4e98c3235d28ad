"""stvr.data.ava: CSV validation, tubelet linking, official split, training cut, evaluation pairs."""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest

from stvr.data import ava
from stvr.data.ava import AvaRow, Tubelet

N_WELL_FORMED = 4742


@pytest.fixture(scope="module")
def rows(request):
    from pathlib import Path

    path = Path(request.config.rootpath) / "tests" / "data" / "ava" / "ava_val_v2.2_sample.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ava.read_annotations(path, strict=False)


@pytest.fixture(scope="module")
def tubes(rows):
    return ava.link_tubelets(rows)


@pytest.fixture(scope="module")
def split():
    return ava.load_label_split()


def _write(tmp_path, lines, name="a.csv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = "abcdefghijk,0902,0.100,0.200,0.300,0.400,12,0"


# ----------------------------------------------------------------------------- reading


def test_strict_names_file_and_line_16(data_dir):
    path = data_dir / "ava" / "ava_val_v2.2_sample.csv"
    with pytest.raises(ValueError) as info:
        ava.read_annotations(path, strict=True)
    msg = str(info.value)
    assert f"{path}:16:" in msg
    assert "person id '3_'" in msg


def test_lenient_skips_only_line_16_with_one_warning(data_dir):
    path = data_dir / "ava" / "ava_val_v2.2_sample.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = ava.read_annotations(path, strict=False)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "skipped 1 malformed row(s)" in msg and "line(s) 16 " in msg and str(path) in msg
    assert len(rows) == N_WELL_FORMED
    assert 16 not in {r.line for r in rows}
    assert [r.line for r in rows] == [n for n in range(1, 4744) if n != 16]
    assert Counter(r.video_id for r in rows) == {"1j20qq1JyX4": 2338, "2PpxiG0WU18": 2404}
    r = rows[0]
    assert r == AvaRow("1j20qq1JyX4", 902, (0.002, 0.118, 0.714, 0.977), 12, 1)
    assert isinstance(r.second, int) and isinstance(r.person_id, int) and isinstance(r.box[0], float)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("abcdefghijk,0902,0.1,0.2,0.3,0.4,12", "expected 8"),
        ("abcdefghijk,0902,0.1,0.2,0.3,0.4,12,0,9", "expected 8"),
        (",0902,0.1,0.2,0.3,0.4,12,0", "bad video id"),
        ("abc def,0902,0.1,0.2,0.3,0.4,12,0", "bad video id"),
        ("abcdefghijk,09x2,0.1,0.2,0.3,0.4,12,0", "timestamp"),
        ("abcdefghijk,902.5,0.1,0.2,0.3,0.4,12,0", "timestamp"),
        ("abcdefghijk,0902,0.1,0.2,1.3,0.4,12,0", "x2 '1.3' is not in [0, 1]"),
        ("abcdefghijk,0902,-0.1,0.2,0.3,0.4,12,0", "x1 '-0.1' is not in [0, 1]"),
        ("abcdefghijk,0902,0.1,nan,0.3,0.4,12,0", "y1 'nan' is not in [0, 1]"),
        ("abcdefghijk,0902,0.1,0.2,abc,0.4,12,0", "x2 'abc' is not a number"),
        ("abcdefghijk,0902,0.5,0.2,0.3,0.4,12,0", "x1 > x2"),
        ("abcdefghijk,0902,0.1,0.5,0.3,0.4,12,0", "y1 > y2"),
        ("abcdefghijk,0902,0.1,0.2,0.3,0.4,walk,0", "action id"),
        ("abcdefghijk,0902,0.1,0.2,0.3,0.4,12,", "person id"),
    ],
)
def test_each_kind_of_malformed_row(tmp_path, line, problem):
    p = _write(tmp_path, [GOOD, "", line, GOOD.replace(",0902,", ",0903,")])
    with pytest.raises(ValueError) as info:
        ava.read_annotations(p)
    assert f"{p}:3:" in str(info.value) and problem in str(info.value)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row\(s\) on line\(s\) 3 ") as rec:
        got = ava.read_annotations(p, strict=False)
    assert len(rec) == 1
    assert [r.line for r in got] == [1, 4] and [r.second for r in got] == [902, 903]


def test_blank_lines_skipped_and_lines_counted(tmp_path):
    p = _write(tmp_path, ["", GOOD, "  ", "", GOOD.replace(",12,", ",79,")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for blank lines
        got = ava.read_annotations(p)
    assert [r.line for r in got] == [2, 5] and [r.action_id for r in got] == [12, 79]


def test_conflicting_box_of_one_person(tmp_path):
    other = "abcdefghijk,0902,0.100,0.200,0.300,0.450,79,0"
    p = _write(tmp_path, [GOOD, other, GOOD.replace(",12,0", ",80,0")])
    with pytest.raises(ValueError, match=r":2: malformed AVA row: box .* differs from the box .* on line 1"):
        ava.read_annotations(p)
    with pytest.warns(UserWarning, match=r"line\(s\) 2 "):
        got = ava.read_annotations(p, strict=False)
    assert [r.action_id for r in got] == [12, 80]
    # the same check when rows are built in code
    bad = [AvaRow("v", 1, (0.1, 0.1, 0.2, 0.2), 1, 0), AvaRow("v", 1, (0.1, 0.1, 0.2, 0.3), 2, 0)]
    with pytest.raises(ValueError, match="two different boxes"):
        ava.link_tubelets(bad)


def test_several_malformed_rows_are_listed_in_one_warning(tmp_path):
    lines = [GOOD, "x", GOOD.replace(",0902,", ",0903,"), "y,1", "z,2,3"]
    p = _write(tmp_path, lines)
    with pytest.warns(UserWarning) as rec:
        got = ava.read_annotations(p, strict=False)
    assert len(rec) == 1 and "skipped 3 malformed row(s) on line(s) 2, 4, 5 " in str(rec[0].message)
    assert len(got) == 2


def test_write_then_read_round_trip(tmp_path, rows):
    p = tmp_path / "out.csv"
    ava.write_annotations(rows[:300], p)
    back = ava.read_annotations(p)
    assert back == rows[:300]  # AvaRow equality ignores line numbers
    assert p.read_text().splitlines()[0] == "1j20qq1JyX4,0902,0.002,0.118,0.714,0.977,12,1"


# ----------------------------------------------------------------------------- linking


def test_hand_checked_tubelets(tubes):
    def find(video, person):
        return [t for t in tubes if t.video_id == video and t.person_id == person]

    p2 = find("1j20qq1JyX4", 2)
    assert p2[0].label == (12, 17, 79) and p2[0].seconds == [903, 904]
    np.testing.assert_array_equal(p2[0].boxes, [[0.020, 0.069, 0.985, 0.985], [0.015, 0.052, 1.0, 0.979]])
    p3 = find("1j20qq1JyX4", 3)  # line 16 ("3_") skipped: 906 keeps (11, 74)
    assert p3[0].label == (11, 74) and p3[0].seconds == [905, 906]
    p1 = find("2PpxiG0WU18", 1)
    assert [(t.seconds, t.label) for t in p1[:6]] == [
        ([903], (12, 74, 79, 80)),
        ([904], (12, 79)),
        ([905, 906], (12, 79, 80)),
        ([907], (12, 79)),
        ([908, 909], (12, 79, 80)),
        ([910], (12, 74, 79, 80)),
    ]
    np.testing.assert_array_equal(p1[2].boxes, [[0.402, 0.021, 0.687, 0.928], [0.415, 0.035, 0.674, 0.947]])
    assert p1[0].boxes.dtype == np.float64 and p1[0].boxes.shape == (1, 4)


def test_linking_properties_on_real_rows(rows, tubes):
    # sorted by (video, person, first second)
    keys = [(t.video_id, t.person_id, t.seconds[0]) for t in tubes]
    assert keys == sorted(keys)
    # per (video, person, second): the set of actions and the box of the rows
    truth = defaultdict(lambda: [set(), None])
    for r in rows:
        truth[(r.video_id, r.person_id, r.second)][0].add(r.action_id)
        truth[(r.video_id, r.person_id, r.second)][1] = r.box
    covered = Counter()
    for t in tubes:
        assert t.label == tuple(sorted(t.label)) and len(t.seconds) == len(t.boxes) >= 1
        assert all(b == a + 1 for a, b in zip(t.seconds, t.seconds[1:]))
        for s, box in zip(t.seconds, t.boxes):
            acts, rbox = truth[(t.video_id, t.person_id, s)]
            assert t.label == tuple(sorted(acts))
            assert tuple(box) == rbox
            covered[(t.video_id, t.person_id, s)] += 1
    assert set(covered) == set(truth) and set(covered.values()) == {1}  # a partition
    # maximal: the next tubelet of the same person is not a continuation
    for a, b in zip(tubes, tubes[1:]):
        if (a.video_id, a.person_id) == (b.video_id, b.person_id):
            assert b.seconds[0] != a.seconds[-1] + 1 or b.label != a.label
    assert len(tubes) == 1195


def test_linking_is_independent_of_row_order(rows, tubes):
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    assert ava.link_tubelets(shuffled) == tubes


def test_combined_labels_and_keys(tubes):
    labels = Counter(t.label for t in tubes)
    assert labels[(12, 79)] > labels[(12, 17, 79)] > 0
    assert ava.label_key((80, 11, 74)) == "11+74+80"
    assert ava.parse_label_key("11+74+80") == (11, 74, 80)
    assert Tubelet("v", 0, [80, 11], [1], [[0, 0, 1, 1]]).label == (11, 80)


def test_split_around_gap_and_label_change():
    box = (0.1, 0.1, 0.2, 0.2)
    rows = [AvaRow("v", s, box, a, 7) for s, acts in [(1, [1]), (2, [1]), (4, [1]), (5, [1, 2]), (6, [1])] for a in acts]
    rows.append(AvaRow("v", 2, box, 1, 7))  # duplicate action row: counted once
    got = ava.link_tubelets(rows)
    assert [(t.seconds, t.label) for t in got] == [([1, 2], (1,)), ([4], (1,)), ([5], (1, 2)), ([6], (1,))]


# ----------------------------------------------------------------------------- split


def test_packaged_split_is_the_official_one(split):
    assert len(split["val"]) == 27 and len(split["test"]) == 27
    assert not set(split["val"]) & set(split["test"])
    assert split["test"][0] == (4,) and split["test"][1] == (11, 59, 74, 80) and split["test"][-1] == (8, 74, 80)
    assert split["val"][0] == (11, 17, 74, 80) and split["val"][13] == (12, 17, 74, 79, 80)
    assert split["val"][-1] == (12, 59, 79, 80)
    sizes = Counter(len(lab) for lab in split["val"] + split["test"])
    assert sizes == {1: 5, 2: 17, 3: 20, 4: 11, 5: 1}
    assert (14, 79, 80) in split["test"] and (12, 15) in split["test"]


def test_split_file_forms(tmp_path, split):
    official = tmp_path / "val_test.json"
    official.write_text(json.dumps([[list(x) for x in split["test"]], [list(x) for x in split["val"]]]))
    assert ava.load_label_split(official) == split
    obj = tmp_path / "split.json"
    obj.write_text(json.dumps({"val": [[2, 1]], "test": [[3]]}))
    assert ava.load_label_split(obj) == {"val": [(1, 2)], "test": [(3,)]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"val": [[1]], "test": [[1]]}))
    with pytest.raises(ValueError, match="both val and test"):
        ava.load_label_split(bad)
    bad.write_text(json.dumps({"val": [["a"]], "test": []}))
    with pytest.raises(ValueError, match=f"{bad}: val label 0"):
        ava.load_label_split(bad)


def test_label_map(data_dir):
    m = ava.load_label_map(data_dir / "ava" / "ava_action_list_v2.1_for_activitynet_2018.pbtxt")
    assert len(m) == 60 and m[1] == "bend/bow (at the waist)" and m[80] == "watch (a person)"
    assert 40 not in m
    assert ava.load_label_map() == m  # packaged copy
    assert ava.label_name((80, 40, 12), m) == "stand+#40+watch (a person)"


# ----------------------------------------------------------------------------- training cut


def test_training_tubelets_never_touch_held_out_seconds(rows, tubes, split):
    held = split["val"] + split["test"]
    train = ava.training_tubelets(rows, held)
    held_seconds = {(t.video_id, s) for t in tubes if t.label in set(held) for s in t.seconds}
    assert held_seconds  # the sample has held-out labels
    assert train and all(t.label not in set(held) for t in train)
    assert all((t.video_id, s) not in held_seconds for t in train for s in t.seconds)
    # every remaining (video, person, second) of a training label is kept, with its box
    orig = {(t.video_id, t.person_id, s): (t.label, tuple(b)) for t in tubes for s, b in zip(t.seconds, t.boxes)}
    kept = {(t.video_id, t.person_id, s): (t.label, tuple(b)) for t in train for s, b in zip(t.seconds, t.boxes)}
    expected = {k: v for k, v in orig.items() if v[0] not in set(held) and (k[0], k[2]) not in held_seconds}
    assert kept == expected
    assert all(all(b == a + 1 for a, b in zip(t.seconds, t.seconds[1:])) for t in train)
    keys = [t.key for t in train]
    assert keys == sorted(keys)
    assert ava.training_tubelets(tubes, held) == train  # tubelets as input


def test_training_cut_splits_a_tubelet():
    box = (0.1, 0.1, 0.2, 0.2)
    rows = [AvaRow("v", s, box, 1, 0) for s in range(10, 16)]  # person 0: label (1,), 10..15
    rows += [AvaRow("v", s, box, 9, 1) for s in (12, 13)]  # person 1: held-out label at 12, 13
    rows += [AvaRow("w", s, box, 9, 0) for s in (11,)]  # other video: no effect on v
    got = ava.training_tubelets(rows, [(9,)])
    assert [(t.video_id, t.person_id, t.seconds) for t in got] == [("v", 0, [10, 11]), ("v", 0, [14, 15])]


# ----------------------------------------------------------------------------- evaluation pairs


def _ref_tubelet_candidates(tubes, pair):
    """Tubelets of the pair's label in the reference video that explain its span."""
    lab = tuple(pair["query"]["label"])
    r = pair["reference"]
    out = []
    for t in tubes:
        if t.label != lab or t.video_id != r["id"]:
            continue
        n = len(t)
        if n < 10:
            s, e = max(t.seconds[0] - n, 900), min(t.seconds[-1] + n + 1, 1800)
        else:
            s, e = t.seconds[0], t.seconds[-1] + 1
        if (s, e) == (r["start"], r["end"]):
            out.append(t)
    return out


def test_evaluation_pairs_structure_and_rules(rows, tubes, split):
    for name in ("val", "test"):
        pairs = ava.evaluation_pairs(rows, split[name], seed=0)
        labels = set(split[name])
        by_label = Counter(t.label for t in tubes if t.label in labels)
        assert len(pairs) == sum(by_label.values())  # one pair per tubelet (single ones pair with themselves)
        gt_index = defaultdict(list)
        for t in tubes:
            for s, b in zip(t.seconds, t.boxes):
                gt_index[(t.label, t.video_id, s)].append((t.person_id, [float(v) for v in b]))
        for p in pairs:
            q, r = p["query"], p["reference"]
            lab = tuple(q["label"])
            assert lab in labels and set(q) == {"id", "frames", "boxes", "label"}
            assert set(r) == {"id", "start", "end", "gt"}
            assert len(q["frames"]) == len(q["boxes"]) >= 1
            assert 900 <= r["start"] < r["end"] <= 1800
            assert len(r["gt"]) == r["end"] - r["start"]
            for k, boxes in enumerate(r["gt"]):
                want = [b for _, b in sorted(gt_index[(lab, r["id"], r["start"] + k)])]
                assert boxes == want
            cands = _ref_tubelet_candidates(tubes, p)
            assert cands, p
            if by_label[lab] >= 2:  # "another tubelet": never the query itself
                assert any(not (c.video_id == q["id"] and c.seconds == q["frames"]) for c in cands)
        # query tubelets are exactly the tubelets of the labels
        got = sorted((p["query"]["id"], tuple(p["query"]["frames"]), tuple(p["query"]["label"])) for p in pairs)
        want = sorted((t.video_id, tuple(t.seconds), t.label) for t in tubes if t.label in labels)
        assert got == want


def test_evaluation_pairs_deterministic_and_order_independent(rows, split):
    a = ava.evaluation_pairs(rows, split["test"], seed=0)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    b = ava.evaluation_pairs(shuffled, list(reversed(split["test"])), seed=0)
    assert a == b
    c = ava.evaluation_pairs(rows, split["test"], seed=1)
    assert c != a and len(c) == len(a)
    # a label's pairs do not depend on which other labels are requested
    lab = (11, 49, 80)
    only = ava.evaluation_pairs(rows, [lab], seed=0)
    assert only == [p for p in a if tuple(p["query"]["label"]) == lab]


def test_padding_clipping_and_single_tubelet():
    box = (0.1, 0.1, 0.2, 0.2)
    rows = [AvaRow("v", s, box, 1, 0) for s in (905, 906, 907)]  # 3 s -> padded by 3 each side
    rows += [AvaRow("v", s, box, 1, 1) for s in (901, 902)]  # 2 s near the start -> clipped at 900
    rows += [AvaRow("w", s, (0.5, 0.5, 0.6, 0.6), 1, 4) for s in range(1780, 1792)]  # 12 s: no padding
    rows += [AvaRow("w", s, (0.3, 0.3, 0.4, 0.4), 1, 5) for s in (1785, 1786)]  # same label, other person
    rows += [AvaRow("v", 1000, box, 2, 0)]  # label (2,): a single tubelet
    tubes = ava.link_tubelets(rows)
    spans = {}
    for t in tubes:
        if t.label == (1,):
            n = len(t)
            spans[(t.video_id, t.person_id)] = (
                (max(t.seconds[0] - n, 900), min(t.seconds[-1] + n + 1, 1800)) if n < 10 else (t.seconds[0], t.seconds[-1] + 1)
            )
    assert spans == {("v", 0): (902, 911), ("v", 1): (900, 905), ("w", 4): (1780, 1792), ("w", 5): (1783, 1789)}
    seen_w5 = 0
    for seed in range(5):
        pairs = ava.evaluation_pairs(rows, [(1,), (2,)], seed=seed)
        assert len(pairs) == 5
        for p in pairs[:4]:
            q, r = p["query"], p["reference"]
            assert (r["start"], r["end"]) in spans.values()
            qkey = next(k for k, t in [((t.video_id, t.person_id), t) for t in tubes] if t.seconds == q["frames"] and t.video_id == q["id"])
            assert (r["start"], r["end"]) != spans[qkey] or r["id"] != q["id"]  # another tubelet
            if (r["id"], r["start"]) == ("w", 1783):
                seen_w5 += 1
                gt = r["gt"]
                assert gt[0] == [[0.5, 0.5, 0.6, 0.6]]  # second 1783: person 4 only
                assert gt[1785 - 1783] == [[0.5, 0.5, 0.6, 0.6], [0.3, 0.3, 0.4, 0.4]]  # both persons
        single = pairs[4]
        assert single["query"]["label"] == [2] and single["reference"]["start"] == 999
        assert single["reference"]["end"] == 1002 and single["reference"]["gt"] == [[], [list(box)], []]
    assert seen_w5 > 0
    skip = ava.evaluation_pairs(rows, [(1,), (2,)], seed=0, single="skip")
    assert len(skip) == 4 and all(p["query"]["label"] == [1] for p in skip)
    # explicit ranges: a single (lo, hi) for all videos, and an error outside the range
    narrow = ava.evaluation_pairs(rows, [(2,)], time_ranges=(1000, 1001))
    assert (narrow[0]["reference"]["start"], narrow[0]["reference"]["end"]) == (1000, 1001)
    with pytest.raises(ValueError, match="outside the video's annotated range"):
        ava.evaluation_pairs(rows, [(2,)], time_ranges={"v": (0, 10)})
    with pytest.raises(ValueError, match="no time range for video 'v'"):
        ava.evaluation_pairs(rows, [(2,)], time_ranges={"w": (0, 10)})
