"""stvr.data.dataset: training/evaluation pair datasets and collate, with a fake clip cache."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stvr.config import DataConfig
from stvr.data import pairs as P
from stvr.data.ava import AvaRow, evaluation_pairs, link_tubelets
from stvr.data.batch import OTHER_PERSON, QUERY_MATCH, PairBatch
from stvr.data.dataset import EvalPairDataset, TrainPairDataset, collate_pairs, flip_boxes

S = 16
FPS = 24

# (video, person, label, seconds, box)
PEOPLE = [
    ("va", 0, (1,), range(10, 25), (0.05, 0.10, 0.35, 0.60)),
    ("va", 1, (2,), range(10, 15), (0.60, 0.20, 0.90, 0.80)),
    ("va", 2, (1,), range(20, 23), (0.60, 0.10, 0.95, 0.50)),
    ("vb", 0, (1,), range(5, 8), (0.10, 0.50, 0.40, 0.90)),
    ("vb", 3, (1, 3), range(5, 6), (0.55, 0.05, 0.85, 0.45)),
    ("bad", 0, (2,), range(1, 3), (0.10, 0.10, 0.30, 0.30)),
]


def _rows():
    return [AvaRow(v, s, box, a, p) for v, p, lab, secs, box in PEOPLE for s in secs for a in lab]


class FakeCache:
    """Frames that encode what they show: channel 0 = second % 256, channel 1 = 255 inside
    every annotated person box of that second, channel 2 = column gradient 0..255."""

    def __init__(self, bad=("bad",)):
        self.bad = set(bad)
        self.boxes = defaultdict(list)
        for v, _, _, secs, box in PEOPLE:
            for s in secs:
                self.boxes[(v, s)].append(box)
        self.calls = []

    def frames(self, video_id, path, start_second, end_second):
        self.calls.append((video_id, str(path), start_second, end_second))
        if video_id in self.bad:
            raise FileNotFoundError(f"{path}: no such video")
        n = end_second - start_second
        out = np.zeros((n * FPS, S, S, 3), dtype=np.uint8)
        centers = (np.arange(S) + 0.5) / S
        out[..., 2] = np.round(np.arange(S) * 255 / (S - 1)).astype(np.uint8)[None, None, :]
        for k in range(n):
            s = start_second + k
            f = slice(k * FPS, (k + 1) * FPS)
            out[f, :, :, 0] = s % 256
            for x1, y1, x2, y2 in self.boxes.get((video_id, s), []):
                ys = (centers >= y1) & (centers <= y2)
                xs = (centers >= x1) & (centers <= x2)
                out[f, :, :, 1] |= (ys[:, None] & xs[None, :]).astype(np.uint8) * 255
        return out


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    tubes = link_tubelets(_rows())
    P.save_tubelets(tubes, root / "train_tubelets.json")
    ds = {"name": "toy", "fps": FPS, "videos": {v: f"videos/{v}.mp4" for v in ("va", "vb", "bad")},
          "time_ranges": {"va": [0, 40], "vb": [0, 10], "bad": [0, 5]}, "train_videos": [], "val_videos": []}
    (root / "dataset.json").write_text(json.dumps(ds))
    pairs = evaluation_pairs(tubes, [(1,), (2,)], time_ranges={"va": (0, 40), "vb": (0, 10), "bad": (0, 5)})
    P.save_pairs(pairs, root / "pairs" / "test.json")
    return root


def _cfg(root, **kw):
    base = dict(root=str(root), reference_seconds=2, query_max_seconds=3, flip_probability=0.0)
    base.update(kw)
    return DataConfig(**base)


def _value(second):
    return (second % 256) / 127.5 - 1.0


def test_items_shapes_and_ground_truth(root):
    ds = TrainPairDataset(root, _cfg(root), image_size=S, seed=0, cache=FakeCache(bad=()))
    assert len(ds) == len(ds.tubelets) == 6
    people = defaultdict(list)
    for v, p, lab, secs, box in PEOPLE:
        for s in secs:
            people[(v, s)].append((p, lab, box))
    for i in range(len(ds)):
        sample = ds[i]
        spec = ds.sample_spec(i)
        q, qn, rn = ds.tubelets[i], len(spec["query_seconds"]), len(spec["reference_seconds"])
        assert qn == min(len(q), 3) and 1 <= rn <= 2
        assert sample.query_clips.shape == (3 * qn, 3, 8, S, S) and sample.query_clips.dtype == torch.float32
        assert sample.reference_clips.shape == (3 * rn, 3, 8, S, S)
        assert sample.query_boxes.shape == (3 * qn, 4) and len(sample.gt_boxes) == len(sample.gt_labels) == 3 * rn
        # query: a window of the tubelet, its boxes tiled to 3 clips per second
        k0 = q.seconds.index(spec["query_seconds"][0])
        assert spec["query_seconds"] == q.seconds[k0:k0 + qn]
        torch.testing.assert_close(sample.query_boxes, torch.tensor(np.repeat(q.boxes[k0:k0 + qn], 3, 0), dtype=torch.float32))
        # frames are those of the chosen seconds
        for c in range(3 * qn):
            assert float(sample.query_clips[c, 0, 0, 0, 0]) == pytest.approx(_value(spec["query_seconds"][c // 3]))
        ref = ds.tubelets[spec["reference_index"]]
        assert ref.label == q.label and set(spec["reference_seconds"]) <= set(ref.seconds)
        for c in range(3 * rn):
            s = spec["reference_seconds"][c // 3]
            assert float(sample.reference_clips[c, 0, 0, 0, 0]) == pytest.approx(_value(s))
            want = sorted(people[(ref.video_id, s)])
            torch.testing.assert_close(sample.gt_boxes[c], torch.tensor([w[2] for w in want], dtype=torch.float32))
            assert sample.gt_labels[c].tolist() == [QUERY_MATCH if w[1] == q.label else OTHER_PERSON for w in want]
            assert sample.gt_labels[c].dtype == torch.int64


def test_other_person_label_in_ground_truth(root):
    ds = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache())
    labels = set()
    for e in range(20):
        ds.set_epoch(e)
        for i in range(len(ds)):
            for lab in ds.sample_spec(i)["gt_labels"]:
                labels.update(lab.tolist())
    assert labels == {OTHER_PERSON, QUERY_MATCH}


def test_deterministic_given_seed_epoch_index(root):
    a = TrainPairDataset(root, _cfg(root, flip_probability=0.5), image_size=S, seed=3, cache=FakeCache(bad=()))
    b = TrainPairDataset(root, _cfg(root, flip_probability=0.5), image_size=S, seed=3, cache=FakeCache(bad=()))
    for epoch in (0, 4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in reversed(range(len(a))):  # order of access does not matter
            x, y = a[i], b[i]
            assert x.info == y.info
            assert torch.equal(x.query_clips, y.query_clips) and torch.equal(x.reference_clips, y.reference_clips)
            assert torch.equal(x.query_boxes, y.query_boxes)
            assert all(torch.equal(p, q) for p, q in zip(x.gt_boxes, y.gt_boxes))
    specs = lambda ds: [(s["query_seconds"], s["reference_index"], s["reference_seconds"], s["flip_query"],
                         s["flip_reference"]) for s in map(ds.sample_spec, range(len(ds)))]
    a.set_epoch(0)
    e0 = specs(a)
    a.set_epoch(1)
    assert specs(a) != e0
    c = TrainPairDataset(root, _cfg(root, flip_probability=0.5), image_size=S, seed=4, cache=FakeCache())
    assert specs(c) != e0


def test_all_windows_are_possible(root):
    ds = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache())
    i = next(k for k, t in enumerate(ds.tubelets) if len(t) == 15)
    starts, ref_starts = set(), set()
    for e in range(300):
        ds.set_epoch(e)
        spec = ds.sample_spec(i)
        starts.add(spec["query_seconds"][0])
        assert len(spec["query_seconds"]) == 3
        if spec["reference_index"] == i:
            ref_starts.add(spec["reference_seconds"][0])
    assert starts == set(range(10, 23))  # 13 windows of 3 s in 10..24, the last one included
    assert ref_starts == set(range(10, 24))  # 14 windows of 2 s


def test_flips_of_frames_and_boxes(root):
    flipped = TrainPairDataset(root, _cfg(root, flip_probability=1.0), image_size=S, cache=FakeCache(bad=()))
    plain = TrainPairDataset(root, _cfg(root, flip_probability=0.0), image_size=S, cache=FakeCache(bad=()))
    for i in range(len(flipped)):
        f, p = flipped[i], plain[i]
        assert f.info["flip_query"] and f.info["flip_reference"] and not p.info["flip_query"]
        torch.testing.assert_close(f.query_boxes, torch.tensor(flip_boxes(p.query_boxes.numpy()), dtype=torch.float32))
        torch.testing.assert_close(f.query_clips, p.query_clips.flip(-1))
        assert float(f.query_clips[0, 2, 0, 0, 0]) == 1.0 and float(p.query_clips[0, 2, 0, 0, 0]) == -1.0
        for c in range(f.query_clips.shape[0]):  # the painted person is under its (flipped) box
            x1, y1, x2, y2 = f.query_boxes[c].tolist()
            cx, cy = int((x1 + x2) / 2 * S), int((y1 + y2) / 2 * S)
            assert float(f.query_clips[c, 1, 0, cy, cx]) == 1.0
        for c in range(len(f.gt_boxes)):
            torch.testing.assert_close(f.gt_boxes[c], torch.tensor(flip_boxes(p.gt_boxes[c].numpy()), dtype=torch.float32))
            for x1, y1, x2, y2 in f.gt_boxes[c].tolist():
                assert float(f.reference_clips[c, 1, 3, int((y1 + y2) / 2 * S), int((x1 + x2) / 2 * S)]) == 1.0
    np.testing.assert_allclose(flip_boxes(np.array([[0.1, 0.2, 0.3, 0.4]])), [[0.7, 0.2, 0.9, 0.4]])
    # p = 0.5: query and reference flips are drawn independently
    half = TrainPairDataset(root, _cfg(root, flip_probability=0.5), image_size=S, cache=FakeCache())
    combos = set()
    for e in range(30):
        half.set_epoch(e)
        for i in range(len(half)):
            s = half.sample_spec(i)
            combos.add((s["flip_query"], s["flip_reference"]))
    assert combos == {(False, False), (False, True), (True, False), (True, True)}


def test_collate_pairs(root):
    ds = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache(bad=()))
    samples = [ds[i] for i in (0, 3, 4)]
    batch = collate_pairs(samples)
    assert isinstance(batch, PairBatch) and batch.batch_size == 3
    nq = [s.query_clips.shape[0] for s in samples]
    nr = [s.reference_clips.shape[0] for s in samples]
    L = max(nr)
    assert batch.query_clips.shape == (sum(nq), 3, 8, S, S) and batch.query_boxes.shape == (sum(nq), 4)
    assert batch.query_index.tolist() == [b for b, n in enumerate(nq) for _ in range(n)]
    assert batch.reference_clips.shape == (3, L, 3, 8, S, S)
    assert batch.reference_mask.tolist() == [[k < n for k in range(L)] for n in nr]
    for b, s in enumerate(samples):
        assert torch.equal(batch.reference_clips[b, : nr[b]], s.reference_clips)
        assert not batch.reference_clips[b, nr[b]:].any()
        assert len(batch.gt_boxes[b]) == len(batch.gt_labels[b]) == L
        assert all(g.shape == (0, 4) for g in batch.gt_boxes[b][nr[b]:])
        assert all(g.shape == (0,) and g.dtype == torch.int64 for g in batch.gt_labels[b][nr[b]:])
    assert batch.pair_ids == [0, 3, 4]
    dropped = collate_pairs([None, samples[1], None])
    assert dropped.batch_size == 1 and dropped.pair_ids == [3]
    assert collate_pairs([None, None]) is None


def test_bad_video_is_skipped_counted_and_replaced(root, caplog):
    ds = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache())
    i = next(k for k, t in enumerate(ds.tubelets) if t.video_id == "bad")
    with caplog.at_level("WARNING"):
        sample = ds[i]
    assert ds.num_failures >= 1 and ds.failures[0][0] == i and "no such video" in ds.failures[0][1]
    assert "skipped sample" in caplog.text
    assert sample.info["query_video"] != "bad"
    again = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache())
    assert again[i].info == sample.info  # the replacement is deterministic too
    everything_bad = TrainPairDataset(root, _cfg(root), image_size=S, cache=FakeCache(bad=("va", "vb", "bad")),
                                      max_retries=2)
    with pytest.raises(RuntimeError, match="3 samples in a row failed"):
        everything_bad[0]


class CorruptFileCache(FakeCache):
    """FakeCache frames, except video "bad", which is decoded for real from its (corrupt) file."""

    def __init__(self, cache_dir):
        super().__init__(bad=())
        self.cache_dir = cache_dir

    def frames(self, video_id, path, start_second, end_second):
        if video_id == "bad":
            from stvr.data.video import ClipCache

            return ClipCache(self.cache_dir, size=S, fps=FPS).frames(video_id, path, start_second, end_second)
        return super().frames(video_id, path, start_second, end_second)


def test_failures_with_loader_workers_are_counted_in_the_main_process(root, tmp_path):
    (root / "videos").mkdir()
    (root / "videos" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 40)
    counts = {}
    for workers in (0, 2):
        ds = TrainPairDataset(root, _cfg(root), image_size=S, cache=CorruptFileCache(tmp_path / f"c{workers}"))
        loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=workers, collate_fn=collate_pairs)
        failures = [f for batch in loader for f in batch.failures]
        assert failures and all("bad" in msg for _, msg in failures)
        # the dataset's own list is per process: complete without workers, empty in the main process with them
        assert ds.num_failures == (len(failures) if workers == 0 else 0)
        counts[workers] = sorted(failures)
    assert counts[2] == counts[0]
    bad = [i for i, t in enumerate(ds.tubelets) if t.video_id == "bad"]
    assert sorted({i for i, _ in counts[0]}) == bad


def test_eval_dataset(root):
    pairs = P.load_pairs(root / "pairs" / "test.json")
    for source in (root, root / "pairs" / "test.json"):
        ds = EvalPairDataset(source, split="test", image_size=S, cache=FakeCache(bad=()))
        assert ds.pairs == pairs and len(ds) == len(pairs)
    for i, p in enumerate(pairs):
        s = ds[i]
        q, r = p["query"], p["reference"]
        n = r["end"] - r["start"]
        assert s.pair_id == i
        assert s.query_clips.shape == (3 * len(q["frames"]), 3, 8, S, S)  # full query, no cap
        assert s.reference_clips.shape == (3 * n, 3, 8, S, S) and len(s.gt_boxes) == 3 * n
        torch.testing.assert_close(s.query_boxes, torch.tensor(np.repeat(q["boxes"], 3, 0), dtype=torch.float32))
        for c in range(3 * n):
            assert float(s.reference_clips[c, 0, 0, 0, 0]) == pytest.approx(_value(r["start"] + c // 3))
            torch.testing.assert_close(s.gt_boxes[c], torch.tensor(r["gt"][c // 3], dtype=torch.float32).reshape(-1, 4))
            assert set(s.gt_labels[c].tolist()) <= {QUERY_MATCH}
    assert any(len(q["query"]["frames"]) > 3 for q in pairs)  # a 15-s query is kept whole
    batch = collate_pairs([ds[0], ds[1]])
    assert batch.pair_ids == [0, 1]
    # a pair whose video is missing: None, counted, dropped by collate
    bad = EvalPairDataset(root, split="test", image_size=S, cache=FakeCache())
    k = next(i for i, p in enumerate(pairs) if "bad" in (p["query"]["id"], p["reference"]["id"]))
    assert bad[k] is None and bad.num_failures == 1
    assert collate_pairs([bad[k], bad[0]]).pair_ids == [0]


def test_dataloader_workers_and_pickling(root):
    ds = TrainPairDataset(root, _cfg(root, flip_probability=0.5), image_size=S, cache=FakeCache(bad=()))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2].info == ds[2].info
    lazy = TrainPairDataset(root, _cfg(root), image_size=S)  # cache created on first use, not pickled
    lazy._cache = object()
    assert pickle.loads(pickle.dumps(lazy))._cache is None
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=1, collate_fn=collate_pairs)
    batches = list(loader)
    assert len(batches) == 3 and batches[0].pair_ids == [0, 1]
    direct = collate_pairs([ds[0], ds[1]])
    assert torch.equal(batches[0].query_clips, direct.query_clips)
    assert torch.equal(batches[0].reference_clips, direct.reference_clips)
