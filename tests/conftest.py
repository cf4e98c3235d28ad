"""Shared pytest set-up: deterministic, small-thread CPU runs."""

from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir() -> Path:
    return DATA_DIR


def tiny_synth_config(seed: int, **overrides):
    """A 2-train / 2-val video, 4-second, 64 px synthetic set without occluder (seconds to make)."""
    from stvr.data import synthetic as SY

    base = dict(seed=seed, num_train_videos=2, num_val_videos=2, seconds=4, size=64, speed=(8.0, 16.0),
                segment_seconds=(2, 2), num_val_labels=2, num_test_labels=2, heldout_probability=0.8,
                occlusion_probability=0.0)
    base.update(overrides)
    return SY.SynthConfig(**base)


def make_synth_root(tmp_path_factory, name: str, cfg) -> Path:
    """Generate the synthetic set ``cfg`` into a fresh temporary folder; returns its root."""
    from stvr.data import synthetic as SY

    r = tmp_path_factory.mktemp(name) / "root"
    SY.generate_dataset(r, cfg, progress=False, workers=1)
    return r
