"""stvr.data.ucf24: restricted pickle reading, conversion to tubelets, class split, dataset root."""

from __future__ import annotations

import builtins
import json
import pickle

import numpy as np
import pytest

from stvr.data import pairs as P
from stvr.data import ucf24 as U


def _annotations():
    """6 classes x 2 videos, 100 frames (4 s at 25 fps), xywh pixel boxes."""
    ann = {}
    for c in range(6):
        for g in range(2):
            name = f"{U.UCF24_CLASSES[c]}/v_{U.UCF24_CLASSES[c]}_g0{g + 1}_c01"
            n = 80
            xs = np.linspace(10, 50, n)
            boxes = np.stack([xs, np.full(n, 20.0), np.full(n, 64.0), np.full(n, 120.0)], axis=1)
            tubes = [{"sf": 10, "ef": 90, "label": c, "boxes": boxes}]
            if g == 1:  # a second person, frames 40..59: covers no middle frame of a second
                tubes.append({"sf": 40, "ef": 60, "label": c, "boxes": np.tile([[200.0, 10, 40, 100]], (20, 1))})
            ann[name] = {"numf": 100, "label": c, "annotations": tubes}
    return ann


def _as_json(ann):
    return {k: {"numf": v["numf"], "label": v["label"],
                "annotations": [{**a, "boxes": a["boxes"].tolist()} for a in v["annotations"]]}
            for k, v in ann.items()}


@pytest.fixture
def pkl(tmp_path):
    path = tmp_path / "pyannot.pkl"
    path.write_bytes(pickle.dumps(_annotations(), protocol=2))
    return path


def test_read_pickle_and_json_agree(tmp_path, pkl):
    a = U.load_ucf24_annotations(pkl)
    j = tmp_path / "pyannot.json"
    j.write_text(json.dumps(_as_json(_annotations())))
    b = U.load_ucf24_annotations(j)
    assert sorted(a) == sorted(b) and len(a) == 12
    for k in a:
        assert a[k]["numf"] == b[k]["numf"] == 100
        for ta, tb in zip(a[k]["annotations"], b[k]["annotations"]):
            assert (ta["sf"], ta["ef"], ta["label"]) == (tb["sf"], tb["ef"], tb["label"])
            np.testing.assert_array_equal(ta["boxes"], tb["boxes"])


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_protocols_and_python2_module_names(tmp_path, protocol):
    data = pickle.dumps(_annotations(), protocol=protocol)
    if protocol <= 2:  # Python 2 / old numpy pickles name numpy.core.multiarray
        data = data.replace(b"numpy._core", b"numpy.core")
    path = tmp_path / "a.pkl"
    path.write_bytes(data)
    got = U.load_ucf24_annotations(path)
    np.testing.assert_array_equal(got[sorted(got)[0]]["annotations"][0]["boxes"],
                                  _annotations()[sorted(got)[0]]["annotations"][0]["boxes"])


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _Plain:
    """An ordinary class: unpickling it would import this test module."""


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ann = _annotations()
    ann["Biking/v_Biking_g09_c01"] = {"numf": 10, "label": 2, "annotations": [], "x": _Evil(marker)}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(ann, protocol=2))
    with pytest.raises(ValueError, match=r"evil.pkl: unsafe or invalid pickle: refused to load global '(__builtin__|builtins)\.exec'"):
        U.load_ucf24_annotations(path)
    assert not marker.exists()
    # a class of the test module (arbitrary import) is refused as well
    path.write_bytes(pickle.dumps({"v": {"numf": 1, "annotations": [], "obj": _Plain()}}))
    with pytest.raises(ValueError, match="refused to load global"):
        U.safe_load_pickle(path)
    path.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(ValueError, match="corrupt pickle"):
        U.safe_load_pickle(path)


