"""The frozen backbone's feature cache (train.feature_cache_mb): exact maps, fewer backbone calls."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import make_synth_root, tiny_synth_config
from stvr.config import DataConfig, apply_overrides, preset
from stvr.data.dataset import EvalPairDataset, TrainPairDataset, collate_pairs
from stvr.model import STVRModel
from stvr.model.feature_cache import FeatureCache, gather_features

TINY = tiny_synth_config(6)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synth_root(tmp_path_factory, "fc", TINY)


def _map(v: float) -> torch.Tensor:
    return torch.full((2, 3, 3), float(v))          # 18 floats = 72 bytes


def test_cache_is_least_recently_used_within_its_byte_budget():
    cache = FeatureCache(3 * 72)
    cache.store(["a", "b", "c"], torch.stack([_map(1), _map(2), _map(3)]))
    assert len(cache) == 3 and cache.bytes == 216
    found, missing = cache.lookup(["a", "x", None])      # "a" becomes the most recent
    assert missing == [1, 2] and torch.equal(found[0], _map(1))
    assert (cache.hits, cache.misses) == (1, 2)
    cache.store(["d", None], torch.stack([_map(4), _map(5)]))   # evicts "b", the least recent
    assert "b" not in cache and {"a", "c", "d"} == {k for k in ("a", "b", "c", "d") if k in cache}
    assert cache.bytes == 216 and len(cache) == 3
    cache.store(["a"], _map(9)[None])                    # a known key keeps its first map
    assert torch.equal(cache.lookup(["a"])[0][0], _map(1))
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["hits"] == 2 and stats["misses"] == 2
    assert stats["hit_rate"] == pytest.approx(0.5) and stats["mb"] == pytest.approx(216 / 2**20)
    with pytest.raises(ValueError, match="positive"):
        FeatureCache(0)
    big = FeatureCache(10)                               # a map over the budget is never kept
    big.store(["z"], _map(1)[None])
    assert len(big) == 0 and big.bytes == 0


def test_gather_computes_only_the_missing_clips_in_order():
    clips = torch.arange(6, dtype=torch.float32)
    asked = []

    def compute(pos):
        asked.append(list(pos))
        return torch.stack([_map(float(clips[p]) * 10) for p in pos])

    cache = FeatureCache(1 << 20)
    out = gather_features(cache, ["k0", "k1", None, "k3", "k4", "k5"], compute)
    assert asked == [[0, 1, 2, 3, 4, 5]]
    for i in range(6):
        assert torch.equal(out[i], _map(i * 10))
    out2 = gather_features(cache, ["k5", "new", "k0", None], compute)
    assert asked[-1] == [1, 3]                        # "new" and the key-less clip only
    assert torch.equal(out2[0], _map(50)) and torch.equal(out2[2], _map(0))
    assert torch.equal(out2[1], _map(10)) and torch.equal(out2[3], _map(30))


def test_datasets_name_every_clip_and_collate_keeps_the_backbone_order(root):
    ds = TrainPairDataset(root, DataConfig(root=str(root), flip_probability=0.5), image_size=64, seed=0)
    samples = [ds[i] for i in range(min(4, len(ds)))]
    for s in samples:
        info = s.info
        assert s.query_keys == [(info["query_video"], int(t), k, info["flip_query"])
                                for t in info["query_seconds"] for k in range(3)]
        assert s.reference_keys == [(info["reference_video"], int(t), k, info["flip_reference"])
                                    for t in info["reference_seconds"] for k in range(3)]
        assert len(s.query_keys) == s.query_clips.shape[0]
        assert len(s.reference_keys) == s.reference_clips.shape[0]
    batch = collate_pairs(samples)
    assert batch.clip_keys == [k for s in samples for k in s.query_keys] + \
        [k for s in samples for k in s.reference_keys]
    assert len(batch.clip_keys) == batch.query_clips.shape[0] + int(batch.reference_mask.sum())
    # a sample without keys (built by hand) leaves the batch without keys
    bare = dataclasses.replace(samples[0], query_keys=None)
    assert collate_pairs([bare, samples[1]]).clip_keys is None
    ev = EvalPairDataset(root, split="val", image_size=64)
    p = ev.pairs[0]
    s = ev[0]
    assert s.query_keys == [(p["query"]["id"], int(t), k, False) for t in p["query"]["frames"] for k in range(3)]
    assert s.reference_keys == [(p["reference"]["id"], t, k, False)
                                for t in range(p["reference"]["start"], p["reference"]["end"]) for k in range(3)]
    # the same clip drawn flipped and unflipped has two keys; the same clip twice has one
    assert (ds._clip_keys("v", [3], True)[0] != ds._clip_keys("v", [3], False)[0])


def _cpu_model(cache_mb: float) -> STVRModel:
    cfg = apply_overrides(preset("cpu"), ["model.image_size=64"])
    torch.manual_seed(0)
    model = STVRModel(cfg.model)
    model.enable_feature_cache(cache_mb)
    return model.train()


def test_cached_features_give_the_same_losses_and_skip_the_backbone(root):
    ds = TrainPairDataset(root, DataConfig(root=str(root)), image_size=64, seed=0)
    batches = [collate_pairs([ds[i], ds[(i + 1) % len(ds)]]) for i in range(3)]
    plain, cached = _cpu_model(0), _cpu_model(64)
    assert plain.feature_cache is None and cached.feature_cache is not None
    cached.load_state_dict(plain.state_dict())
    calls = []
    cached.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for epoch in range(2):
        for j, b in enumerate(batches):
            torch.manual_seed(j)
            a = plain(b)
            torch.manual_seed(j)
            c = cached(b)
            for k in a:
                torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6)
        if epoch == 0:
            n_first = sum(calls)
    unique = {k for b in batches for k in b.clip_keys}
    assert n_first == len(unique)                   # each distinct clip through the backbone once
    assert sum(calls) == n_first                    # the second pass reads only the cache
    st = cached.feature_cache.stats()
    assert st["entries"] == len(unique)
    assert st["hits"] + st["misses"] == 2 * sum(len(b.clip_keys) for b in batches)
    # gradients still reach the head through cached maps
    loss = cached(batches[0])["loss"]
    loss.backward()
    assert cached.head.parameters().__next__().grad is not None


def test_a_training_backbone_is_never_cached(root):
    cfg = apply_overrides(preset("cpu"), ["model.image_size=64", "model.freeze_backbone=false"])
    model = STVRModel(cfg.model)
    assert model.enable_feature_cache(64) is False and model.feature_cache is None
    frozen = STVRModel(apply_overrides(preset("cpu"), ["model.image_size=64"]).model)
    assert frozen.enable_feature_cache(0) is False
    assert frozen.enable_feature_cache(8) is True


def test_training_reports_the_cache(root, tmp_path):
    from stvr.train import train

    cfg = apply_overrides(preset("cpu"), [
        "model.image_size=64", f"data.root={root}", "train.batch_size=2", "train.eval_every=0",
        "train.log_every=1", "train.checkpoint_every=100", "train.feature_cache_mb=16"])
    summary = train(cfg, tmp_path / "run", max_steps=6, progress=False)
    st = summary["feature_cache"]
    assert st["hits"] > 0 and st["entries"] > 0 and st["mb"] <= 16
    off = apply_overrides(cfg, ["train.feature_cache_mb=0"])
    assert train(off, tmp_path / "run0", max_steps=1, progress=False)["feature_cache"] is None
