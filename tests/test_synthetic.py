"""stvr.data.synthetic and ``stvr data synth``: determinism, the dataset-root layout,
held-out labels, pairs, that the frames show the actors where the CSV says, that
every atom is visible over time, caching, and the CLI (tiny 64 px roots)."""

from __future__ import annotations

import dataclasses
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from stvr.cli import main as cli_main
from stvr.data import synthetic as SY
from stvr.data import video as V
from stvr.data.ava import link_tubelets, load_label_split, read_annotations
from stvr.data.pairs import load_dataset_json, load_pairs, load_tubelets

TINY = SY.SynthConfig(seed=3, num_train_videos=3, num_val_videos=3, seconds=6, size=64, speed=(12.0, 24.0),
                      segment_seconds=(2, 3), num_val_labels=2, num_test_labels=2, heldout_probability=0.8,
                      occlusion_probability=0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[Path, dict]:
    r = tmp_path_factory.mktemp("synth") / "root"
    summary = SY.generate_dataset(r, TINY, progress=False, workers=1)
    return r, summary


def _saturation(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float64)
    mx, mn = f.max(axis=-1), f.min(axis=-1)
    return (mx - mn) / np.maximum(mx, 1.0)


# ----------------------------------------------------------------------------- layout


def test_root_layout_and_summary(root):
    r, summary = root
    for f in ("dataset.json", "annotations/train.csv", "annotations/val.csv", "label_split.json",
              "train_tubelets.json", "pairs/val.json", "pairs/test.json", "stats.json"):
        assert (r / f).is_file(), f
    ds = load_dataset_json(r)
    assert ds["fps"] == 24 and ds["name"] == "synthetic"
    assert ds["train_videos"] == [f"synth_train_{i:03d}" for i in range(3)]
    assert ds["val_videos"] == [f"synth_val_{i:03d}" for i in range(3)]
    assert set(ds["videos"]) == set(ds["train_videos"]) | set(ds["val_videos"])
    assert all(ds["time_ranges"][v] == [0, 6] for v in ds["videos"])
    assert ds["synthetic"] == {"version": SY.GENERATOR_VERSION, "config": TINY.to_json(), "complete": True}
    names = ds["label_names"]
    assert all(v == "+".join(SY.ATOMS[int(a)] for a in k.split("+")) for k, v in names.items())
    assert names["+".join(map(str, load_label_split(r / "label_split.json")["val"][0]))].count("+") >= 1
    assert SY.is_complete(r, TINY)
    # every video: 64x64, 24 fps, 6 s
    for vid, rel in ds["videos"].items():
        info = V.probe(r / rel)
        assert (info.width, info.height, info.num_frames) == (64, 64, 144)
        assert info.fps == pytest.approx(24.0) and info.duration == pytest.approx(6.0)
    assert summary["generated"] and summary["videos"] == {"train": 3, "val": 3}
    assert summary["seconds"] == {"train": 18, "val": 18}
    assert summary["realtime_factor"] > 0


def test_csv_tubelets_and_heldout_split(root):
    r, summary = root
    split = load_label_split(r / "label_split.json")
    held = set(split["val"]) | set(split["test"])
    assert len(split["val"]) == 2 and len(split["test"]) == 2 and not set(split["val"]) & set(split["test"])
    assert all(len(lab) in (2, 3) for lab in held)
    train_rows = read_annotations(r / "annotations" / "train.csv")
    val_rows = read_annotations(r / "annotations" / "val.csv")
    # one row per (video, second, actor, atom): rebuild from the plan
    scripts, plan_split = SY.plan_dataset(TINY)
    assert plan_split == split
    expected = sum(len(a.labels[s]) for sc in scripts if sc.split == "train" for a in sc.actors
                   for s in range(sc.seconds))
    assert len(train_rows) == expected
    # every actor is annotated at every second with 1-3 atoms in 1..8
    per = {}
    for row in train_rows + val_rows:
        per.setdefault((row.video_id, row.second, row.person_id), set()).add(row.action_id)
    n_actor_seconds = sum(len(sc.actors) * sc.seconds for sc in scripts)
    assert len(per) == n_actor_seconds
    assert all(1 <= len(a) <= 3 and a <= set(SY.ATOMS) for a in per.values())
    # held-out labels never in training videos, but shown in validation videos
    train_tubes = link_tubelets(train_rows)
    assert train_tubes and not {t.label for t in train_tubes} & held
    val_labels = {t.label for t in link_tubelets(val_rows)}
    assert held <= val_labels
    # the reorganized training tubelets = all training tubelets (nothing to cut)
    assert load_tubelets(r / "train_tubelets.json") == train_tubes


def test_pairs_exist_for_val_and_test(root):
    r, summary = root
    split = load_label_split(r / "label_split.json")
    for name in ("val", "test"):
        pairs = load_pairs(r / "pairs" / f"{name}.json")
        labels = {tuple(p["query"]["label"]) for p in pairs}
        assert labels == set(split[name])  # every held-out label has pairs
        assert len(pairs) >= 2 * len(split[name])
        for p in pairs:
            ref = p["reference"]
            assert 0 <= ref["start"] < ref["end"] <= 6
            assert any(len(g) for g in ref["gt"])  # the reference tubelet is in its span
    assert summary["pairs"]["val"] > 0 and summary["pairs"]["test"] > 0
    assert summary["labels"]["val_with_pairs"] == 2 and summary["labels"]["test_with_pairs"] == 2


# ----------------------------------------------------------------------------- frames


def test_frames_show_actors_at_their_boxes(root):
    r, _ = root
    scripts, _ = SY.plan_dataset(TINY)
    rows = read_annotations(r / "annotations" / "train.csv") + read_annotations(r / "annotations" / "val.csv")
    boxes = {(row.video_id, row.second, row.person_id): row.box for row in rows}
    margins, n = [], 0
    for sc in scripts:
        frames = V.read_frames(r / "videos" / f"{sc.video_id}.mp4")
        np.testing.assert_allclose(  # what was rendered is what is decoded (lossy codec)
            np.abs(frames[::24].astype(float) - np.concatenate(
                [SY.render_frames(sc, s)[:1] for s in range(sc.seconds)]).astype(float)).mean(), 0, atol=12)
        for s in range(sc.seconds):
            img = frames[s * 24 + 12]  # the middle of the second, where the box holds
            sat = _saturation(img)
            outside = np.ones(sat.shape, bool)
            cores = []
            for a in sc.actors:
                x1, y1, x2, y2 = (np.array(boxes[(sc.video_id, s, a.person_id)]) * 64).round().astype(int)
                outside[max(y1 - 2, 0): y2 + 2, max(x1 - 2, 0): x2 + 2] = False
                cx, cy, hw, hh = (x1 + x2) // 2, (y1 + y2) // 2, max((x2 - x1) // 4, 1), max((y2 - y1) // 4, 1)
                # median: the spoke (a dark or light bar through the centre) covers a quarter of the core
                cores.append(np.median(sat[cy - hh: cy + hh, cx - hw: cx + hw]))
            bg = sat[outside].mean()
            margins += [c - bg for c in cores]
            n += len(cores)
    margins = np.array(margins)
    assert n > 50
    # saturated textured actors on a muted background (0.38 at v4: the spoke, a light or dark bar through
    # the centre, desaturates part of the core, and at 64 px the codec's halved chroma spreads it)
    assert np.median(margins) > 0.3
    assert (margins > 0.15).mean() > 0.95


def test_every_atom_is_visible_over_time():
    cfg = dataclasses.replace(TINY, num_train_videos=1, num_val_videos=1, speed=(0.0, 0.0), camera_pan=False,
                              actors=(1, 1), actor_size=(0.4, 0.4))
    scripts, _ = SY.plan_dataset(cfg)
    sc = scripts[0]
    actor = sc.actors[0]
    seqs = {}
    for atom in SY.ATOMS:
        actor.labels = [(atom,)] * sc.seconds
        f = SY.render_frames(sc, 2).astype(np.int64)  # a still actor on a still background
        change = np.abs(np.diff(f, axis=0)).sum(axis=-1)  # [23, S, S]
        assert (change > 30).mean(axis=(1, 2)).max() > 0.01, SY.ATOMS[atom]  # visible motion/flicker
        seqs[atom] = f
    # every atom gives a different sequence, and no two are confused on any frame pair
    for a in SY.ATOMS:
        for b in SY.ATOMS:
            if a < b:
                assert np.abs(seqs[a] - seqs[b]).mean() > 1.0, (SY.ATOMS[a], SY.ATOMS[b])
    # at integer seconds the oscillating atoms are at rest: first frames of a second agree
    firsts = {a: seqs[a][0] for a in (2, 3, 4, 7, 8)}
    for a, f0 in firsts.items():
        assert np.abs(f0 - firsts[2]).mean() < 0.5, SY.ATOMS[a]


def test_scroll_slides_across_the_stripes_of_the_texture():
    # version 4: a texture slid along its own stripes does not change (aperture problem)
    y, x = np.mgrid[0:SY._TEX, 0:SY._TEX] / SY._TEX
    rows = np.repeat((128 + 100 * np.sin(2 * np.pi * 3 * y))[..., None], 3, axis=2)   # varies along y only
    cols = np.repeat((128 + 100 * np.sin(2 * np.pi * 2 * x))[..., None], 3, axis=2)   # varies along x only
    np.testing.assert_allclose(np.abs(SY._scroll_direction(rows, np.array([0.3, 0.9]))), [0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(SY._scroll_direction(rows, np.array([0.3, -0.9])), [0.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(SY._scroll_direction(cols, np.array([0.9, 0.3])), [1.0, 0.0], atol=1e-9)
    # every planned actor scrolls at the set speed, along its texture's direction of largest change
    scripts, _ = SY.plan_dataset(TINY)
    for a in (a for sc in scripts for a in sc.actors):
        d = a.scroll_v / SY._SCROLL_PERIODS_PER_S
        assert abs(np.linalg.norm(d) - 1.0) < 1e-6
        lum = a.texture.astype(np.float64).mean(axis=2)
        gx, gy = np.roll(lum, -1, 1) - np.roll(lum, 1, 1), np.roll(lum, -1, 0) - np.roll(lum, 1, 0)
        energy = lambda e: float(np.sum((gx * e[0] + gy * e[1]) ** 2))  # noqa: E731 - change along e
        assert energy(d) >= energy(np.array([-d[1], d[0]])) - 1e-6


def _actor_masks(sc, actor, frame):
    """Boolean ``[S, S]`` masks (inside the silhouette, rim or spoke) of a still actor, computed
    from its geometry as the renderer does."""
    S = sc.size
    tr = SY._ActorTrack(actor, sc.seconds, sc.fps)
    cx, cy = tr.center[frame]
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    lx, ly = xx - cx, yy - cy
    c, s = np.cos(tr.angle[frame]), np.sin(tr.angle[frame])
    u = (c * lx + s * ly) / (actor.rx * tr.sx[frame])
    v = (c * ly - s * lx) / (actor.ry * tr.sy[frame])
    q = SY._superellipse(u, actor.shape_p) + SY._superellipse(v, actor.shape_p)
    return q <= 1.0, (q <= 1.0) & ((q > SY._RIM) | (np.abs(v) < SY._SPOKE))


def test_blink_switches_the_rim_and_spoke_and_keeps_the_interior():
    cfg = dataclasses.replace(TINY, num_train_videos=1, num_val_videos=1, speed=(0.0, 0.0), camera_pan=False,
                              actors=(1, 1), actor_size=(0.5, 0.5))
    sc = SY.plan_dataset(cfg)[0][0]
    actor = sc.actors[0]
    actor.labels = [(3,)] * sc.seconds
    f = SY.render_frames(sc, 1).astype(np.int64)
    period = sc.fps / actor.blink_f                     # frames per blink period (8 or 9.6)
    on, off = 1, int(np.ceil(period / 2)) + 1           # first and second half of the first period
    inside, rim = _actor_masks(sc, actor, sc.fps + on)
    changed = np.abs(f[on] - f[off]).sum(-1) > 30
    core = inside & ~rim
    # well inside the interior nothing changes; most of the rim and spoke does
    inner = core & ~np.roll(rim, 1, 0) & ~np.roll(rim, -1, 0) & ~np.roll(rim, 1, 1) & ~np.roll(rim, -1, 1)
    assert inner.sum() > 100 and changed[inner].mean() < 0.02
    assert changed[rim].mean() > 0.7
    # light <-> dark: the rim's brightness moves by a lot, in the direction its own shade says
    d = (f[off] - f[on]).sum(-1)[rim].mean()
    assert abs(d) > 150 and (d > 0) == (not actor.rim_light)


def test_rim_shade_is_per_actor_seeded_and_leaves_the_layout():
    cfg = dataclasses.replace(TINY, num_train_videos=6, num_val_videos=4)
    a, _ = SY.plan_dataset(cfg)
    b, _ = SY.plan_dataset(cfg)
    shades = [x.rim_light for sc in a for x in sc.actors]
    assert shades == [x.rim_light for sc in b for x in sc.actors] and set(shades) == {True, False}
    # a non-blinking actor keeps its own shade in every frame; blinking switches it
    tr = SY._ActorTrack(a[0].actors[0], cfg.seconds, cfg.fps)
    blinking = np.repeat([3 in lab for lab in a[0].actors[0].labels], cfg.fps)
    assert (tr.rim_state[~blinking] == a[0].actors[0].rim_light).all()
    # more training videos leave the validation videos (and so every val / test pair) as they were
    c, split_c = SY.plan_dataset(dataclasses.replace(cfg, num_train_videos=9))
    val_a = [sc for sc in a if sc.split == "val"]
    val_c = [sc for sc in c if sc.split == "val"]
    assert SY.plan_dataset(cfg)[1] == split_c
    for x, y in zip(val_a, val_c, strict=True):
        np.testing.assert_array_equal(x.boxes(), y.boxes())
        assert x.rows() == y.rows()
    for x, y in zip(a[:6], c[:6]):
        assert x.rows() == y.rows()


def test_occluder_and_pan_are_rendered():
    cfg = dataclasses.replace(TINY, occlusion_probability=1.0, num_train_videos=1, num_val_videos=1)
    scripts, _ = SY.plan_dataset(cfg)
    sc = scripts[0]
    occ = sc.occluder
    assert occ is not None
    t = np.arange(sc.seconds * 24) / 24
    xs = np.floor(np.mod(occ["x0"] + occ["v"] * t, occ["period"])).astype(int) - occ["width"]
    k = int(np.nonzero((xs >= 0) & (xs + occ["width"] <= sc.size))[0][0])  # fully visible
    f = SY.render_frames(sc, k // 24)[k % 24]
    np.testing.assert_array_equal(f[:, xs[k]: xs[k] + occ["width"]], occ["texture"])
    assert np.linalg.norm(sc.pan) >= cfg.pan_speed[0]


# ----------------------------------------------------------------------------- determinism, caching


def test_deterministic_and_independent_of_workers(root, tmp_path):
    r, _ = root
    other = tmp_path / "again"
    SY.generate_dataset(other, TINY, progress=False, workers=2)  # worker processes
    for rel in ("annotations/train.csv", "annotations/val.csv", "label_split.json", "dataset.json",
                "train_tubelets.json", "pairs/val.json", "pairs/test.json"):
        assert filecmp.cmp(r / rel, other / rel, shallow=False), rel
    for vid in ("synth_train_001", "synth_val_002"):
        np.testing.assert_array_equal(V.read_frames(r / "videos" / f"{vid}.mp4"),
                                      V.read_frames(other / "videos" / f"{vid}.mp4"))
    # another seed gives other data
    s2 = SY.plan_dataset(dataclasses.replace(TINY, seed=4))[0]
    s1 = SY.plan_dataset(TINY)[0]
    assert s1[0].rows() != s2[0].rows()


def test_caching_and_regeneration(tmp_path):
    cfg = dataclasses.replace(TINY, num_train_videos=1, num_val_videos=1, seconds=4)
    r = tmp_path / "root"
    first = SY.generate_dataset(r, cfg, progress=False, workers=1)
    assert first["generated"]
    stamp = (r / "videos" / "synth_train_000.mp4").stat().st_mtime_ns
    again = SY.generate_dataset(r, cfg, progress=False, workers=1)
    assert not again["generated"] and again["videos"] == first["videos"] and again["pairs"] == first["pairs"]
    assert (r / "videos" / "synth_train_000.mp4").stat().st_mtime_ns == stamp
    (r / "cache").mkdir()
    (r / "cache" / "stale").write_text("x")
    changed = dataclasses.replace(cfg, seconds=5)
    assert not SY.is_complete(r, changed)
    # a complete set of other settings is somebody's data: refused, nothing touched, the
    # differing settings named
    with pytest.raises(ValueError, match=r"other settings: seconds 4 \(asked: 5\)"):
        SY.generate_dataset(r, changed, progress=False, workers=1)
    assert SY.is_complete(r, cfg) and (r / "cache" / "stale").is_file()
    assert (r / "videos" / "synth_train_000.mp4").stat().st_mtime_ns == stamp
    third = SY.generate_dataset(r, changed, progress=False, workers=1, force=True)
    assert third["generated"] and third["seconds"]["train"] == 5
    assert not (r / "cache").exists()  # the clip cache of the old videos is gone
    # the same settings by an older generator version: regenerated
    d = json.loads((r / "dataset.json").read_text())
    d["synthetic"]["version"] = SY.GENERATOR_VERSION - 1
    (r / "dataset.json").write_text(json.dumps(d))
    assert SY.generate_dataset(r, changed, progress=False, workers=1)["generated"]
    # an incomplete root (interrupted run) is regenerated
    (r / "pairs" / "test.json").unlink()
    assert not SY.is_complete(r, changed)
    assert SY.generate_dataset(r, changed, progress=False, workers=1)["generated"]
    # a non-synthetic root is never overwritten without force
    ava = tmp_path / "ava"
    ava.mkdir()
    (ava / "dataset.json").write_text(json.dumps({"name": "ava"}))
    with pytest.raises(ValueError, match="not a synthetic data set"):
        SY.generate_dataset(ava, cfg, progress=False, workers=1)


def test_config_validation():
    with pytest.raises(ValueError, match="size"):
        SY.SynthConfig(size=33).validate()
    with pytest.raises(ValueError, match="fps"):
        SY.SynthConfig(fps=25).validate()
    with pytest.raises(ValueError, match="actors"):
        SY.SynthConfig(actors=(3, 2)).validate()
    with pytest.raises(ValueError, match="num_val_labels"):
        SY.SynthConfig(num_val_labels=0).validate()
    assert SY.SynthConfig.from_json(SY.SynthConfig().to_json()) == SY.SynthConfig()


# ----------------------------------------------------------------------------- pipeline + CLI


def test_root_feeds_the_datasets(root, tmp_path):
    from stvr.data.dataset import EvalPairDataset, TrainPairDataset, collate_pairs

    r, _ = root
    cache = V.ClipCache(tmp_path / "cache", size=64)
    train = TrainPairDataset(r, image_size=64, cache=cache)
    item = train[0]
    assert item.query_clips.shape[1:] == (3, 8, 64, 64) and item.reference_clips.shape[1:] == (3, 8, 64, 64)
    ev = EvalPairDataset(r, split="test", image_size=64, cache=cache)
    batch = collate_pairs([ev[0], ev[1]])
    assert batch is not None and batch.reference_clips.shape[2:] == (3, 8, 64, 64)
    assert train.num_failures == 0 and ev.num_failures == 0


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--num-train-videos", "1", "--num-val-videos", "2",
            "--seconds", "4", "--size", "64", "--speed", "12", "24", "--val-labels", "1", "--test-labels", "1",
            "--heldout-probability", "0.9", "--quiet", "--workers", "1"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "generated" in text and "train 1 (4 s), val 2 (8 s), 64x64 at 24 fps" in text
    assert "x real time" in text
    ds = load_dataset_json(out)
    assert ds["synthetic"]["config"]["seconds"] == 4 and ds["synthetic"]["config"]["size"] == 64
    assert cli_main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated"] is False and summary["videos"] == {"train": 1, "val": 2}
    assert cli_main(["data", "stats", str(out)]) == 0
    assert cli_main(["data", "synth", "--out", str(out), "--size", "33", "--quiet"]) == 2
    assert "size" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_annotated_box_of_a_second_frames_the_actor_in_all_three_clips(seed):
    # the protocol scores the clips at 1/6, 1/2 and 5/6 s against the box annotated at the middle
    # of the second: with the default speeds a perfect per-clip tracker must still reach IoU 0.5
    cfg = SY.SynthConfig(seed=seed, num_train_videos=3, num_val_videos=3)
    scripts, _ = SY.plan_dataset(cfg)
    ious = []
    for sc in scripts:
        boxes = sc.boxes()                                          # [actors, seconds, 4]
        for i, a in enumerate(sc.actors):
            half = np.array([a.rx, a.ry])
            for s in range(sc.seconds):
                for clip in (0, 2):
                    c = a.pos[s * sc.fps + clip * 8 + 4]
                    tracked = np.clip(np.concatenate([c - half, c + half]) / sc.size, 0, 1)
                    b = boxes[i, s]
                    lt, rb = np.maximum(tracked[:2], b[:2]), np.minimum(tracked[2:], b[2:])
                    inter = np.prod(np.clip(rb - lt, 0, None))
                    union = np.prod(tracked[2:] - tracked[:2]) + np.prod(b[2:] - b[:2]) - inter
                    ious.append(inter / union)
    ious = np.array(ious)
    assert ious.min() >= 0.5 and ious.mean() >= 0.75, (ious.min(), ious.mean())


def _benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_geometry_idealized_detectors(root):
    # benchmarks/bench_geometry.py: annotated boxes with a (near) perfect matcher score 100 %;
    # the per-clip tracker's middle clip is the annotated box, its outer clips drift by v / 3
    from stvr.evaluation import frame_map

    bench = _benchmark("bench_geometry")
    r, _ = root
    pairs = json.loads((r / "pairs" / "test.json").read_text())
    scripts = {s.video_id: s for s in SY.plan_dataset(TINY)[0]}
    dets, _ = bench.idealized_detections(pairs, scripts, "annotated", auc=0.999999, seed=0)
    assert frame_map(pairs, dets)["mAP"] == pytest.approx(1.0)
    dets, outer = bench.idealized_detections(pairs, scripts, "tracker", auc=None, seed=0)
    assert len(outer) > 0 and 0.0 < outer.min() and outer.max() < 1.0
    for p, per_pair in zip(pairs, dets):
        for j, rows in enumerate(per_pair):
            if j % 3 == 1:    # the middle clip is where the box was annotated
                s = p["reference"]["start"] + j // 3
                annotated = scripts[p["reference"]["id"]].boxes()[:, s]
                np.testing.assert_allclose(np.asarray(rows)[:, :4], annotated, atol=1e-9)


def test_bench_backbone_match_scores_every_annotated_actor(root):
    # benchmarks/bench_backbone_match.py: every annotated actor of every reference clip, at its
    # exact box, scored by a cosine; so actor recall is 1 and the chance row is the usual one
    from stvr.evaluation import load_actors, match_diagnostics

    bench = _benchmark("bench_backbone_match")
    r, _ = root
    pairs, dets, actors = bench.exact_box_detections(r, "builtin", "test")
    assert actors == load_actors(r)
    for p, per_pair in zip(pairs, dets):
        ref = p["reference"]
        assert len(per_pair) == 3 * (ref["end"] - ref["start"])
        for j, rows in enumerate(per_pair):
            want = np.asarray(actors.get((ref["id"], ref["start"] + j // 3), []), np.float32).reshape(-1, 4)
            got = np.asarray(rows, np.float64).reshape(-1, 5)
            np.testing.assert_allclose(got[:, :4], want, atol=1e-6)
            assert np.all(np.abs(got[:, 4]) <= 1 + 1e-5)
    s = bench.score_root(r, "builtin", "test")
    diag = match_diagnostics(pairs, dets, actors)
    assert s["actor_recall"] == 1.0 and s["pairs"] == len(pairs)
    assert s["chance_mAP"] == pytest.approx(100 * diag["chance_mAP"])
    assert s["match_auc"] == pytest.approx(diag["match_auc"]) and 0.0 <= s["mAP"] <= 100.0
    # deterministic, random initialization included
    assert bench.score_root(r, "none", "test") == bench.score_root(r, "none", "test")
    # --groups 3: one score per actor and second (the mean map of its 3 clips), not one per clip
    _, grouped, _ = bench.exact_box_detections(r, "builtin", "test", group=3)
    assert grouped != dets
    for per_pair in grouped:
        for j in range(0, len(per_pair), 3):
            assert per_pair[j] == per_pair[j + 1] == per_pair[j + 2]


def test_bench_backbone_match_action_score_is_the_probes_l1_distance(root):
    # --score action: the same boxes, scored by minus the L1 distance between the action
    # probabilities (model.match_action_distance's probe, fitted on the training actors) of the
    # box's crop mean and of the query's mean crop
    import torch

    from stvr.config import preset

    bench = _benchmark("bench_backbone_match")
    r, _ = root
    pairs, cos, actors = bench.exact_box_detections(r, "builtin", "test", group=3)
    _, act, _ = bench.exact_box_detections(r, "builtin", "test", group=3, score="action")
    boxes = lambda d: [[[row[:4] for row in c] for c in p] for p in d]  # noqa: E731
    assert boxes(act) == boxes(cos)
    cfg = preset("cpu").model
    model = bench.action_probe_model(r, cfg)
    ids = model.cfg.action_ids
    scores = np.asarray([row[4] for p in act for c in p for row in c])
    assert len(ids) >= 2 and scores.min() >= -len(ids) and scores.max() <= 0 and scores.std() > 0
    # one detection by hand: the first annotated box of the first pair's reference
    p = pairs[0]
    q, ref = p["query"], p["reference"]
    keys = [(q["id"], int(s)) for s in q["frames"]]
    j = next(j for j, c in enumerate(act[0]) if c)
    second = ref["start"] + j // 3
    maps = bench.clip_maps(r, cfg, model.backbone, sorted(set(keys + [(ref["id"], second)])))
    qm = bench.crop_means(torch.cat([maps[k] for k in keys]), np.repeat(np.asarray(q["boxes"], np.float32), 3, 0),
                          cfg).mean(0, keepdim=True)
    box = np.asarray([act[0][j][0][:4]], np.float32)
    pm = bench.crop_means(maps[(ref["id"], second)].mean(0, keepdim=True), box, cfg)
    with torch.no_grad():
        want = -model.action_probe.distance(pm, qm).item()
    assert act[0][j][0][4] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="unknown score"):
        bench.exact_box_detections(r, "builtin", "test", score="dot")
    # --score action-agree: the same boxes, scored by the log-probability that the actions agree
    _, agree, _ = bench.exact_box_detections(r, "builtin", "test", group=3, score="action-agree")
    assert boxes(agree) == boxes(cos)
    with torch.no_grad():
        pq = model.action_probe.probabilities(torch.cat([pm, qm]))
    want = float(np.log(pq[0].numpy() * pq[1].numpy() + (1 - pq[0].numpy()) * (1 - pq[1].numpy())).sum())
    assert agree[0][j][0][4] == pytest.approx(want, abs=1e-5)
    # --set model.action_probe_hidden / action_probe_seconds reach the probe
    import dataclasses

    hidden = bench.action_probe_model(r, dataclasses.replace(cfg, action_probe_hidden=8, action_probe_seconds=0))
    assert hidden.action_probe.hidden_weight.shape == (8, model.action_probe.mean.shape[0])
    assert bool(hidden.action_probe.fitted)


def test_agreement_log_probability_by_hand():
    import torch

    f = _benchmark("bench_backbone_match").agreement_log_probability
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.9], [1.0, 1.0]])
    q = torch.tensor([[1.0, 0.0]])
    got = f(p, q)
    want = [0.0, 2 * np.log(0.5), np.log(0.2) + np.log(0.1), np.log(1e-6)]   # certain disagreement: clamped
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # symmetric, and pairwise when q has one row per p row
    assert torch.allclose(f(q.expand(4, 2), p), got)


def test_bench_backbone_match_overrides_reach_the_backbone(root, tmp_path):
    # --set: weights of another backbone shape load only with the matching override (a random
    # width-8 backbone saved as a file), and a changed RoI mapping changes the scores
    import safetensors.torch
    import torch

    from stvr.backbones.tiny import TinyBackbone

    bench = _benchmark("bench_backbone_match")
    r, _ = root
    torch.manual_seed(1)
    path = tmp_path / "w8.safetensors"
    safetensors.torch.save_file(TinyBackbone(8, 64).state_dict(), str(path))
    with pytest.raises(ValueError, match="does not fit"):
        bench.exact_box_detections(r, str(path), "test")
    _, dets8, _ = bench.exact_box_detections(r, str(path), "test", overrides=("model.tiny_width=8",))
    _, dets, _ = bench.exact_box_detections(r, "none", "test")
    assert len(dets8) == len(dets) and dets8 != dets
    _, tf, _ = bench.exact_box_detections(r, "none", "test", overrides=("model.roi_mapping=tf",))
    assert tf != dets
    assert [[[row[:4] for row in c] for c in p] for p in tf] == [[[row[:4] for row in c] for c in p] for p in dets]


def test_bench_cell_ablation_zero_warp_and_no_memory():
    # benchmarks/bench_cell_ablation.py: "zero_warp" leaves the state where it is (the warp
    # cell's output is its ConvLSTM update of the unwarped state), "no_memory" makes the output
    # independent of the state; both are undone on exit, and do not apply where there is no warp
    import types

    import torch

    from stvr.recurrent import build_cell

    bench = _benchmark("bench_cell_ablation")
    torch.manual_seed(0)
    cell = build_cell("warp", 4, 4, bottleneck=3).double()
    with torch.no_grad():
        cell.offset.bias.copy_(torch.tensor([1.5, -2.0]))        # a real displacement
    x, h, c = (torch.randn(2, 4, 12, 12, dtype=torch.float64) for _ in range(3))
    model = types.SimpleNamespace(cell=cell)
    warped, _ = cell(x, (h, c))
    unwarped, _ = cell.update(x, h, c)
    fresh, _ = cell(x, None)
    assert not torch.allclose(warped, unwarped) and not torch.allclose(warped, fresh)
    with bench.ablated(model, "zero_warp") as applies:
        assert applies
        out, _ = cell(x, (h, c))
        torch.testing.assert_close(out, unwarped, rtol=0, atol=1e-12)
        assert torch.equal(cell.last_offsets, torch.zeros(2, 9, 2, dtype=torch.float64))
    with bench.ablated(model, "no_memory") as applies:
        assert applies
        out, _ = cell(x, (h, c))
        assert torch.equal(out, fresh)
    assert torch.equal(cell(x, (h, c))[0], warped)                  # both undone
    with bench.ablated(types.SimpleNamespace(cell=build_cell("conv", 4, 4)), "zero_warp") as applies:
        assert not applies
    with bench.ablated(types.SimpleNamespace(cell=None), "no_memory") as applies:
        assert not applies
    with pytest.raises(ValueError, match="unknown ablation"):
        with bench.ablated(model, "nothing"):
            pass


def test_bench_atoms_splits_the_probe_auc_by_held_out_and_training_labels():
    # benchmarks/bench_atoms.py: per-atom AUC over held-out-label actors and over the others,
    # and the mean probability of each atom per combined label, on a hand-built case
    bench = _benchmark("bench_atoms")
    ids = [1, 2, 3]
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float32)
    assert bench.combined_labels(targets, ids) == [(1,), (1, 2), (2, 3), (3,), (1, 2), (2, 3)]
    scores = np.where(targets > 0, 2.0, -2.0)
    scores[2, 0] = 3.0              # held-out actor 2 (label 2+3) looks like atom 1 too
    r = bench.auc_by_label_kind(scores, targets, ids, heldout={(2, 3)})
    assert r["heldout_share"] == pytest.approx(2 / 6)
    # seen actors 0, 1, 3, 4: every atom perfectly ranked
    assert r["seen"] == [1.0, 1.0, 1.0]
    # held-out actors 2, 5 (both 2+3): atoms 2 and 3 positive in both, atom 1 negative in both
    assert all(np.isnan(v) for v in r["heldout"])
    r = bench.auc_by_label_kind(scores, targets, ids, heldout={(2, 3), (3,)})
    # held-out actors 2, 3, 5: atom 2 positive in 2 and 5 (scores 2, 2) vs 3 (-2): AUC 1;
    # atom 1 negative everywhere: NaN; seen actors 0, 1, 4: atom 3 negative everywhere: NaN
    assert r["heldout"][1] == 1.0 and np.isnan(r["heldout"][0]) and np.isnan(r["seen"][2])
    scores2 = scores.copy()
    scores2[0, 0] = -3.0            # seen actor 0 (label 1) no longer named atom 1
    r2 = bench.auc_by_label_kind(scores2, targets, ids, heldout={(2, 3)})
    assert r2["seen"][0] == pytest.approx(2 / 3)     # 1 of 3 positives below the one negative
    p = bench.mean_probabilities(scores, targets, ids)
    assert list(p) == ["1", "3", "1+2", "2+3"]
    assert p["2+3"]["actors"] == 2
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(p["2+3"]["p"], np.round([(sig(3.0) + sig(-2.0)) / 2, sig(2.0), sig(2.0)], 3))
