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
