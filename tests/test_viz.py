"""stvr.viz (Figures 6, 7, 8 and training curves) and the `stvr viz` command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from stvr import viz
from stvr.cli import main
from stvr.config import apply_overrides, preset
from stvr.model import STVRModel
from stvr.recurrent import control_point_grid

TINY = ["model.image_size=80", "model.tiny_width=4", "model.backbone_channels=16",
        "model.cell_bottleneck=8", "model.rpn_channels=16", "model.attention_dim=8",
        "model.head_mid_channels=8", "model.head_out_channels=16", "model.max_proposals=8"]


def tiny_config(cell: str = "warp"):
    return apply_overrides(preset("cpu"), TINY + [f"model.cell={cell}"])


def tiny_model(cell: str = "warp", bias=(0.0, 0.0), seed: int = 0) -> STVRModel:
    torch.manual_seed(seed)
    m = STVRModel(tiny_config(cell).model).eval()
    if cell == "warp":
        with torch.no_grad():
            m.cell.offset.bias.copy_(torch.tensor(bias))
    return m


def png_shape(path: Path) -> tuple[int, int]:
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.size > 0
    return img.shape[0], img.shape[1]


def moving_square(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: a textured square moving right over a gradient."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1).astype(np.uint8)
    out = np.repeat(bg[None], n, 0)
    s = size // 4
    for i in range(n):
        x = int(round((size - s) * i / max(n - 1, 1)))
        out[i, size // 3: size // 3 + s, x: x + s] = tex
    return out


# --------------------------------------------------------------------------- Figure 7
def test_warp_sampling_grid_identity_and_spline_exactness():
    pts = np.array([[1.25, 1.25], [1.25, 3.0], [3.0, 2.0]])
    zero = viz.warp_sampling_grid(pts, np.zeros((3, 2)), (5, 5), lines=5, samples=5)
    assert zero.shape == (2, 5, 5, 2)
    rows, cols = np.meshgrid(np.arange(5.0), np.arange(5.0), indexing="ij")
    np.testing.assert_array_equal(zero[0, ..., 0], rows)       # horizontal lines: constant row
    np.testing.assert_array_equal(zero[0, ..., 1], cols)
    np.testing.assert_array_equal(zero[1, ..., 0], cols)       # vertical lines: constant column
    np.testing.assert_array_equal(zero[1, ..., 1], rows)
    # first point moves (1.25, 1.25) -> (2, 2): the grid point (2, 2) now samples (1.25, 1.25)
    off = np.array([[0.75, 0.75], [0.0, 0.0], [0.0, 0.0]])
    g = viz.warp_sampling_grid(pts, off, (5, 5), order=2, num_boundary_points=4, lines=5, samples=5)
    np.testing.assert_allclose(g[0, 2, 2], [1.25, 1.25], atol=1e-9)
    np.testing.assert_allclose(g[1, 2, 2], [1.25, 1.25], atol=1e-9)
    # the boundary points keep zero flow: the corners do not move
    np.testing.assert_allclose(g[0, 0, 0], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(g[0, 4, 4], [4.0, 4.0], atol=1e-9)
    assert np.abs(g - zero).max() > 0.3


def test_collect_warp_offsets_reads_the_cells_displacements():
    m = tiny_model(bias=(0.5, -0.25))
    clips = torch.rand(4, 3, 8, 80, 80) * 2 - 1
    rec = viz.collect_warp_offsets(m, clips, chunk_clips=3)
    assert rec["feature_size"] == (5, 5) and rec["image_size"] == 80
    np.testing.assert_allclose(rec["control_points"], control_point_grid(5, 5, 3).numpy())
    assert rec["offsets"].shape == (4, 9, 2)
    # zero-initialized predictor weights: the displacement is exactly the bias
    np.testing.assert_allclose(rec["offsets"], np.broadcast_to([0.5, -0.25], (4, 9, 2)), atol=1e-6)
    assert rec["warped"].tolist() == [False, True, True, True]
    assert m.record_offsets is False and m.last_offsets == []


def test_collect_warp_offsets_carries_the_state_across_chunks():
    m = tiny_model()
    with torch.no_grad():
        torch.nn.init.normal_(m.cell.offset.weight, std=0.5)
    clips = torch.rand(5, 3, 8, 80, 80) * 2 - 1
    one = viz.collect_warp_offsets(m, clips, chunk_clips=5)["offsets"]
    many = viz.collect_warp_offsets(m, clips, chunk_clips=2)["offsets"]
    assert np.abs(one[1:]).max() > 1e-3                 # the offsets depend on the state: not trivial
    np.testing.assert_allclose(many, one, atol=1e-5)


def test_collect_warp_offsets_needs_a_warp_cell():
    with pytest.raises(ValueError, match="warp cell"):
        viz.collect_warp_offsets(tiny_model("conv"), torch.zeros(2, 3, 8, 80, 80))


def test_plot_warp_grid_size_and_real_displacements(tmp_path):
    frames = list(moving_square(3, 80))
    pts = control_point_grid(5, 5, 3).numpy()
    zero = np.zeros((3, 9, 2))
    moved = zero.copy()
    moved[:, 4] = [0.8, -0.6]                          # the centre point moves
    a = viz.plot_warp_grid(frames, pts, zero, (5, 5), tmp_path / "a.png", panel_size=2.0, dpi=50)
    b = viz.plot_warp_grid(frames, pts, zero, (5, 5), tmp_path / "b.png", panel_size=2.0, dpi=50)
    c = viz.plot_warp_grid(frames, pts, moved, (5, 5), tmp_path / "c.png", panel_size=2.0, dpi=50)
    assert png_shape(a) == (100, 300)                  # 1 row x 3 columns of 2 in at 50 dpi
    ia, ib, ic = (mpimg.imread(str(p)) for p in (a, b, c))
    np.testing.assert_array_equal(ia, ib)               # deterministic
    assert np.abs(ia - ic).max() > 0.2 and (np.abs(ia - ic).max(-1) > 0.1).sum() > 50
    d = viz.plot_warp_grid(frames, pts, zero, (5, 5), tmp_path / "d.png", columns=2, dpi=40)
    assert png_shape(d) == (200, 200)                  # 2 rows x 2 columns of 2.5 in at 40 dpi
    with pytest.raises(ValueError, match="at least one frame"):
        viz.plot_warp_grid([], pts, zero[:0], (5, 5), tmp_path / "e.png")


# --------------------------------------------------------------------------- Figure 8
def test_plot_results(tmp_path):
    q = list(moving_square(2, 64))
    r = list(moving_square(4, 64, seed=1))
    gt = [np.array([[0.1, 0.1, 0.4, 0.5]])] * 3 + [np.zeros((0, 4))]
    methods = {"warp": [[0.1, 0.1, 0.4, 0.5, 0.9], None, [0.2, 0.2, 0.5, 0.6, 0.4], [0, 0, 1, 1, 0.1]],
               "conv": [[0.5, 0.5, 0.9, 0.9, 0.7]] * 4}
    p = viz.plot_results(q, [[0.2, 0.3, 0.5, 0.7]] * 2, r, gt, methods, tmp_path / "fig8.png",
                         title="walk+talk", panel_size=1.5, dpi=60)
    assert png_shape(p) == (int(round((2 * 1.5 + 0.4) * 60)), int(4 * 1.5 * 60))
    with pytest.raises(ValueError, match="ground-truth"):
        viz.plot_results(q, [[0.2, 0.3, 0.5, 0.7]] * 2, r, gt[:2], methods, tmp_path / "x.png")
    with pytest.raises(ValueError, match="method 'conv'"):
        viz.plot_results(q, [[0.2, 0.3, 0.5, 0.7]] * 2, r, gt, {"conv": methods["conv"][:3]}, tmp_path / "x.png")


# --------------------------------------------------------------------------- Figure 6
def _stats():
    return {"splits": {}, "labels": {"1": {"split": "train", "samples": 30}, "2": {"split": "train", "samples": 7},
                                     "3+5": {"split": "val", "samples": 4}, "4": {"split": "test", "samples": 2}},
            "label_names": {"3+5": "spin+blink"}}


def test_label_distribution_wraps_the_stats_figure(tmp_path):
    from stvr.data.stats import plot_label_distribution

    a = viz.plot_label_distribution(_stats(), tmp_path / "a.png")
    b = plot_label_distribution(_stats(), tmp_path / "b.png")
    assert a == tmp_path / "a.png" and a.stat().st_size > 1000
    np.testing.assert_array_equal(mpimg.imread(str(a)), mpimg.imread(str(b)))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "stats.json").write_text(json.dumps(_stats()))
    assert main(["viz", "labels", str(tmp_path / "root"), "--out", str(tmp_path / "c.png")]) == 0
    assert png_shape(tmp_path / "c.png") == png_shape(a)
    assert main(["viz", "labels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d.png")]) == 2


# --------------------------------------------------------------------------- curves
TRAIN_FIELDS = ["step", "lr", "loss", "rpn_objectness", "rpn_box", "box_classifier", "box_reg",
                "grad_norm", "clips_per_second", "seconds"]
VAL_FIELDS = ["step", "mAP@0.3", "mAP@0.5", "mAP@0.7"]


def _write_run(d: Path, steps: int, with_val: bool) -> None:
    d.mkdir(parents=True)
    with (d / "train_log.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRAIN_FIELDS)
        for s in range(10, steps + 1, 10):
            w.writerow([s, 0.01 if s < steps // 2 else 0.001, 3.0 / s ** 0.3, 0.5, 0.4, 0.3, 0.2, 1.0, 5.0, s])
    if with_val:
        with (d / "val_log.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(VAL_FIELDS)
            w.writerow([steps // 2, 0.2, 0.1, 0.05])
            w.writerow([steps, 0.4, 0.3, 0.1])


def test_read_log_and_curves(tmp_path):
    _write_run(tmp_path / "warp", 100, True)
    _write_run(tmp_path / "conv", 60, False)
    logs = viz.load_run_logs(tmp_path / "warp")
    assert logs["train"]["step"].tolist() == list(range(10, 101, 10))
    assert logs["val"]["mAP@0.5"].tolist() == [0.1, 0.3]
    assert viz.load_run_logs(tmp_path / "conv")["val"] is None
    p = viz.plot_training_curves({"warp": logs}, tmp_path / "one.png", figsize=(6, 4), dpi=50)
    assert png_shape(p) == (200, 300)
    assert main(["viz", "curves", str(tmp_path / "warp"), str(tmp_path / "conv"),
                 "--out", str(tmp_path / "two.png")]) == 0
    assert png_shape(tmp_path / "two.png") == (700, 1100)
    assert main(["viz", "curves", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_log.csv").write_text("step,loss\n1,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        viz.read_log(bad / "train_log.csv")


# --------------------------------------------------------------------------- commands on files
def _video(path: Path, seconds: float, fps: int, h: int, w: int, seed: int = 0) -> Path:
    from stvr.data import video

    frames = np.stack([np.asarray(f) for f in moving_square(int(seconds * fps), max(h, w), seed)])
    return video.write_video(path, np.ascontiguousarray(frames[:, :h, :w]), fps)


def test_cli_warp_grid(tmp_path, capsys):
    from stvr.train import save_checkpoint

    clip = _video(tmp_path / "v.mkv", 1.5, 24, 64, 96)
    cfg = tiny_config()
    ckpt = save_checkpoint(tmp_path / "run", "last", tiny_model(bias=(0.6, -0.4)), None, cfg, step=1)
    out = tmp_path / "fig7.png"
    assert main(["viz", "warp-grid", "--checkpoint", str(ckpt), "--video", str(clip), "--clips", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert png_shape(out) == (250, 750)                    # 3 warped clips, 2.5 in panels at 100 dpi
    # the same video through a model without displacements draws a different (straight) grid
    flat = save_checkpoint(tmp_path / "flat", "last", tiny_model(), None, cfg, step=1)
    assert main(["viz", "warp-grid", "--checkpoint", str(flat), "--video", str(clip), "--clips", "3",
                 "--device", "cpu", "--out", str(tmp_path / "flat.png")]) == 0
    assert np.abs(mpimg.imread(str(out)) - mpimg.imread(str(tmp_path / "flat.png"))).max() > 0.2
    assert main(["viz", "warp-grid", "--checkpoint", str(ckpt), "--video", str(clip), "--clips", "8",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "lower --clips" in capsys.readouterr().err
    conv = save_checkpoint(tmp_path / "conv", "last", tiny_model("conv"), None, tiny_config("conv"), step=1)
    assert main(["viz", "warp-grid", "--checkpoint", str(conv), "--video", str(clip),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "warp" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_results_from_files(tmp_path):
    from stvr.data.pairs import save_pairs
    from stvr.predict import save_detections

    root = tmp_path / "root"
    (root / "videos").mkdir(parents=True)
    _video(root / "videos" / "q.mp4", 3, 24, 48, 64, seed=1)
    _video(root / "videos" / "r.mkv", 2, 15, 48, 64, seed=2)
    (root / "dataset.json").write_text(json.dumps({"name": "t", "fps": 24, "videos": {"q": "videos/q.mp4",
                                                   "r": "videos/r.mkv"}, "label_names": {"3+5": "spin+blink"}}))
    pair = {"query": {"id": "q", "frames": [0, 1, 2], "boxes": [[0.1, 0.1, 0.5, 0.5]] * 3, "label": [5, 3]},
            "reference": {"id": "r", "start": 0, "end": 2, "gt": [[[0.2, 0.2, 0.6, 0.6]], []]}}
    save_pairs([pair], root / "pairs" / "test.json")
    # 6 clips; method "warp" has two boxes per clip, the second with the higher score
    warp = [[[[0, 0, 0.3, 0.3, 0.2], [0.1, 0.2, 0.4, 0.5, 0.3 + 0.1 * j]] for j in range(6)]]
    conv = [[[] if j == 5 else [[0.5, 0.5, 0.9, 0.9, 0.5]] for j in range(6)]]
    save_detections(warp, tmp_path / "warp.json")
    save_detections(conv, tmp_path / "conv.json")
    data = viz.load_results_data(load_pair(root), root, {"warp": warp[0], "conv": conv[0]}, max_query=2,
                                 max_reference=3)
    assert [f.shape for f in data["query_frames"]] == [(48, 64, 3)] * 2
    assert len(data["reference_frames"]) == 3 and data["reference_frames"][0].shape == (48, 64, 3)
    # clips round(linspace(0, 5, 3)) = 0, 2, 5 (seconds 0, 0, 1), each at its middle frame
    assert data["reference_titles"] == [f"{(j * 8 + 4) / 24:.2f} s" for j in (0, 2, 5)]
    np.testing.assert_allclose(data["method_boxes"]["warp"], [[0.1, 0.2, 0.4, 0.5, 0.3 + 0.1 * j] for j in (0, 2, 5)])
    assert data["method_boxes"]["conv"][2] is None
    assert [g.shape[0] for g in data["gt_boxes"]] == [1, 1, 0]
    np.testing.assert_allclose(data["query_boxes"], [[0.1, 0.1, 0.5, 0.5]] * 2)
    out = tmp_path / "fig8.png"
    assert main(["viz", "results", "--pairs", str(root / "pairs" / "test.json"), "--detections",
                 f"Warp LSTM={tmp_path / 'warp.json'}", "--detections", f"ConvLSTM={tmp_path / 'conv.json'}",
                 "--out", str(out)]) == 0
    assert png_shape(out) == (440, 1200)                   # 6 reference clips, 2 in panels at 100 dpi
    assert main(["viz", "results", "--pairs", str(root / "pairs" / "test.json"), "--pair", "3",
                 "--detections", f"w={tmp_path / 'warp.json'}", "--out", str(tmp_path / "x.png")]) == 2


def load_pair(root: Path) -> dict:
    from stvr.data.pairs import load_pairs

    return load_pairs(root / "pairs" / "test.json")[0]
