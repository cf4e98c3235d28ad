"""stvr.utils: atomic writes and device resolution (one home for each)."""

from __future__ import annotations

import json

import pytest
import torch

from stvr.utils import atomic_open, atomic_write, resolve_device, write_json


def test_write_json_is_atomic_compact_and_creates_folders(tmp_path):
    p = write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert p.read_text() == '{"x":[1,2]}\n'
    write_json(p, {"x": 1}, indent=1)
    assert json.loads(p.read_text()) == {"x": 1} and p.read_text().startswith("{\n")
    assert write_json(p, {"p": tmp_path}, default=str).read_text() == json.dumps({"p": str(tmp_path)},
                                                                                 separators=(",", ":")) + "\n"
    assert sorted(f.name for f in p.parent.iterdir()) == ["b.json"]      # no temp file left


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    p = atomic_write(tmp_path / "f.bin", b"old", fsync=True)
    with pytest.raises(RuntimeError):
        with atomic_open(p, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(TypeError):
        write_json(tmp_path / "g.json", {"x": object()})
    assert [f.name for f in tmp_path.iterdir()] == ["f.bin"]


def test_resolve_device():
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == auto and resolve_device(None).type == auto
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))


def test_files_a_user_keeps_survive_an_interrupted_rewrite(tmp_path, monkeypatch):
    """Detections, AVA CSVs, training logs and figures are replaced atomically: when the final
    rename fails (a kill, a full disk) the older file is still whole and no temporary file stays."""
    import csv

    import stvr.utils
    from stvr.data.ava import AvaRow, read_annotations, write_annotations
    from stvr.predict import load_detections, save_detections
    from stvr.train import _truncate_log
    from stvr.viz import _figure, _save

    dets = tmp_path / "dets.json"
    save_detections([[[[0.1, 0.2, 0.3, 0.4, 0.9]]]], dets)
    rows = [AvaRow("vid", 902, (0.1, 0.2, 0.3, 0.4), 12, 0)]
    ann = tmp_path / "a.csv"
    write_annotations(rows, ann)
    log = tmp_path / "train_log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n")
    fig = tmp_path / "f.png"
    _save(_figure((2, 2)), fig, dpi=20)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stvr.utils.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_detections([[[[0.5, 0.5, 0.6, 0.6, 0.1]]]], dets)
    with pytest.raises(OSError):
        write_annotations(rows * 2, ann)
    with pytest.raises(OSError):
        _truncate_log(log, 1)
    with pytest.raises(OSError):
        _save(_figure((3, 3)), fig, dpi=20)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    # and the rewrites themselves are right
    assert load_detections(dets) == [[[[0.1, 0.2, 0.3, 0.4, 0.9]]]]
    assert [(r.video_id, r.second, r.box, r.action_id) for r in read_annotations(ann)] == \
        [("vid", 902, (0.1, 0.2, 0.3, 0.4), 12)]
    _truncate_log(log, 2)
    assert list(csv.reader(log.open(newline=""))) == [["step", "loss"], ["1", "0.5"], ["2", "0.4"]]