def test_structure_errors_name_file_and_video(tmp_path):
    ann = _annotations()
    name = sorted(ann)[0]
    ann[name]["annotations"][0]["boxes"] = ann[name]["annotations"][0]["boxes"][:5]
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(ann))
    with pytest.raises(ValueError, match=rf"bad.pkl: video '{name}': tube 0 boxes have shape \(5, 4\), expected \(80, 4\)"):
        U.load_ucf24_annotations(path)
    ann = _annotations()
    ann[name]["annotations"][0]["ef"] = 150
    path.write_bytes(pickle.dumps(ann))
    with pytest.raises(ValueError, match="outside"):
        U.load_ucf24_annotations(path)


def test_tubelets_one_box_per_second(pkl):
    ann = U.load_ucf24_annotations(pkl)
    tubes, ranges = U.ucf24_tubelets(ann, width=320, height=240, fps=25)
    assert len(tubes) == 12  # the short second tubes cover no middle frame
    assert ranges["v_Basketball_g01_c01"] == (0, 4)
    t = next(t for t in tubes if t.video_id == "v_Basketball_g01_c01")
    assert (t.video_id, t.person_id, t.label, t.seconds) == ("v_Basketball_g01_c01", 0, (0,), [0, 1, 2, 3])
    xs = np.linspace(10, 50, 80)
    for k, s in enumerate(t.seconds):
        f = int(np.floor((s + 0.5) * 25)) - 10  # middle frame of second s, relative to sf
        np.testing.assert_allclose(t.boxes[k], [xs[f] / 320, 20 / 240, (xs[f] + 64) / 320, 140 / 240])
    # the same numbers read as (x1, y1, x2, y2) = (x, 20, 64, 120)
    t2, _ = U.ucf24_tubelets(ann, box_format="xyxy")
    t2 = next(t for t in t2 if t.video_id == "v_Basketball_g01_c01")
    np.testing.assert_allclose(t2.boxes[0], [xs[2] / 320, 20 / 240, 64 / 320, 120 / 240])
    ann[sorted(ann)[0]]["annotations"][0]["boxes"][:, 2] = 5.0  # x2 < x1 when read as xyxy
    with pytest.raises(ValueError, match="is box_format 'xywh'"):
        U.ucf24_tubelets(ann, box_format="xyxy")
    with pytest.raises(ValueError, match="box_format"):
        U.ucf24_tubelets(ann, box_format="cxcywh")


def test_class_split():
    s = U.UCF24_SPLIT_SEED0
    assert [len(s[k]) for k in ("train", "val", "test")] == [14, 5, 5]
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(24))
    assert s == U.split_classes(list(reversed(range(24))), seed=0)
    assert U.split_classes(range(24), seed=1) != s
    small = U.split_classes(range(6), seed=0)
    assert [len(small[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    with pytest.raises(ValueError, match="at least 3 classes"):
        U.split_classes([1, 2])


def test_write_ucf24_root(tmp_path, pkl):
    videos = tmp_path / "videos" / "Basketball"
    videos.mkdir(parents=True)
    (videos / "v_Basketball_g01_c01.avi").write_bytes(b"")
    root = tmp_path / "root"
    stats = U.write_ucf24_root(pkl, root, videos_dir=tmp_path / "videos", seed=0)
    split = U.split_classes(range(6), seed=0)
    train = P.load_tubelets(root / "train_tubelets.json")
    assert {t.label[0] for t in train} == set(split["train"]) and len(train) == 8
    for name in ("val", "test"):
        got = P.load_pairs(root / "pairs" / f"{name}.json")
        assert {p["query"]["label"][0] for p in got} == set(split[name]) and len(got) == 2
        for p in got:
            r = p["reference"]
            assert p["query"]["id"] != r["id"]  # the other tubelet of the class
            assert (r["start"], r["end"]) == (0, 4)  # 4-s tube padded by 4 s, clipped to [0, 4)
            assert all(len(g) == 1 for g in r["gt"])
    ds = json.loads((root / "dataset.json").read_text())
    assert list(ds["videos"]) == ["v_Basketball_g01_c01"] and len(stats["missing_videos"]) == 11
    assert ds["time_ranges"]["v_Biking_g02_c01"] == [0, 4]
    assert stats["label_names"]["0"] == "Basketball"
    assert stats["splits"]["train"]["tubelets"] == 8
