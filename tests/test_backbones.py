"""Tests of stvr.backbones: I3D (shapes, SAME padding, weight loading, frozen BN) and tiny."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stvr.backbones import I3DBackbone, TinyBackbone, build_backbone, same_padding
from stvr.backbones.i3d import Unit3D
from stvr.config import preset


@pytest.fixture(scope="module")
def i3d() -> I3DBackbone:
    torch.manual_seed(0)
    return I3DBackbone()


def test_same_padding_formula():
    # TF: out = ceil(n / s), total pad = max((out - 1) * s + k - n, 0), extra pixel at the end
    for n in range(1, 24):
        for k in (1, 2, 3, 7):
            for s in (1, 2, 3):
                front, back = same_padding(n, k, s)
                out = math.ceil(n / s)
                assert front + back == max((out - 1) * s + k - n, 0)
                assert back - front in (0, 1)
                assert (n + front + back - k) // s + 1 == out
    assert same_padding(8, 7, 2) == (2, 3)      # Conv3d_1a on 8 frames (reference-facts 11.3)
    assert same_padding(320, 7, 2) == (2, 3)
    assert same_padding(5, 3, 2) == (1, 1)


def test_unit3d_matches_explicit_padding():
    unit = Unit3D(2, 3, (3, 7, 7), (2, 2, 2)).eval()
    x = torch.randn(1, 2, 5, 11, 10)
    pads = []
    for n, k, s in zip((10, 11, 5), (7, 7, 3), (2, 2, 2)):
        pads += same_padding(n, k, s)
    ref = F.relu(unit.bn(F.conv3d(F.pad(x, pads), unit.conv3d.weight, stride=2)))
    out = unit(x)
    assert out.shape == (1, 3, 3, 6, 5)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("size", [32, 64])
def test_i3d_shapes(i3d, size):
    x = torch.randn(2, 3, 8, size, size)
    with torch.no_grad():
        mixed = i3d.features(x)
        out = i3d(x)
        conv1 = i3d.features(x, "Conv3d_1a_7x7")
    assert conv1.shape == (2, 64, 4, size // 2, size // 2)
    assert mixed.shape == (2, 512, 2, size // 16, size // 16)
    assert out.shape == (2, 1024, size // 16, size // 16)
    # time-major flattening: channel t * 512 + c holds Mixed_4c[c, t]
    torch.testing.assert_close(out[:, :512], mixed[:, :, 0])
    torch.testing.assert_close(out[:, 512:], mixed[:, :, 1])


def _randomized_state(model: I3DBackbone) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            v = torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k else torch.randn(v.shape, generator=g) * 0.1
        state[k] = v.clone()
    return state


def test_i3d_weight_round_trip(tmp_path, caplog):
    torch.manual_seed(0)
    src = I3DBackbone()
    state = _randomized_state(src)
    assert "Conv3d_1a_7x7.conv3d.weight" in state and "Mixed_4c.b1b.bn.running_mean" in state
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    src.load_i3d_state_dict(state)
    # keys of later layers (public pytorch-i3d names) are ignored
    full = dict(state)
    full["Mixed_4d.b0.conv3d.weight"] = torch.zeros(128, 512, 1, 1, 1)
    full["logits.conv3d.weight"] = torch.zeros(400, 1024, 1, 1, 1)
    full["logits.conv3d.bias"] = torch.zeros(400)
    save_file(full, str(tmp_path / "i3d.safetensors"))
    torch.save(full, tmp_path / "i3d.pt")
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        expected = src.eval()(x)
    for name in ("i3d.safetensors", "i3d.pt"):
        dst = I3DBackbone()
        with caplog.at_level("INFO"):
            missing, unexpected = dst.load_weights(tmp_path / name)
        assert missing == [] and unexpected == []
        assert "ignoring 3 keys" in caplog.text
        for k, v in dst.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(dst.eval()(x), expected)
    # the factory loads cfg.i3d_weights
    cfg = dataclasses.replace(preset("paper").model, i3d_weights=str(tmp_path / "i3d.safetensors"))
    built = build_backbone(cfg)
    torch.testing.assert_close(built.state_dict()["Mixed_4c.b3b.bn.running_var"], state["Mixed_4c.b3b.bn.running_var"])


def test_i3d_missing_and_bad_keys(tmp_path):
    model = I3DBackbone()
    state = model.state_dict()
    del state["Mixed_4c.b2b.conv3d.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"partial\.safetensors.*1 missing keys \[Mixed_4c\.b2b\.conv3d\.weight\]"):
        I3DBackbone().load_weights(path)
    missing, _ = I3DBackbone().load_weights(path, strict=False)
    assert missing == ["Mixed_4c.b2b.conv3d.weight"]
    state = model.state_dict()
    state["Mixed_3b.b0.conv3d.weight"] = torch.zeros(64, 192, 3, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        I3DBackbone().load_weights(tmp_path / "bad.safetensors", strict=False)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        I3DBackbone().load_weights(tmp_path / "nothere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        I3DBackbone().load_weights(tmp_path / "junk.pt")


def test_i3d_frozen_bn_stays_eval(i3d):
    i3d.train()
    bns = [m for m in i3d.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 3 + 4 * 6 and i3d.training
    assert all(not m.training for m in bns)
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    before = bns[5].running_mean.clone()
    out = i3d(torch.randn(2, 3, 8, 32, 32))
    torch.testing.assert_close(bns[5].running_mean, before, rtol=0, atol=0)
    out.sum().backward()
    assert bns[5].bias.grad is not None and bns[5].weight.grad is None
    i3d.zero_grad(set_to_none=True)
    free = I3DBackbone(freeze_bn=False).train()
    assert all(m.training and m.weight.requires_grad for m in free.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_tiny_backbone_contract():
    cfg = preset("cpu").model
    net = build_backbone(cfg)
    assert isinstance(net, TinyBackbone)
    out = net(torch.randn(3, 3, 8, 128, 128))
    assert out.shape == (3, cfg.backbone_channels, 8, 8)
    assert TinyBackbone(4, 16)(torch.randn(1, 3, 8, 64, 64)).shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        TinyBackbone(4, 15)
    with pytest.raises(ValueError, match="backbone_channels"):
        build_backbone(dataclasses.replace(cfg, backbone="i3d"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(dataclasses.replace(cfg, backbone="resnet"))


def test_tiny_backbone_stride_8_evaluates_the_same_weights_on_every_stride_8_cell():
    torch.manual_seed(0)
    b16 = TinyBackbone(width=4, out_channels=16, clip_frames=8).eval()
    b8 = TinyBackbone(width=4, out_channels=16, clip_frames=8, output_stride=8).eval()
    b8.load_state_dict(b16.state_dict())          # same parameters, no new ones
    for m in list(b16.modules()) + list(b8.modules()):
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
    b8.load_state_dict(b16.state_dict())
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        y16, y8 = b16(x), b8(x)
    assert y16.shape == (2, 16, 4, 4) and y8.shape == (2, 16, 8, 8)
    # a stride-2 conv's cell i is the stride-1 conv's cell 2 i (kernel 3, padding 1)
    torch.testing.assert_close(y8[..., ::2, ::2], y16)
    with pytest.raises(ValueError, match="output_stride"):
        TinyBackbone(output_stride=4)


def test_feature_stride_8_is_for_the_tiny_backbone_only():
    from stvr.config import validate_config

    cfg = preset("cpu")
    ok = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_stride=8))
    assert validate_config(ok).model.feature_stride == 8
    assert build_backbone(dataclasses.replace(ok.model, backbone_weights=None)).output_stride == 8
    paper = preset("paper")
    bad = dataclasses.replace(paper, model=dataclasses.replace(paper.model, feature_stride=8))
    with pytest.raises(ValueError, match="feature_stride"):
        validate_config(bad)
    with pytest.raises(ValueError, match="feature_stride"):
        validate_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_stride=4)))
