"""stvr.relocalize and `stvr relocalize`: user videos in, tubelets (JSON, rendered video) out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stvr import relocalize as R
from stvr.cli import main
from stvr.config import apply_overrides, preset
from stvr.data import video
from stvr.model import STVRModel
from stvr.train import save_checkpoint
from stvr.tubes import Tube

TINY = ["model.image_size=80", "model.tiny_width=4", "model.backbone_channels=16",
        "model.cell_bottleneck=8", "model.rpn_channels=16", "model.attention_dim=8",
        "model.head_mid_channels=8", "model.head_out_channels=16", "model.max_proposals=8"]


def tiny_model(cell: str = "warp", seed: int = 0) -> tuple[STVRModel, object]:
    cfg = apply_overrides(preset("cpu"), TINY + [f"model.cell={cell}"])
    torch.manual_seed(seed)
    model = STVRModel(cfg.model).eval()
    if cell == "warp":  # make the warp do something: non-zero control-point displacements
        with torch.no_grad():
            torch.nn.init.normal_(model.cell.offset.weight, std=0.05)
            model.cell.offset.bias.copy_(torch.tensor([0.3, -0.2]))
    return model, cfg


def moving_square(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, 3]: a textured square moving left to right over a colour gradient."""
    rng = np.random.default_rng(seed)
    s = min(height, width) // 3
    tex = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 80)], -1).astype(np.uint8)
    out = np.repeat(bg[None], n, 0)
    for i in range(n):
        x = int(round((width - s) * i / max(n - 1, 1)))
        out[i, height // 3: height // 3 + s, x: x + s] = tex
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Query and reference videos in two containers and two frame rates, and a checkpoint."""
    d = tmp_path_factory.mktemp("reloc")
    files = {
        "query_mp4": (d / "query.mp4", 30, 2.0, 64, 96),
        "ref_mkv": (d / "reference.mkv", 15, 3.0, 64, 80),
        "query_avi": (d / "query.avi", 15, 2.0, 48, 64),
        "ref_mp4": (d / "reference.mp4", 30, 2.5, 64, 64),
    }
    for i, (path, fps, seconds, h, w) in enumerate(files.values()):
        video.write_video(path, moving_square(int(round(fps * seconds)), h, w, seed=i), fps)
    model, cfg = tiny_model()
    ckpt = save_checkpoint(d / "run", "last", model, None, cfg, step=7)
    out = {k: v[0] for k, v in files.items()}
    out["checkpoint"] = ckpt
    out["dir"] = d
    return out


def _check_result(result: dict, query: Path, reference: Path, top_k: int) -> None:
    qi, ri = video.probe(query), video.probe(reference)
    assert set(result) >= {"query", "reference", "clips_per_second", "tubelets", "detections"}
    assert result["clips_per_second"] == 3 and result["clip_frames"] == 8 and result["model_fps"] == 24
    ref = result["reference"]
    assert ref["path"] == str(reference)
    assert ref["fps"] == pytest.approx(ri.fps) and (ref["width"], ref["height"]) == (ri.width, ri.height)
    assert ref["duration"] == pytest.approx(ri.duration) and ref["start"] == 0.0
    assert ref["end"] == pytest.approx(ri.duration)
    assert ref["num_clips"] == math.floor(ri.duration * 3 + 1e-6) == len(result["detections"])
    q = result["query"]
    assert (q["width"], q["height"], q["fps"]) == (qi.width, qi.height, pytest.approx(qi.fps))
    assert q["num_clips"] == len(q["boxes"]) == math.floor((q["end"] - q["start"]) * 3 + 1e-6)
    for b in q["boxes"]:
        np.testing.assert_allclose(b["box_pixels"], np.multiply(b["box"], [qi.width, qi.height] * 2), atol=0.01)
    for clip in result["detections"]:
        for det in clip:
            assert len(det) == 5 and 0 <= det[0] <= det[2] <= 1 and 0 <= det[1] <= det[3] <= 1
    tls = result["tubelets"]
    assert 1 <= len(tls) <= top_k
    assert [t["score"] for t in tls] == sorted((t["score"] for t in tls), reverse=True)
    scale = np.array([ri.width, ri.height, ri.width, ri.height], dtype=float)
    for rank, t in enumerate(tls):
        assert t["rank"] == rank and 0.0 <= t["score"] <= 1.0
        assert 0 <= t["start_time"] < t["end_time"] <= ri.duration + 1e-6
        assert t["start_time"] == pytest.approx(t["start_clip"] / 3) and t["end_time"] == pytest.approx(t["end_clip"] / 3)
        assert t["start_frame"] == math.ceil(t["start_time"] * ri.fps - 1e-6)
        assert t["end_frame"] == min(math.ceil(t["end_time"] * ri.fps - 1e-6), ri.num_frames)
        frames = t["frames"]
        assert [f["frame"] for f in frames] == list(range(t["start_frame"], t["end_frame"]))
        for f in frames:
            assert f["time"] == pytest.approx(f["frame"] / ri.fps)
            x1, y1, x2, y2 = f["box"]
            assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
            np.testing.assert_allclose(f["box_pixels"], np.multiply(f["box"], scale), atol=0.01)
        assert len(t["clip_scores"]) == t["end_clip"] - t["start_clip"]


@pytest.mark.parametrize("query_key,ref_key,box", [
    ("query_mp4", "ref_mkv", "20,16,60,48"),      # pixels (96 x 64 query), 30 fps -> 15 fps reference
    ("query_avi", "ref_mp4", "0.1,0.2,0.6,0.8"),  # normalized, 15 fps -> 30 fps reference
])
def test_cli_end_to_end(media, tmp_path, capsys, query_key, ref_key, box):
    query, reference = media[query_key], media[ref_key]
    out, rendered = tmp_path / "tubelets.json", tmp_path / "rendered.mp4"
    rc = main(["relocalize", "--query", str(query), "--query-box", box, "--query-box-time", "0.5",
               "--reference", str(reference), "--checkpoint", str(media["checkpoint"]), "--out", str(out),
               "--render", str(rendered), "--top-k", "3", "--min-length", "1", "--detections",
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    _check_result(result, query, reference, top_k=3)
    assert result["checkpoint"]["step"] == 7
    qi = video.probe(query)
    expected = R.parse_box(box)
    if max(expected) > 1:
        expected = np.divide(expected, [qi.width, qi.height] * 2)
    for b in result["query"]["boxes"]:                            # one box held for the whole span
        np.testing.assert_allclose(b["box"], expected, atol=1e-6)
    # the rendered video has the reference's frame rate, size, frame count and duration
    ri, vi = video.probe(reference), video.probe(rendered)
    assert vi.fps == pytest.approx(ri.fps, rel=1e-3)
    assert (vi.width, vi.height) == (ri.width, ri.height)
    assert vi.num_frames == ri.num_frames
    assert vi.duration == pytest.approx(ri.duration, abs=0.5 / ri.fps)
    assert "tubelet" in capsys.readouterr().out


def test_spans_and_box_file(media, tmp_path):
    """A query span with a box per second from a CSV (pixels), a reference span."""
    model, _ = tiny_model("conv")
    query, reference = media["query_mp4"], media["ref_mkv"]
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("time,x1,y1,x2,y2\n0,10,10,40,40\n1,40,10,80,50\n")
    result = R.relocalize(model, query, boxes, reference, query_start=0.5, query_end=2.0,
                          reference_start=1.0, reference_end=3.0, device="cpu", progress=False,
                          min_length=1, include_detections=True)
    q = result["query"]
    assert (q["start"], q["end"], q["num_clips"]) == (0.5, 2.0, 4)
    # clips at 0.5, 0.83 (second 0) and 1.17, 1.5 (second 1) take their second's box
    np.testing.assert_allclose([b["box_pixels"] for b in q["boxes"]],
                               [[10, 10, 40, 40]] * 2 + [[40, 10, 80, 50]] * 2, atol=0.01)
    ref = result["reference"]
    assert (ref["start"], ref["end"], ref["num_clips"]) == (1.0, 3.0, 6)
    for t in result["tubelets"]:
        assert t["start_time"] >= 1.0 - 1e-9 and t["start_frame"] >= 15
    json_boxes = tmp_path / "boxes.json"
    json_boxes.write_text(json.dumps({"units": "normalized", "boxes": [{"time": 1.0, "box": [0.5, 0.5, 1, 1]},
                                                                       {"time": 0.0, "box": [0, 0, 0.5, 0.5]}]}))
    clips, qboxes, info = R.load_query(query, json_boxes, 80, query_start=0.0, query_end=2.0)
    assert clips.shape == (6, 3, 8, 80, 80) and clips.dtype == torch.float32
    assert float(clips.min()) >= -1.0 and float(clips.max()) <= 1.0
    np.testing.assert_allclose(qboxes.numpy(), [[0, 0, 0.5, 0.5]] * 3 + [[0.5, 0.5, 1, 1]] * 3)


def test_streaming_matches_one_pass(media):
    """Chunk-by-chunk detection with the carried state equals one pass over the whole reference."""
    frames = video.read_frames(media["ref_mkv"], fps=24, size=80)
    clips = video.frames_to_clips(np.asarray(frames), clip_frames=8).double()  # float64: exact comparison
    assert clips.shape[0] == 9
    for cell in ("warp", "flow"):
        model = tiny_model(cell)[0].double()
        qclips = clips[:3]
        qf = model.encode_query(qclips, torch.tensor([[0.1, 0.3, 0.5, 0.7]], dtype=torch.float64).repeat(3, 1))
        whole, _ = model.detect_clips(qf, clips)
        state, parts = None, []
        for chunk in clips.split(3):    # chunks hold whole groups of model.match_clips (3)
            dets, state = model.detect_clips(qf, chunk, state=state)
            parts.extend(dets)
        assert len(parts) == len(whole) == 9
        assert sum(len(d) for d in whole) > 0
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        # without the state the later chunks would differ (the test can fail)
        fresh, _ = model.detect_clips(qf, clips[2:4])
        assert any(a.shape != b.shape or not torch.allclose(a, b, atol=1e-4) for a, b in zip(fresh, whole[2:4]))


def test_relocalize_streams_in_chunks(media):
    model = tiny_model()[0].double()                      # float64: chunked and one pass agree exactly
    calls = []
    original = model.detect_clips

    def spy(qf, clips, state=None, **kw):
        calls.append(int(clips.shape[0]))
        return original(qf, clips, state=state, **kw)

    model.detect_clips = spy
    kwargs = dict(device="cpu", progress=False, min_length=1, include_detections=True)
    chunked = R.relocalize(model, media["query_mp4"], "0.1,0.1,0.5,0.5", media["ref_mp4"], chunk_clips=2, **kwargs)
    # 2.5 s at 3 clips/s = 7 clips; 2 rounds up to the 3 clips of model.match_clips
    assert model.cfg.match_clips == 3 and calls == [3, 3, 1]
    calls.clear()
    single = R.relocalize(model, media["query_mp4"], "0.1,0.1,0.5,0.5", media["ref_mp4"], chunk_clips=50, **kwargs)
    assert calls == [7]
    assert len(chunked["detections"]) == len(single["detections"]) == 7
    for a, b in zip(chunked["detections"], single["detections"]):
        np.testing.assert_allclose(np.reshape(a, (-1, 5)), np.reshape(b, (-1, 5)), atol=1e-9)
    assert sum(len(c) for c in single["detections"]) > 0
    assert chunked["tubelets"] == single["tubelets"] and len(single["tubelets"]) > 0


def test_tubes_to_tubelets_frames_and_interpolation():
    ref = {"fps": 30.0, "width": 100, "height": 50, "start": 1.0, "duration": 10.0}
    tube = Tube(3, [[0.0, 0.0, 0.2, 0.2], [0.4, 0.2, 0.6, 0.4]], [0.8, 0.6])
    (t,) = R.tubes_to_tubelets([tube], ref)
    assert t["start_time"] == pytest.approx(2.0) and t["end_time"] == pytest.approx(1 + 5 / 3)
    assert (t["start_frame"], t["end_frame"]) == (60, 80) and t["score"] == pytest.approx(0.7)
    frames = np.array([f["frame"] for f in t["frames"]])
    boxes = np.array([f["box"] for f in t["frames"]])
    # clip centres at 24-fps frames 3.5 and 11.5 of the tube = times 2 + 3.5/24 and 2 + 11.5/24
    c0, c1 = 2 + 3.5 / 24, 2 + 11.5 / 24
    times = frames / 30.0
    frac = np.clip((times - c0) / (c1 - c0), 0, 1)
    expect = (1 - frac)[:, None] * tube.boxes[0] + frac[:, None] * tube.boxes[1]
    np.testing.assert_allclose(boxes, expect, atol=1e-6)
    np.testing.assert_allclose([f["box_pixels"] for f in t["frames"]], expect * [100, 50, 100, 50], atol=0.01)
    # at 24 fps the frames are exactly Tube.frame_boxes
    (t24,) = R.tubes_to_tubelets([tube], {**ref, "fps": 24.0})
    assert (t24["start_frame"], t24["end_frame"]) == (48, 64)
    np.testing.assert_allclose([f["box"] for f in t24["frames"]], tube.frame_boxes(8), atol=1e-6)
    # frames are clamped to the video's length
    (short,) = R.tubes_to_tubelets([tube], {**ref, "duration": 2.5})
    assert short["end_frame"] == 75 and short["frames"][-1]["frame"] == 74


def test_box_parsing_and_validation(tmp_path):
    assert R.parse_box("1, 2,3,4") == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="4 numbers"):
        R.parse_box("1,2,3")
    np.testing.assert_allclose(R.normalize_boxes([10, 5, 50, 25], 100, 50), [[0.1, 0.1, 0.5, 0.5]])
    np.testing.assert_allclose(R.normalize_boxes([0.5, 0.5, 10, 10], 100, 50, units="pixels"),
                               [[0.005, 0.01, 0.1, 0.2]])
    with pytest.raises(ValueError, match="--box-units px"):  # sub-pixel boxes are refused (issue 12)
        R.normalize_boxes([0.5, 0.5, 1, 1], 100, 50, units="pixels")
    with pytest.raises(ValueError, match="outside the 100x50 frame"):
        R.normalize_boxes([10, 5, 150, 25], 100, 50)
    with pytest.raises(ValueError, match="x1 < x2"):
        R.normalize_boxes([0.5, 0.1, 0.4, 0.3], 100, 50)
    np.testing.assert_allclose(R.query_clip_boxes([(1.0, [0, 0, 1, 1]), (2.0, [0, 0, 0.5, 0.5])],
                                                  np.array([0.2, 1.0, 1.9, 2.0, 5.0])),
                               [[0, 0, 1, 1]] * 3 + [[0, 0, 0.5, 0.5]] * 2)
    csv_file = tmp_path / "b.csv"
    csv_file.write_text("# comment\n2,1,1,5,5\n1,0,0,4,4\n")
    assert R.load_box_file(csv_file) == ([(1.0, [0, 0, 4, 4]), (2.0, [1, 1, 5, 5])], "auto")
    csv_file.write_text("0,1,1,5\n")
    with pytest.raises(ValueError, match="line 1"):
        R.load_box_file(csv_file)
    with pytest.raises(FileNotFoundError):
        R.load_box_file(tmp_path / "none.json")
    assert R.check_span(None, None, 3.0, "query", "q.mp4") == (0.0, 3.0)
    with pytest.raises(ValueError, match="outside"):
        R.check_span(1.0, 4.0, 3.0, "query", "q.mp4")
    with pytest.raises(ValueError, match="shorter than one clip"):
        R.check_span(1.0, 1.2, 3.0, "query", "q.mp4")


def test_cli_set_changes_only_the_postprocessing(media, tmp_path, capsys):
    """``--set model.det_*=...`` applies to the checkpoint's post-processing: here at most one
    detection per clip, each the top detection of the unchanged run."""
    base = ["relocalize", "--query", str(media["query_mp4"]), "--query-box", "0.2,0.2,0.6,0.8",
            "--reference", str(media["ref_mkv"]), "--checkpoint", str(media["checkpoint"]),
            "--min-length", "1", "--detections", "--device", "cpu", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "all.json")]) == 0
    assert main(base + ["--out", str(tmp_path / "one.json"), "--set", "model.det_per_clip=1"]) == 0
    capsys.readouterr()
    full = json.loads((tmp_path / "all.json").read_text())["detections"]
    one = json.loads((tmp_path / "one.json").read_text())["detections"]
    assert len(one) == len(full) and any(len(c) > 1 for c in full)
    assert [c[:1] for c in one] == [c[:1] for c in full]


@pytest.mark.parametrize("args,message", [
    (["--query", "{dir}/missing.mp4", "--query-box", "0.1,0.1,0.5,0.5"], "missing.mp4 does not exist"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--reference", "{dir}/nope.mkv"], "nope.mkv does not exist"),
    (["--query", "{query}", "--query-box", "20,16,200,48"], "lies outside the 96x64 frame"),
    (["--query", "{query}", "--query-box", "0.6,0.1,0.5,0.5"], "x1 < x2"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--query-start", "1", "--query-end", "9"],
     "query span [1, 9) s lies outside"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--reference-start", "5"], "reference span"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--query-end", "1", "--query-box-time", "1.5"],
     "--query-box-time 1.5 s lies outside the query span"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--set", "model.cell=warp"],
     "only the detection post-processing"),
    (["--query", "{query}", "--query-box", "0.1,0.1,0.5,0.5", "--set", "model.det_nms_iou=2"],
     "model.det_nms_iou must be in (0, 1]"),
])
def test_cli_errors(media, tmp_path, capsys, args, message):
    fill = {"dir": str(tmp_path), "query": str(media["query_mp4"])}
    argv = ["relocalize"] + [a.format(**fill) for a in args]
    if "--reference" not in argv:
        argv += ["--reference", str(media["ref_mkv"])]
    argv += ["--checkpoint", str(media["checkpoint"]), "--out", str(tmp_path / "t.json"), "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_function_errors(media):
    model, _ = tiny_model("conv")
    with pytest.raises(FileNotFoundError, match="missing.mkv"):
        R.relocalize(model, media["query_mp4"], [0.1, 0.1, 0.5, 0.5], media["dir"] / "missing.mkv", progress=False)
    with pytest.raises(ValueError, match="outside"):
        R.relocalize(model, media["query_mp4"], [0.1, 0.1, 1.5, 0.5], media["ref_mkv"], progress=False,
                     box_units="normalized")


def test_default_checkpoint(tmp_path, monkeypatch, media, capsys):
    from stvr.commands.relocalize import default_checkpoint

    monkeypatch.chdir(tmp_path)
    argv = ["relocalize", "--query", str(media["query_mp4"]), "--query-box", "0.1,0.1,0.5,0.5",
            "--reference", str(media["ref_mkv"]), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and "--checkpoint" in err
    model, cfg = tiny_model()
    save_checkpoint(tmp_path / "runs" / "demo" / "warp", "last", model, None, cfg, step=1)
    assert default_checkpoint() == Path("runs/demo/warp/last.safetensors")
    save_checkpoint(tmp_path / "runs" / "demo", "best", model, None, cfg, step=2)
    assert default_checkpoint() == Path("runs/demo/best.safetensors")


def test_render_draws_only_on_tubelet_frames(media, tmp_path):
    ref = media["ref_mp4"]
    info = video.probe(ref)
    box = [0.2, 0.2, 0.8, 0.8]
    frames = [{"time": i / info.fps, "frame": i, "box": box, "box_pixels": []} for i in range(20, 40)]
    result = {"tubelets": [{"rank": 0, "score": 0.9, "frames": frames}]}
    drawn = R.render_tubelets(ref, result, tmp_path / "drawn.mkv", progress=False)
    plain = R.render_tubelets(ref, {"tubelets": []}, tmp_path / "plain.mkv", progress=False)
    a = np.asarray(video.read_frames(drawn, fps=info.fps)).astype(int)
    b = np.asarray(video.read_frames(plain, fps=info.fps)).astype(int)
    assert a.shape == b.shape and a.shape[0] == info.num_frames
    # the box's left edge column (x = 0.2 * 64 = 13), rows inside the box
    edge = np.abs(a[:, 20:45, 12:14] - b[:, 20:45, 12:14]).mean(axis=(1, 2, 3))
    assert edge[20:40].min() > 20
    assert np.delete(edge, range(20, 40)).max() < 8
