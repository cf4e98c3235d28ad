"""stvr.data.pairs: pair files (object and official forms), tubelet files, dataset roots."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from stvr.data import ava, pairs as P


@pytest.fixture(scope="module")
def real_rows(request):
    from pathlib import Path

    path = Path(request.config.rootpath) / "tests" / "data" / "ava" / "ava_val_v2.2_sample.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ava.read_annotations(path, strict=False)


@pytest.fixture(scope="module")
def test_pairs(real_rows):
    return ava.evaluation_pairs(real_rows, ava.load_label_split()["test"], seed=0)


def _to_official(pairs):
    def yx(b):
        return [b[1], b[0], b[3], b[2]]

    out = []
    for p in pairs:
        q, r = p["query"], p["reference"]
        out.append([
            {"id": q["id"], "frames": q["frames"], "boxes": [yx(b) for b in q["boxes"]], "label": q["label"]},
            {"id": r["id"], "start": r["start"], "end": r["end"], "gt": [[yx(b) for b in g] for g in r["gt"]]},
        ])
    return out


def test_object_form_round_trip(tmp_path, test_pairs):
    path = tmp_path / "p.json"
    P.save_pairs(test_pairs, path)
    assert P.load_pairs(path) == test_pairs
    assert isinstance(json.loads(path.read_text())[0], dict)


def test_official_list_form_yxyx(tmp_path, test_pairs):
    path = tmp_path / "official.json"
    path.write_text(json.dumps(_to_official(test_pairs)))
    assert P.load_pairs(path, box_order="yxyx") == test_pairs
    # read as xyxy, a yxyx file gives different (transposed) boxes or fails validation
    try:
        as_xyxy = P.load_pairs(path)
    except ValueError:
        as_xyxy = None
    assert as_xyxy != test_pairs
    # official files may store seconds as "0902" strings and the label as a tuple-like list
    raw = _to_official(test_pairs[:1])
    raw[0][0]["frames"] = [f"{s:04d}" for s in raw[0][0]["frames"]]
    path.write_text(json.dumps(raw))
    assert P.load_pairs(path, box_order="yxyx") == test_pairs[:1]


def _pair():
    return {
        "query": {"id": "v", "frames": [3, 4], "boxes": [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.5]], "label": [5, 2]},
        "reference": {"id": "w", "start": 10, "end": 12, "gt": [[], [[0.5, 0.5, 0.9, 0.9]]]},
    }


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda p: p["reference"]["gt"].pop(), "gt has 1 entries, expected end - start = 2"),
        (lambda p: p["query"]["boxes"].pop(), "query has 2 frames but 1 boxes"),
        (lambda p: p["query"].pop("label"), "query lacks 'label'"),
        (lambda p: p["reference"].update(end=10), "end (10) must be greater than start (10)"),
        (lambda p: p["query"]["boxes"][0].__setitem__(0, 0.9), "x1 > x2 or y1 > y2"),
        (lambda p: p["reference"]["gt"][1][0].__setitem__(2, 1.5), "not normalized"),
        (lambda p: p["reference"]["gt"][1][0].pop(), "4 numbers"),
        (lambda p: p["query"].update(frames=[4, 3]), "increasing"),
        (lambda p: p["query"].update(id=""), "query id"),
    ],
)
def test_validation_names_file_and_pair(tmp_path, mutate, problem):
    bad = _pair()
    mutate(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_pair(), bad]))
    with pytest.raises(ValueError) as info:
        P.load_pairs(path)
    assert f"{path}: pair 1" in str(info.value) and problem in str(info.value)


def test_load_pairs_normalizes_and_rejects_non_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([_pair()]))
    got = P.load_pairs(path)
    assert got[0]["query"]["label"] == [2, 5]
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_pairs(path)
    with pytest.raises(FileNotFoundError):
        P.load_pairs(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="box_order"):
        P.load_pairs(tmp_path / "p.json", box_order="xywh")


def test_tubelet_file_round_trip(tmp_path, real_rows):
    tubes = ava.link_tubelets(real_rows)
    path = tmp_path / "t.json"
    P.save_tubelets(tubes, path)
    back = P.load_tubelets(path)
    assert back == tubes
    first = json.loads(path.read_text())[0]
    assert set(first) == {"id", "person", "label", "seconds", "boxes"}
    path.write_text(json.dumps([{"id": "v", "person": 0, "label": [1], "seconds": [1, 3], "boxes": [[0, 0, 1, 1]] * 2}]))
    with pytest.raises(ValueError, match="tubelet 0: seconds must be non-empty, consecutive"):
        P.load_tubelets(path)


def _make_root(tmp_path, data_dir, ranges=True):
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    csv = data_dir / "ava" / "ava_val_v2.2_sample.csv"
    lines = [l for i, l in enumerate(csv.read_text().splitlines(), 1) if i != 16]
    (root / "annotations" / "train.csv").write_text("\n".join(lines[:2338]) + "\n")  # video 1 for training
    (root / "annotations" / "val.csv").write_text("\n".join(lines[2338:]) + "\n")  # video 2 for evaluation
    split = ava.load_label_split()
    (root / "label_split.json").write_text(json.dumps([[list(x) for x in split["test"]], [list(x) for x in split["val"]]]))
    ds = {"name": "ava-sample", "fps": 24, "videos": {},
          "time_ranges": {"1j20qq1JyX4": [900, 1800], "2PpxiG0WU18": [900, 1800]} if ranges else {},
          "train_videos": ["1j20qq1JyX4"], "val_videos": ["2PpxiG0WU18"]}
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


def test_build_dataset_root(tmp_path, data_dir):
    root = _make_root(tmp_path, data_dir)
    stats = P.build_dataset_root(root, seed=0)
    train = P.load_tubelets(root / "train_tubelets.json")
    split = ava.load_label_split(root / "label_split.json")
    rows_train = ava.read_annotations(root / "annotations" / "train.csv")
    rows_val = ava.read_annotations(root / "annotations" / "val.csv")
    assert train == ava.training_tubelets(rows_train, split["val"] + split["test"])
    assert {t.video_id for t in train} == {"1j20qq1JyX4"}
    for name in ("val", "test"):
        got = P.load_pairs(root / "pairs" / f"{name}.json")
        assert got == ava.evaluation_pairs(rows_val, split[name], (900, 1800), seed=0)
        assert got and {p["reference"]["id"] for p in got} == {"2PpxiG0WU18"}
        assert stats["splits"][name]["pairs"] == len(got)
    assert stats["splits"]["train"]["tubelets"] == len(train)
    assert json.loads((root / "stats.json").read_text())["splits"] == stats["splits"]
    # same seed -> identical files; another seed -> other references
    before = (root / "pairs" / "test.json").read_bytes()
    P.build_dataset_root(root, seed=0)
    assert (root / "pairs" / "test.json").read_bytes() == before
    P.build_dataset_root(root, seed=5)
    assert (root / "pairs" / "test.json").read_bytes() != before


def test_build_dataset_root_errors(tmp_path, data_dir):
    root = _make_root(tmp_path, data_dir, ranges=False)
    with pytest.raises(ValueError, match="no time range for val video"):
        P.build_dataset_root(root)
    shutil.copy(data_dir / "ava" / "ava_val_v2.2_sample.csv", root / "annotations" / "val.csv")
    with pytest.raises(ValueError, match=r"val.csv:16:"):
        P.build_dataset_root(root)
    (root / "label_split.json").unlink()
    with pytest.raises(FileNotFoundError):
        P.build_dataset_root(root)


def test_resolve_video_path(tmp_path):
    ds = {"videos": {"a": "videos/a.mp4", "b": str(tmp_path / "abs" / "b.mkv")}}
    assert P.resolve_video_path(tmp_path, ds, "a") == tmp_path / "videos" / "a.mp4"
    assert P.resolve_video_path(tmp_path, ds, "b") == tmp_path / "abs" / "b.mkv"
    with pytest.raises(FileNotFoundError, match="'c' is not listed"):
        P.resolve_video_path(tmp_path, ds, "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.mp4").write_bytes(b"")
    (other / "c.webm").write_bytes(b"")
    assert P.resolve_video_path(tmp_path, ds, "a", other) == other / "a.mp4"
    assert P.resolve_video_path(tmp_path, ds, "c", other) == other / "c.webm"
    with pytest.raises(FileNotFoundError, match="'b' not found"):
        P.resolve_video_path(tmp_path, ds, "b", other)
