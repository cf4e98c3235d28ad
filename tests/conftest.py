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
