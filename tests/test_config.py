import json

import pytest

from stvr.config import (apply_overrides, config_from_dict, config_to_dict, load_config,
                         preset, save_config)


def test_presets_differ_in_sizes_only_where_documented():
    paper, cpu = preset("paper"), preset("cpu")
    assert paper.model.image_size == 320 and paper.model.backbone == "i3d"
    assert paper.model.backbone_channels == 1024 and paper.model.cell_bottleneck == 128
    assert paper.train.lr == 0.03 and paper.train.lr_steps == (10_000, 20_000)
    assert paper.train.grad_clip_norm == 10.0 and paper.train.batch_size == 8
    assert cpu.model.image_size == 128 and cpu.model.backbone == "tiny"
    assert cpu.model.cell == paper.model.cell == "warp"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpu")


def test_overrides_parse_types_and_reject_unknown():
    cfg = apply_overrides(preset("cpu"), ["model.cell=conv", "train.lr=0.5",
                                          "model.anchor_scales=0.5,1", "model.freeze_bn=false",
                                          "model.i3d_weights=w.safetensors", "train.max_steps=7"])
    assert cfg.model.cell == "conv" and cfg.train.lr == 0.5 and cfg.train.max_steps == 7
    assert cfg.model.anchor_scales == (0.5, 1.0) and cfg.model.freeze_bn is False
    assert cfg.model.i3d_weights == "w.safetensors"
    assert preset("cpu").model.cell == "warp"  # the preset itself is untouched
    for bad in ["model.nope=1", "nosection.cell=conv", "cell=conv", "model.cell=lstm",
                "train.lr=fast"]:
        with pytest.raises(ValueError):
            apply_overrides(preset("cpu"), [bad])


def test_config_json_round_trip(tmp_path):
    cfg = apply_overrides(preset("cpu"), ["model.cell=traj", "train.lr_steps=5,9"])
    save_config(cfg, tmp_path / "c.json")
    back = load_config(tmp_path / "c.json")
    assert back == cfg
    d = config_to_dict(cfg)
    d["model"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict(json.loads(json.dumps(d)))


def test_configs_written_before_match_clips_keep_the_per_clip_head():
    """A checkpoint's config from before ``model.match_clips`` existed reloads as it was trained
    (1: each clip's own crop), while the cpu preset now reads the 3 clips of a second."""
    from stvr.config import validate_config

    d = config_to_dict(preset("cpu"))
    assert d["model"].pop("match_clips") == 3
    assert config_from_dict(d).model.match_clips == 1
    assert preset("paper").model.match_clips == 1
    with pytest.raises(ValueError, match="match_clips"):
        validate_config(apply_overrides(preset("cpu"), ["model.match_clips=0"]))


def test_box_voting_over_a_group_needs_box_voting():
    from stvr.config import validate_config

    cfg = preset("cpu")
    assert cfg.model.det_box_voting == 0.5
    validate_config(apply_overrides(cfg, ["model.det_box_voting_group=true"]))
    with pytest.raises(ValueError, match="det_box_voting_group needs box voting"):
        validate_config(apply_overrides(cfg, ["model.det_box_voting_group=true", "model.det_box_voting=0"]))
    assert preset("paper").model.det_box_voting_group is False


def test_score_decay_kinds():
    from stvr.config import validate_config

    cfg = preset("cpu")
    for kind in ("none", "linear", "gaussian"):
        validate_config(apply_overrides(cfg, [f"model.det_score_decay={kind}"]))
    with pytest.raises(ValueError, match="det_score_decay must be"):
        validate_config(apply_overrides(cfg, ["model.det_score_decay=soft"]))
    with pytest.raises(ValueError, match="det_score_decay_sigma must be > 0"):
        validate_config(apply_overrides(cfg, ["model.det_score_decay_sigma=0"]))
    assert preset("paper").model.det_score_decay == "none"       # the official post-processing
    assert preset("cpu").model.det_score_decay == "linear"
