"""Issue 12: never lose a user's file, never blow up, fail early and clearly.

Every test makes its own small bad input and checks the one-line error (exit 2)
or the guarded behaviour; none of them trains or decodes more than a few frames.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from stvr import guards
from stvr import relocalize as R
from stvr.cli import main, run_command
from stvr.config import apply_overrides, config_from_dict, config_to_dict, preset
from stvr.data import video
from stvr.model import STVRModel
from stvr.train import load_checkpoint, save_checkpoint

TINY = ["model.image_size=80", "model.tiny_width=4", "model.backbone_channels=16",
        "model.cell_bottleneck=8", "model.rpn_channels=16", "model.attention_dim=8",
        "model.head_mid_channels=8", "model.head_out_channels=16", "model.max_proposals=8",
        "model.cell=conv", "train.device=cpu"]


def _frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two short videos and a tiny checkpoint (random weights)."""
    d = tmp_path_factory.mktemp("hard")
    video.write_video(d / "q.mp4", _frames(24), 24)
    video.write_video(d / "v.mp4", _frames(24), 24)
    cfg = apply_overrides(preset("cpu"), TINY)
    cfg.data.root = str(d / "no-such-root")
    torch.manual_seed(0)
    model = STVRModel(cfg.model).eval()
    ckpt = save_checkpoint(d / "run", "last", model, None, cfg, step=3)
    return {"dir": d, "q": d / "q.mp4", "v": d / "v.mp4", "ckpt": ckpt, "cfg": cfg, "model": model}


def _reloc(env, *extra):
    return ["relocalize", "--query", str(env["q"]), "--query-box", "0.1,0.1,0.6,0.6",
            "--reference", str(env["v"]), "--checkpoint", str(env["ckpt"]), "--quiet", "--device", "cpu",
            *extra]


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


# ----------------------------------------------------------------------------- data loss
def test_render_onto_the_reference_is_refused(env, capsys):
    before = env["v"].read_bytes()
    rc, err = _run(capsys, _reloc(env, "--out", str(env["dir"] / "a.json"), "--render", str(env["v"])))
    assert rc == 2 and env["v"].read_bytes() == before
    _one_line_error(err, "--render", "same file as the input --reference")
    assert not (env["dir"] / "a.json").exists()  # refused before any work


def test_out_onto_the_query_is_refused(env, capsys):
    before = env["q"].read_bytes()
    # the same file through another spelling of the path
    other = env["dir"] / "." / ".." / env["dir"].name / "q.mp4"
    rc, err = _run(capsys, _reloc(env, "--out", str(other)))
    assert rc == 2 and env["q"].read_bytes() == before
    _one_line_error(err, "--out", "--query")


def test_out_onto_a_hard_link_of_the_checkpoint_is_refused(env, capsys, tmp_path):
    link = tmp_path / "w.json"
    os.link(env["ckpt"], link)
    rc, err = _run(capsys, _reloc(env, "--out", str(link)))
    assert rc == 2 and link.stat().st_size == env["ckpt"].stat().st_size
    _one_line_error(err, "--checkpoint")


def test_render_equal_to_out_is_refused(env, capsys, tmp_path):
    out = tmp_path / "x.mp4"
    rc, err = _run(capsys, _reloc(env, "--out", str(out), "--render", str(out)))
    assert rc == 2 and not out.exists()
    _one_line_error(err, "--out and --render are the same file")


def test_evaluate_out_onto_its_detections_is_refused(tmp_path, capsys):
    pairs, dets = tmp_path / "pairs.json", tmp_path / "dets.json"
    pairs.write_text("[]\n")
    dets.write_text("[]\n")
    rc, err = _run(capsys, ["evaluate", str(pairs), str(dets), "--out", str(dets)])
    assert rc == 2 and dets.read_text() == "[]\n"
    _one_line_error(err, "DETECTIONS")
    rc, err = _run(capsys, ["evaluate", str(pairs), str(dets), "--out", str(pairs)])
    assert rc == 2 and pairs.read_text() == "[]\n"


def _trained_run(path: Path) -> Path:
    path.mkdir()
    for name in ("best.safetensors", "best.json", "last.json", "last.safetensors", "results.json"):
        (path / name).write_text("x")
    return path


