"""stvr.data.stats and the `stvr data` command line."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from stvr.cli import main
from stvr.data import ava
from stvr.data import stats as ST
from stvr.data.ava import Tubelet


def _pair(label, n_frames, start, end):
    return {"query": {"id": "q", "frames": list(range(n_frames)), "boxes": [[0, 0, 1, 1]] * n_frames, "label": list(label)},
            "reference": {"id": "r", "start": start, "end": end, "gt": [[[0, 0, 1, 1]]] * (end - start)}}


def test_compute_stats_counts():
    train = [Tubelet("a", 0, (1,), [1, 2, 3], np.zeros((3, 4))), Tubelet("b", 1, (1,), [5], np.zeros((1, 4))),
             Tubelet("a", 2, (2, 3), [7, 8], np.zeros((2, 4)))]
    pairs = {"val": [_pair((4,), 2, 0, 6)], "test": [_pair((5, 6), 1, 3, 6), _pair((5, 6), 3, 0, 2)]}
    split = {"val": [(4,), (9,)], "test": [(5, 6)]}
    s = ST.compute_stats(train, pairs, split, label_names={"1": "one", "5+6": "five+six", "zz": "unused"})
    assert s["splits"]["train"] == {"labels": 2, "tubelets": 3, "seconds": 6, "videos": 2}
    assert s["splits"]["val"] == {"labels": 2, "labels_with_pairs": 1, "pairs": 1, "query_seconds": 2,
                                  "reference_seconds": 6, "gt_boxes": 6, "videos": 2}
    assert s["splits"]["test"]["pairs"] == 2 and s["splits"]["test"]["query_seconds"] == 4
    assert s["splits"]["test"]["reference_seconds"] == 5
    assert s["labels"]["1"] == {"split": "train", "samples": 2, "tubelets": 2, "seconds": 4}
    assert s["labels"]["9"]["samples"] == 0 and s["labels"]["9"]["split"] == "val"
    assert s["labels"]["5+6"]["samples"] == 2
    assert s["label_names"] == {"1": "one", "5+6": "five+six"}
    text = ST.format_stats(s)
    assert "train: labels=2, tubelets=3" in text and "five+six" in text
    with pytest.raises(ValueError, match="occurs in split"):
        ST.compute_stats(train, {"val": [_pair((1,), 1, 0, 1)]})


def test_plot_label_distribution(tmp_path):
    s = {"splits": {}, "labels": {f"{k}": {"split": "train", "samples": 100 - k} for k in range(1, 60)}}
    s["labels"]["11+74+80"] = {"split": "test", "samples": 7}
    s["labels"]["14+79"] = {"split": "val", "samples": 0}
    out = ST.plot_label_distribution(s, tmp_path / "fig" / "dist.png", label_names={"11+74+80": "sit+listen (x)"})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_ava_and_stats(tmp_path, data_dir, capsys):
    csv = data_dir / "ava" / "ava_val_v2.2_sample.csv"
    out = tmp_path / "root"
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "1j20qq1JyX4.mkv").write_bytes(b"")
    assert main(["data", "ava", str(csv), str(csv), "--out", str(out), "--videos", str(videos)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed row(s) on line(s) 16" in captured.err
    assert "4742 train rows" in captured.out and "videos: 1 found, 1 missing" in captured.out
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["time_ranges"]["2PpxiG0WU18"] == [900, 1800] and list(ds["videos"]) == ["1j20qq1JyX4"]
    assert ava.load_label_split(out / "label_split.json") == ava.load_label_split()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["test"]["pairs"] == 78 and stats["splits"]["val"]["pairs"] == 151
    assert stats["splits"]["train"]["tubelets"] == 910
    assert stats["label_names"]["12+79"] == "stand+talk to (e.g., self, a person, a group)"
    png = tmp_path / "dist.png"
    assert main(["data", "stats", str(out), "--plot", str(png), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert "test : labels=27, labels_with_pairs=18, pairs=78" in printed and png.stat().st_size > 0
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == stats["splits"]


def test_cli_errors(tmp_path, data_dir, capsys):
    csv = data_dir / "ava" / "ava_val_v2.2_sample.csv"
    assert main(["data", "ava", str(csv), str(csv), "--out", str(tmp_path / "r"), "--strict"]) == 2
    assert f"{csv}:16:" in capsys.readouterr().err
    assert main(["data", "ava", str(tmp_path / "none.csv"), str(csv), "--out", str(tmp_path / "r")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    bad_split = tmp_path / "split.json"
    bad_split.write_text("[[[1]]]")
    assert main(["data", "ava", str(csv), str(csv), "--out", str(tmp_path / "r"), "--split-json", str(bad_split)]) == 2
    assert "split.json" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit) as info:
        main(["data", "ucf24", "--help"])
    assert info.value.code == 0 and "--box-format" in capsys.readouterr().out


def test_cli_ucf24(tmp_path, capsys):
    ann = {}
    for c in range(3):
        for g in range(2):
            boxes = np.tile([[10.0, 20, 30, 40]], (50, 1))
            ann[f"C{c}/v_C{c}_g{g}"] = {"numf": 75, "label": c, "annotations": [{"sf": 0, "ef": 50, "label": c, "boxes": boxes}]}
    path = tmp_path / "pyannot.pkl"
    path.write_bytes(pickle.dumps(ann, protocol=2))
    assert main(["data", "ucf24", str(path), "--out", str(tmp_path / "u")]) == 0
    out = capsys.readouterr().out
    assert "2 training tubelets, 2 val pairs, 2 test pairs" in out
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    assert main(["data", "ucf24", str(evil), "--out", str(tmp_path / "e")]) == 2
    assert "refused to load global 'os.system'" in capsys.readouterr().err