def test_train_no_resume_never_empties_a_trained_run_silently(tmp_path, capsys):
    run = _trained_run(tmp_path / "run")
    rc, err = _run(capsys, ["train", "--out", str(run), "--no-resume", "--data", str(tmp_path)])
    assert rc == 2
    _one_line_error(err, "holds a trained model", "--force")
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.safetensors", "best.json", "last.json", "last.safetensors", "results.json"])
    # --force with a bad data root: still refused before anything is deleted
    rc, err = _run(capsys, ["train", "--out", str(run), "--no-resume", "--force", "--data",
                            str(tmp_path / "missing")])
    assert rc == 2 and (run / "results.json").exists() and (run / "best.json").exists()
    _one_line_error(err, "missing")


def test_a_fresh_run_removes_the_stale_results_of_the_old_model(tmp_path):
    from stvr.train import _remove_checkpoints

    run = _trained_run(tmp_path / "run")
    _remove_checkpoints(run)
    assert list(run.iterdir()) == []


def test_data_ava_refuses_to_overwrite_a_dataset_root(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    (root / "dataset.json").write_text("{}")
    csv = tmp_path / "a.csv"
    csv.write_text("abcdefghijk,0902,0.1,0.1,0.5,0.5,12,0\n")
    rc, err = _run(capsys, ["data", "ava", str(csv), str(csv), "--out", str(root)])
    assert rc == 2 and "--force" in err and (root / "dataset.json").read_text() == "{}"


# ----------------------------------------------------------------------------- config ranges
@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=-2", "train.batch_size must be > 0"),
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.lr=nan", "train.lr must be > 0"),
    ("model.rpn_fg_iou=1.5", "model.rpn_fg_iou must be in (0, 1]"),
    ("data.flip_probability=2", "data.flip_probability must be in [0, 1]"),
    ("model.cell=lstm", "model.cell must be one of"),
    ("model.backbone=resnet", "model.backbone must be one of"),
    ("model.head=mlp", "model.head must be one of"),
    ("model.image_size=0", "model.image_size must be > 0"),
    ("model.action_probe_hidden=-8", "model.action_probe_hidden must be >= 0"),
    ("model.action_probe_seconds=-1", "model.action_probe_seconds must be >= 0"),
    ("train.batch_size=two", "train.batch_size: cannot parse 'two'"),
    ("train.nope=1", "unknown field 'nope'"),
])
def test_config_ranges_are_checked_when_built(override, needle, tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        apply_overrides(preset("cpu"), [override])
    assert needle in str(info.value)
    rc, err = _run(capsys, ["train", "--out", str(tmp_path / "run"), "--set", override])
    assert rc == 2
    _one_line_error(err, needle)
    assert not (tmp_path / "run").exists()


def test_config_with_a_wrongly_typed_field_is_refused():
    d = config_to_dict(preset("cpu"))
    d["train"]["batch_size"] = "4"
    with pytest.raises(ValueError, match=r"train.batch_size must be an integer"):
        config_from_dict(d)
    d = config_to_dict(preset("cpu"))
    d["model"]["anchor_scales"] = "big"
    with pytest.raises(ValueError, match=r"model.anchor_scales must be a list of numbers"):
        config_from_dict(d)


@pytest.mark.parametrize("option,value,needle", [
    ("--score-threshold", "nan", "--score-threshold must be in [0, 1]"),
    ("--score-threshold", "1.5", "--score-threshold must be in [0, 1]"),
    ("--link-iou", "2", "--link-iou must be in (0, 1]"),
    ("--link-iou", "0", "--link-iou must be in (0, 1]"),
    ("--top-k", "-1", "--top-k must be >= 0"),
    ("--min-length", "0", "--min-length must be >= 1"),
    ("--max-gap", "-1", "--max-gap must be >= 0"),
])
def test_relocalize_link_options_are_checked(env, capsys, option, value, needle):
    rc, err = _run(capsys, _reloc(env, "--out", str(env["dir"] / "never.json"), option, value))
    assert rc == 2
    _one_line_error(err, needle)
    assert not (env["dir"] / "never.json").exists()


# ----------------------------------------------------------------------------- fail early
def test_unsupported_render_container_fails_before_the_work(env, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(R, "relocalize", lambda *a, **k: calls.append(1))
    rc, err = _run(capsys, _reloc(env, "--out", str(env["dir"] / "b.json"), "--render",
                                  str(env["dir"] / "b.gif")))
    assert rc == 2 and calls == [] and not (env["dir"] / "b.json").exists()
    _one_line_error(err, "--render", "unsupported extension '.gif'")


def test_out_that_is_a_directory_or_under_a_file_fails_early(env, capsys, tmp_path):
    rc, err = _run(capsys, _reloc(env, "--out", str(tmp_path)))
    assert rc == 2
    _one_line_error(err, "is a directory")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, err = _run(capsys, _reloc(env, "--out", str(blocker / "sub" / "t.json")))
    assert rc == 2 and blocker.read_text() == "x"
    _one_line_error(err, "is a file, not a folder")
    rc, err = _run(capsys, ["train", "--out", str(blocker), "--data", str(tmp_path)])
    assert rc == 2
    _one_line_error(err, "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_folder_fails_early(env, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, err = _run(capsys, _reloc(env, "--out", str(locked / "t.json")))
        assert rc == 2
        _one_line_error(err, "not writable")
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- one-line errors
def test_corrupt_checkpoint_is_a_one_line_error(env, capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(2000))
    (tmp_path / "bad.json").write_text(Path(str(env["ckpt"]).replace(".safetensors", ".json")).read_text())
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_checkpoint(bad)
    argv = _reloc(env, "--out", str(tmp_path / "t.json"))
    argv[argv.index("--checkpoint") + 1] = str(bad)
    rc, err = _run(capsys, argv)
    assert rc == 2
    _one_line_error(err, "bad.safetensors", "not a readable safetensors checkpoint")


def test_checkpoint_config_with_a_wrong_type_names_the_file(env, tmp_path):
    ckpt = save_checkpoint(tmp_path, "last", env["model"], None, env["cfg"], step=1)
    state = json.loads((tmp_path / "last.json").read_text())
    state["config"]["model"]["image_size"] = "eighty"
    (tmp_path / "last.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"last.json: bad checkpoint config: model.image_size"):
        load_checkpoint(ckpt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(env, capsys, tmp_path):
    argv = _reloc(env, "--out", str(tmp_path / "t.json"))
    argv[argv.index("--device") + 1] = "cuda"
    rc, err = _run(capsys, argv)
    assert rc == 2
    _one_line_error(err, "no CUDA GPU", "--device cpu")
    rc, err = _run(capsys, ["train", "--out", str(tmp_path / "run"), "--device", "cuda",
                            "--data", str(tmp_path)])
    assert rc == 2 and "Traceback" not in err


def test_train_and_predict_with_a_missing_or_empty_data_root(env, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (tmp_path / "missing", empty):
        rc, err = _run(capsys, ["train", "--out", str(tmp_path / "run"), "--data", str(root)])
        assert rc == 2
        _one_line_error(err, str(root))
        rc, err = _run(capsys, ["predict", "--checkpoint", str(env["ckpt"]), "--data", str(root),
                                "--out", str(tmp_path / "d.json"), "--device", "cpu"])
        assert rc == 2
        _one_line_error(err, str(root))
    assert not (tmp_path / "run").exists()


def _root_with_missing_videos(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "pairs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "ava", "fps": 24, "videos": {"a": "videos/a.mp4", "b": "videos/b.mp4"},
        "time_ranges": {"a": [0, 5], "b": [0, 5]}, "train_videos": ["a"], "val_videos": ["b"]}))
    pair = {"query": {"id": "a", "frames": [1], "boxes": [[0.1, 0.1, 0.5, 0.5]], "label": [3]},
            "reference": {"id": "b", "start": 1, "end": 2, "gt": [[[0.2, 0.2, 0.6, 0.6]]]}}
    (root / "pairs" / "test.json").write_text(json.dumps([pair, pair]))
    return root


def test_predict_unknown_split_lists_the_splits(env, capsys, tmp_path):
    root = _root_with_missing_videos(tmp_path)
    rc, err = _run(capsys, ["predict", "--checkpoint", str(env["ckpt"]), "--data", str(root),
                            "--split", "tset", "--out", str(tmp_path / "d.json"), "--device", "cpu"])
    assert rc == 2
    _one_line_error(err, "--split 'tset'", "splits of", "test")


def test_predict_fails_when_every_pair_fails_to_load(env, capsys, tmp_path):
    root = _root_with_missing_videos(tmp_path)
    out = tmp_path / "d.json"
    rc, err = _run(capsys, ["predict", "--checkpoint", str(env["ckpt"]), "--data", str(root),
                            "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 2 and not out.exists()
    assert "2 of 2 pairs could not be loaded" in err and "Traceback" not in err


def test_data_ava_out_is_a_file(tmp_path, capsys):
    csv = tmp_path / "a.csv"
    csv.write_text("abcdefghijk,0902,0.1,0.1,0.5,0.5,12,0\n")
    target = tmp_path / "file"
    target.write_text("keep")
    rc, err = _run(capsys, ["data", "ava", str(csv), str(csv), "--out", str(target)])
    assert rc == 2 and target.read_text() == "keep"
    _one_line_error(err, "is a file")


def test_non_utf8_annotation_names_file_and_line(tmp_path, capsys):
    from stvr.data.ava import read_annotations

    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"abcdefghijk,0902,0.1,0.1,0.5,0.5,12,0\n" * 3 + "caf\xe9,0902\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv:4: not UTF-8"):
        read_annotations(csv, strict=False)
    rc, err = _run(capsys, ["data", "ava", str(csv), str(csv), "--out", str(tmp_path / "root")])
    assert rc == 2 and not (tmp_path / "root").exists()
    _one_line_error(err, "latin1.csv:4")


def test_fifo_and_directory_as_video_say_what_they_are(env, capsys, tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    rc, err = _run(capsys, _reloc(env, "--out", str(tmp_path / "t.json"))[:2] + [str(fifo)]
                   + _reloc(env, "--out", str(tmp_path / "t.json"))[3:])
    assert rc == 2
    _one_line_error(err, "named pipe (FIFO)")
    argv = _reloc(env, "--out", str(tmp_path / "t.json"))
    argv[argv.index("--reference") + 1] = str(tmp_path)
    rc, err = _run(capsys, argv)
    assert rc == 2
    _one_line_error(err, "is a directory")
    with pytest.raises(video.VideoError, match="named pipe"):  # never opened (it would block)
        video.probe(fifo)


# ----------------------------------------------------------------------------- results that look fine
def _ava_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_data_ava_empty_or_all_malformed_csv_fails(tmp_path, capsys):
    good = _ava_csv(tmp_path / "good.csv", "abcdefghijk,0902,0.1,0.1,0.5,0.5,12,0\n")
    empty = _ava_csv(tmp_path / "empty.csv", "")
    junk = _ava_csv(tmp_path / "junk.csv", "hello,world\n1,2,3\n")
    for bad in (empty, junk):
        out = tmp_path / f"root_{bad.stem}"
        rc, err = _run(capsys, ["data", "ava", str(good), str(bad), "--out", str(out)])
        assert rc == 2 and not out.exists()
        assert f"{bad}: no valid annotation rows" in err


def test_data_ava_failure_partway_leaves_no_half_written_root(tmp_path, capsys, monkeypatch):
    good = _ava_csv(tmp_path / "good.csv", "abcdefghijk,0902,0.1,0.1,0.5,0.5,12,0\n")
    out = tmp_path / "root"
    rc, err = _run(capsys, ["data", "ava", str(good), str(good), "--out", str(out),
                            "--videos", str(tmp_path / "no-videos")])
    assert rc == 2 and not out.exists() and "no-videos" in err
    import stvr.data.pairs as pairs_mod

    def boom(*a, **k):
        raise ValueError("simulated failure while building pairs")

    monkeypatch.setattr(pairs_mod, "build_dataset_root", boom)
    rc, err = _run(capsys, ["data", "ava", str(good), str(good), "--out", str(out)])
    assert rc == 2 and "simulated failure" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv"]  # no root, no hidden staging folder


def test_sub_pixel_query_box_is_refused_with_the_unit_rule(env, capsys, tmp_path):
    rc, err = _run(capsys, ["relocalize", "--query", str(env["q"]), "--query-box", "1.2,1.3,1.5,1.9",
                            "--reference", str(env["v"]), "--checkpoint", str(env["ckpt"]), "--quiet",
                            "--device", "cpu", "--out", str(tmp_path / "t.json")])
    assert rc == 2
    _one_line_error(err, "read as pixels because a coordinate exceeds 1", "--box-units px", "--box-units norm")
    np.testing.assert_allclose(R.normalize_boxes([0.2, 0.3, 0.5, 0.9], 64, 48, units="norm"),
                               [[0.2, 0.3, 0.5, 0.9]])
    np.testing.assert_allclose(R.normalize_boxes([8, 6, 32, 24], 64, 48, units="px"),
                               [[0.125, 0.125, 0.5, 0.5]])
    with pytest.raises(ValueError, match="0.6"):  # 0.01 x 0.01 normalized on 64x48: under a pixel
        R.normalize_boxes([0.5, 0.5, 0.51, 0.51], 64, 48)


def _offset_avi(path: Path, n: int) -> Path:
    """An AVI whose frames do not start at timestamp 0 / have a gap (as Megamind.avi)."""
    import av

    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=24)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    s.time_base = Fraction(1, 24)
    for i, img in enumerate(_frames(n)):
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts = i + 1
        for p in s.encode(f):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def test_render_keeps_the_reference_frame_count(tmp_path):
    import av

    src = _offset_avi(tmp_path / "m.avi", 30)
    with av.open(str(src)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    tubelet = {"rank": 0, "score": 0.9, "frames": [{"frame": k, "box": [0.1, 0.1, 0.5, 0.5]} for k in range(30)]}
    out = R.render_tubelets(src, {"tubelets": [tubelet]}, tmp_path / "r.mp4", progress=False)
    with av.open(str(out)) as c:
        rendered = sum(1 for _ in c.decode(video=0))
    assert rendered == decoded == 30


def test_checkpoint_records_its_training_data_and_relocalize_warns(env, tmp_path):
    root = tmp_path / "synth"
    (root / "videos").mkdir(parents=True)
    video.write_video(root / "videos" / "s0.mp4", _frames(6, 64, 64), 24)
    (root / "dataset.json").write_text(json.dumps({"name": "synthetic", "videos": {"s0": "videos/s0.mp4"},
                                                   "train_videos": ["s0"]}))
    cfg = apply_overrides(preset("cpu"), TINY)
    cfg.data.root = str(root)
    save_checkpoint(tmp_path / "run", "last", env["model"], None, cfg, step=1)
    _, _, state = load_checkpoint(tmp_path / "run")
    assert state["dataset"]["name"] == "synthetic"
    assert state["dataset"]["video"] == {"width": 64, "height": 64, "fps": 24.0}
    real = {"path": "road.mp4", "width": 320, "height": 240}
    (w,) = R.training_data_warnings(state["dataset"], real)
    assert "synthetic benchmark" in w and "road.mp4" in w
    assert R.training_data_warnings(state["dataset"], {"path": "s.mp4", "width": 64, "height": 64}) == []
    flat = [np.array([[0.1, 0.1, 0.5, 0.5, 0.13 + 0.005 * k]]) for k in range(12)]
    (u,) = R.score_warnings(flat)
    assert "near-uniform" in u and "0.13-0.18" in u
    assert R.score_warnings([np.array([[0, 0, 1, 1, 0.1]]), *flat[:9], np.array([[0, 0, 1, 1, 0.9]])]) == []


# ----------------------------------------------------------------------------- interrupted runs
def test_ctrl_c_ends_with_one_line(capsys):
    def func(args):
        raise KeyboardInterrupt

    rc = run_command(argparse.Namespace(command="relocalize", func=func))
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err


def test_sigterm_during_render_removes_the_temporary_video(tmp_path):
    out = tmp_path / "render.mp4"
    script = textwrap.dedent(f"""
        import argparse, sys, time
        import numpy as np
        from stvr.cli import run_command
        from stvr.data.video import VideoWriter

        def func(args):
            with VideoWriter({str(out)!r}, 24, 64, 48) as w:
                w.write(np.zeros((2, 48, 64, 3), np.uint8))
                print("writing", flush=True)
                time.sleep(30)
            return 0

        sys.exit(run_command(argparse.Namespace(command="relocalize", func=func)))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp.mp4") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its hidden temporary file


def test_failed_json_write_leaves_no_temporary_file(tmp_path):
    from stvr.utils import atomic_write

    target = tmp_path / "out.json"
    target.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        atomic_write(target, "{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_outputs_get_the_users_file_mode(tmp_path):
    from stvr.utils import atomic_write

    old = os.umask(0o022)
    guards._MODE = None
    try:
        vid = video.write_video(tmp_path / "v.mp4", _frames(3), 24)
        js = atomic_write(tmp_path / "a.json", "{}\n")
        assert (Path(vid).stat().st_mode & 0o777) == 0o644
        assert (js.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)
        guards._MODE = None


def test_data_ucf24_out_is_a_file(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    target = tmp_path / "file"
    target.write_text("keep")
    rc, err = _run(capsys, ["data", "ucf24", str(ann), "--out", str(target)])
    assert rc == 2 and target.read_text() == "keep"
    _one_line_error(err, "is a file")
