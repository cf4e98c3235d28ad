"""Tests of stvr.recurrent: the official ConvLSTM update, the warp / traj / flow
cells, build_cell / cell_options, the OpenCV clip-flow helper and a seeded
learnability check of the warp cell against the ConvLSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from stvr.config import preset
from stvr.recurrent import (
    CELL_CLASSES,
    ConvLSTMCell,
    FlowLSTMCell,
    TrajLSTMCell,
    WarpLSTMCell,
    build_cell,
    cell_options,
    clip_flow,
    control_point_grid,
)
from stvr.warp import dense_image_warp, spline_dense_flow, warp_states

KINDS = ["conv", "warp", "traj", "flow"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def randomize_norms(cell: ConvLSTMCell, seed: int = 0) -> None:
    """Non-trivial LayerNorm gammas/betas (init is 1/0) so the affine part is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (cell.gate_gamma, cell.gate_beta, cell.cell_gamma, cell.cell_beta):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def reference_update(cell: ConvLSTMCell, x, h, c):
    """The official cell written out step by step (reference-facts section 5, steps 5-11)."""
    z = torch.cat([x, h], 1)
    z = F.conv2d(z, cell.depthwise.weight, padding=1, groups=z.shape[1])
    z = F.conv2d(z, cell.pointwise.weight, cell.pointwise.bias)
    gates = F.conv2d(z, cell.expand.weight, cell.expand.bias)

    def ln(t, gamma, beta):
        mu = t.mean(dim=(1, 2, 3), keepdim=True)
        var = t.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-12) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    i, j, f, o = gates.chunk(4, 1)
    i, j, f, o = (ln(t, cell.gate_gamma[k], cell.gate_beta[k]) for k, t in enumerate((i, j, f, o)))
    c_new = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(j)
    c_new = ln(c_new, cell.cell_gamma, cell.cell_beta)
    out = torch.tanh(c_new) * torch.sigmoid(o) + x
    return out, c_new


# --------------------------------------------------------------------------- factory and shapes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_zero_state(kind, device):
    cell = build_cell(kind, 6, 6, bottleneck=4).to(device)
    assert isinstance(cell, CELL_CLASSES[kind]) and cell.kind == kind
    x = rand(2, 6, 7, 9).to(device)
    out, (h, c) = cell(x)  # state=None: zeros, no flow needed
    assert out.shape == h.shape == c.shape == (2, 6, 7, 9)
    assert out.device.type == device and torch.equal(out, h)
    zeros = torch.zeros(2, 6, 7, 9, device=device)
    explicit = cell(x, (zeros, zeros), flow=torch.zeros(2, 7, 9, 2, device=device)) if kind == "flow" else cell(
        x, (zeros, zeros)
    )
    torch.testing.assert_close(explicit[0], out)
    extra = {"flow": rand(2, 7, 9, 2, seed=1).to(device)} if kind == "flow" else {}
    out2, (h2, c2) = cell(rand(2, 6, 7, 9, seed=2).to(device), (h, c), **extra)
    assert out2.shape == c2.shape == (2, 6, 7, 9)
    assert torch.isfinite(out2).all() and torch.isfinite(c2).all()


def test_different_in_and_hidden_channels_use_skip_projection():
    cell = build_cell("warp", 5, 3, bottleneck=4)
    assert cell.skip_proj is not None
    out, (h, c) = cell(rand(2, 5, 6, 6))
    assert out.shape == (2, 3, 6, 6)
    out, _ = cell(rand(2, 5, 6, 6, seed=1), (h, c))
    assert out.shape == (2, 3, 6, 6)
    assert build_cell("conv", 4, 4).skip_proj is None


def test_build_cell_errors():
    with pytest.raises(ValueError, match="unknown cell kind"):
        build_cell("gru", 4, 4)
    with pytest.raises(ValueError, match="unknown option"):
        build_cell("conv", 4, 4, grid=3)
    with pytest.raises(ValueError, match="unknown option"):
        build_cell("warp", 4, 4, links=5)
    with pytest.raises(ValueError, match="in_channels"):
        build_cell("conv", 0, 4)
    with pytest.raises(ValueError, match="order"):
        build_cell("warp", 4, 4, order=0)
    with pytest.raises(ValueError, match="offset_init"):
        build_cell("warp", 4, 4, offset_init="normal")
    with pytest.raises(ValueError, match="links"):
        build_cell("traj", 4, 4, links=0)
    cell = build_cell("conv", 4, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, 4, H, W\]"):
        cell(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="state tensors"):
        cell(torch.zeros(1, 4, 5, 5), (torch.zeros(1, 4, 5, 4), torch.zeros(1, 4, 5, 5)))
    with pytest.raises(ValueError, match="tuple"):
        cell(torch.zeros(1, 4, 5, 5), torch.zeros(1, 4, 5, 5))


def test_cell_options_from_presets():
    paper = preset("paper").model
    assert cell_options(paper, "warp") == {"bottleneck": 128, "grid": 3, "order": 2, "num_boundary_points": 4,
                                           "max_offset": 0.0}
    assert cell_options(paper, "traj") == {"bottleneck": 128, "links": 5}
    assert cell_options(paper, "conv") == {"bottleneck": 128}
    assert cell_options(paper, "flow") == {"bottleneck": 128}
    cpu = preset("cpu").model
    cell = build_cell(cpu.cell, cpu.backbone_channels, cpu.backbone_channels, **cell_options(cpu))
    assert isinstance(cell, WarpLSTMCell) and cell.bottleneck == 32 and cell.order == 2


def test_paper_parameter_count():
    # official: depthwise 2048*9, pointwise 2048*128+128, 1x1 128*4096+4096, 5 LNs x 2*1024
    conv = build_cell("conv", 1024, 1024)
    assert sum(p.numel() for p in conv.parameters()) == 18432 + 262272 + 528384 + 10240
    warp = build_cell("warp", 1024, 1024)
    assert sum(p.numel() for p in warp.parameters()) == 819328 + 2048 * 2 + 2


# --------------------------------------------------------------------------- ConvLSTM
def test_conv_cell_matches_official_equations():
    torch.manual_seed(0)
    cell = build_cell("conv", 4, 4, bottleneck=3).double()
    randomize_norms(cell)
    x, h, c = rand(2, 4, 5, 6, dtype=torch.float64), rand(2, 4, 5, 6, seed=1, dtype=torch.float64), rand(
        2, 4, 5, 6, seed=2, dtype=torch.float64
    )
    out, (h_new, c_new) = cell(x, (h, c))
    ref_out, ref_c = reference_update(cell, x, h, c)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_new, ref_c, rtol=0, atol=1e-12)
    assert h_new is out  # the hidden state includes the skip


def test_conv_cell_init_and_options():
    cell = build_cell("conv", 8, 8, bottleneck=4)
    assert cell.forget_bias == 1.0 and cell.layer_norm and cell.skip
    assert torch.equal(cell.gate_gamma, torch.ones(4, 8)) and torch.equal(cell.gate_beta, torch.zeros(4, 8))
    assert torch.equal(cell.pointwise.bias, torch.zeros(4)) and cell.depthwise.bias is None
    bound = (6.0 / (8 * 1 + 4 * 1)) ** 0.5  # Glorot uniform of the 1x1 pointwise conv
    assert cell.pointwise.weight.abs().max() <= bound
    plain = build_cell("conv", 8, 8, bottleneck=4, layer_norm=False, skip=False, forget_bias=0.0)
    out, _ = plain(rand(1, 8, 4, 4))
    assert out.abs().max() < 1.0  # tanh(c) * sigmoid(o) without the skip


# --------------------------------------------------------------------------- warp LSTM
def test_control_point_grid():
    pts = control_point_grid(20, 20, 3)
    assert pts.tolist() == [[r, c] for r in (5.0, 10.0, 15.0) for c in (5.0, 10.0, 15.0)]
    assert control_point_grid(8, 8, 3).unique().tolist() == [2.0, 4.0, 6.0]
    assert control_point_grid(10, 12, 3).tolist()[:3] == [[2.5, 3.0], [2.5, 6.0], [2.5, 9.0]]
    assert control_point_grid(20, 20, 4).shape == (16, 2)


def test_untrained_warp_cell_equals_conv_cell():
    torch.manual_seed(0)
    conv = build_cell("conv", 6, 6, bottleneck=4)
    randomize_norms(conv)
    warp = build_cell("warp", 6, 6, bottleneck=4)
    missing, unexpected = warp.load_state_dict(conv.state_dict(), strict=False)
    assert sorted(missing) == ["offset.bias", "offset.weight"] and not unexpected
    state_w = state_c = None
    for t in range(3):
        x = rand(2, 6, 10, 10, seed=t)
        out_c, state_c = conv(x, state_c)
        out_w, state_w = warp(x, state_w)
        assert torch.equal(out_w, out_c) and torch.equal(state_w[1], state_c[1])
        assert torch.equal(warp.last_offsets, torch.zeros(2, 9, 2))
    assert torch.equal(warp.last_dense_flow, torch.zeros(2, 10, 10, 2))


def test_warp_cell_warps_h_and_c_with_predicted_displacements():
    torch.manual_seed(0)
    cell = build_cell("warp", 4, 4, bottleneck=3).double()
    with torch.no_grad():
        cell.offset.bias.copy_(torch.tensor([1.0, -1.0]))
    x, h, c = (rand(2, 4, 20, 20, seed=s, dtype=torch.float64) for s in range(3))
    out, (_, c_new) = cell(x, (h, c))
    assert cell.control_points.tolist() == control_point_grid(20, 20, 3).tolist()
    torch.testing.assert_close(cell.last_offsets, torch.tensor([1.0, -1.0], dtype=torch.float64).expand(2, 9, 2))
    src = control_point_grid(20, 20, 3, dtype=torch.float64).expand(2, 9, 2)
    (hw, cw), flow = warp_states((h, c), src, src + torch.tensor([1.0, -1.0], dtype=torch.float64), 2, 4)
    torch.testing.assert_close(cell.last_dense_flow, flow, rtol=0, atol=0)
    # the flow is fitted at the destinations: (6, 4), (6, 9), ... carry (1, -1)
    torch.testing.assert_close(flow[:, 6, 9], torch.tensor([1.0, -1.0], dtype=torch.float64).expand(2, 2))
    ref_out, ref_c = cell.update(x, hw, cw)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_new, ref_c, rtol=0, atol=1e-12)


def test_warp_cell_order_option_and_zero_state():
    x, h, c = (rand(1, 3, 12, 12, seed=s) for s in range(3))
    flows = {}
    for order in (1, 2):
        cell = build_cell("warp", 3, 3, bottleneck=2, order=order, offset_init="glorot")
        torch.manual_seed(0)
        torch.nn.init.normal_(cell.offset.weight, std=0.5)
        _, _ = cell(x)
        assert cell.last_dense_flow is None and cell.last_offsets.shape == (1, 9, 2)
        cell(x, (h, c))
        src = control_point_grid(12, 12, 3).unsqueeze(0)
        expected = spline_dense_flow(src, src + cell.last_offsets, 12, 12, order, 0.0, 4)
        torch.testing.assert_close(cell.last_dense_flow, expected)
        flows[order] = cell.last_dense_flow
    assert (flows[1] - flows[2]).abs().max() > 1e-3
    glorot = build_cell("warp", 3, 3, offset_init="glorot")
    glorot(x, (h, c))
    assert glorot.last_offsets.abs().max() > 0


def test_warp_cell_samples_non_integer_control_points_bilinearly():
    cell = build_cell("warp", 2, 2, bottleneck=2)
    with torch.no_grad():
        cell.offset.weight.zero_()
        cell.offset.weight[0, 0] = 1.0  # dy = x channel 0 at the control point
        cell.offset.weight[1, 2] = 1.0  # dx = h channel 0
    x, h = rand(2, 2, 10, 10), rand(2, 2, 10, 10, seed=1)
    pts, off = cell.predict_offsets(x, h)
    assert pts.tolist()[0] == [2.5, 2.5]
    # bilinear reference via grid_sample (align_corners=True, pixel units)
    grid = torch.stack([pts[:, 1] / 4.5 - 1, pts[:, 0] / 4.5 - 1], -1).view(1, 1, -1, 2).expand(2, -1, -1, -1)
    ref_x = F.grid_sample(x[:, :1], grid, align_corners=True).view(2, -1)
    ref_h = F.grid_sample(h[:, :1], grid, align_corners=True).view(2, -1)
    torch.testing.assert_close(off[..., 0], ref_x)
    torch.testing.assert_close(off[..., 1], ref_h)


# --------------------------------------------------------------------------- TrajLSTM
def test_traj_cell_structure_and_zero_init():
    cell = build_cell("traj", 4, 4, bottleneck=3)
    assert isinstance(cell, TrajLSTMCell) and cell.links == 5 and cell.traj_channels == 32
    assert cell.traj_x.kernel_size == (5, 5) and cell.traj_out.out_channels == 10
    assert cell.combine.in_channels == 20 and cell.combine.out_channels == 4
    cell(rand(2, 4, 6, 6), (rand(2, 4, 6, 6, seed=1), rand(2, 4, 6, 6, seed=2)))
    assert cell.last_flows.shape == (2, 5, 2, 6, 6)
    assert torch.equal(cell.last_flows, torch.zeros(2, 5, 2, 6, 6))


def test_traj_cell_warps_hidden_with_zero_padding():
    cell = build_cell("traj", 3, 3, bottleneck=2, links=2).double()
    with torch.no_grad():
        cell.traj_out.bias.copy_(torch.tensor([0.0, 2.0, 1.0, 0.0]))  # link 0: dx=2, link 1: dy=1
        w = torch.zeros(3, 6, 1, 1, dtype=torch.float64)
        for ch in range(3):
            w[ch, 2 * ch, 0, 0] = 1.0  # channel c*L + 0: h warped along link 0
            w[ch, 2 * ch + 1, 0, 0] = 10.0  # channel c*L + 1: link 1
        cell.combine.weight.copy_(w)
    x, h, c = (rand(2, 3, 5, 6, seed=s, dtype=torch.float64) for s in range(3))
    out, (_, c_new) = cell(x, (h, c))
    link0 = torch.zeros_like(h)
    link0[..., 2:] = h[..., :-2]  # content moves right by 2, zeros enter (TrajGRU padding)
    link1 = torch.zeros_like(h)
    link1[..., 1:, :] = h[..., :-1, :]
    ref_out, ref_c = cell.update(x, link0 + 10.0 * link1, c)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_new, ref_c, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- flow-warped LSTM
def test_flow_cell_warps_state_by_given_flow():
    torch.manual_seed(0)
    conv = build_cell("conv", 3, 3, bottleneck=2).double()
    cell = build_cell("flow", 3, 3, bottleneck=2).double()
    assert isinstance(cell, FlowLSTMCell)
    cell.load_state_dict(conv.state_dict())
    x, h, c = (rand(2, 3, 6, 7, seed=s, dtype=torch.float64) for s in range(3))
    zero = torch.zeros(2, 6, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(cell(x, (h, c), flow=zero)[0], conv(x, (h, c))[0], rtol=0, atol=0)
    flow = torch.zeros(2, 6, 7, 2, dtype=torch.float64)
    flow[..., 0] = 1.0  # content moves down one cell
    out, (_, c_new) = cell(x, (h, c), flow=flow)
    shifted = lambda t: torch.cat([t[..., :1, :], t[..., :-1, :]], -2)  # noqa: E731 (border replication)
    ref_out, ref_c = cell.update(x, shifted(h), shifted(c))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_new, ref_c, rtol=0, atol=1e-12)
    frac = rand(2, 6, 7, 2, seed=5, dtype=torch.float64)
    out, _ = cell(x, (h, c), flow=frac)
    ref_out, _ = cell.update(x, dense_image_warp(h, frac), dense_image_warp(c, frac))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs flow"):
        cell(x, (h, c))
    with pytest.raises(ValueError, match="flow must be"):
        cell(x, (h, c), flow=torch.zeros(2, 7, 6, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("kind", KINDS)
def test_cell_gradcheck(kind):
    torch.manual_seed(0)
    opts = {"bottleneck": 3}
    if kind == "traj":
        opts.update(links=2, traj_channels=2)
    cell = build_cell(kind, 3, 2, **opts).double()
    randomize_norms(cell)
    # generic (non-integer) displacements: bilinear sampling is not differentiable
    # exactly on pixel centres
    name = {"warp": "offset.weight", "traj": "traj_out.weight"}.get(kind)
    names = ["pointwise.weight", "gate_gamma"] + ([name] if name else [])
    params = {n: p.detach().clone() for n, p in cell.named_parameters() if n in names}
    if name:
        params[name] = rand(*params[name].shape, dtype=torch.float64, seed=7, scale=0.3)
    x, h, c = (rand(1, d, 6, 6, dtype=torch.float64, seed=s).requires_grad_() for s, d in ((1, 3), (2, 2), (3, 2)))
    inputs = [x, h, c] + [p.requires_grad_() for p in params.values()]
    flow = rand(1, 6, 6, 2, dtype=torch.float64, seed=4, scale=0.7).requires_grad_()
    if kind == "flow":
        inputs.append(flow)

    def fn(x, h, c, *rest):
        ps = dict(zip(params, rest[: len(params)]))
        extra = {"flow": rest[len(params)]} if kind == "flow" else {}
        out, (_, c_new) = torch.func.functional_call(cell, ps, (x, (h, c)), extra)
        return out, c_new

    assert torch.autograd.gradcheck(fn, tuple(inputs))


# --------------------------------------------------------------------------- optical flow helper
def translating_clips(size=128, velocity=(1.0, 2.0), seed=0):
    """Two consecutive 8-frame clips [1, 2, 3, 8, S, S] of a smooth texture moving by
    ``velocity`` pixels per frame (content moves down/right for positive values)."""
    rng = np.random.default_rng(seed)
    pad = 64
    big = gaussian_filter(rng.standard_normal((3, size + 2 * pad, size + 2 * pad)), sigma=(0, 2.5, 2.5))
    big = big / np.abs(big).max()
    frames = []
    for t in range(16):
        oy, ox = int(pad - t * velocity[0]), int(pad - t * velocity[1])
        frames.append(big[:, oy : oy + size, ox : ox + size])
    clips = torch.from_numpy(np.stack(frames, 1)).float()  # [3, 16, S, S]
    return clips.view(3, 2, 8, size, size).permute(1, 0, 2, 3, 4).unsqueeze(0)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_clip_flow_translation_at_feature_scale(method):
    clips = translating_clips()
    flow = clip_flow(clips[:, 0], clips[:, 1], 8, method=method)  # 128 px -> 8x8 map, stride 16
    assert flow.shape == (1, 8, 8, 2) and flow.dtype == torch.float32
    # 8 frames x (1, 2) px per frame = (8, 16) px = (0.5, 1.0) feature cells
    interior = flow[0, 1:-1, 1:-1].reshape(-1, 2)
    torch.testing.assert_close(interior.median(0).values, torch.tensor([0.5, 1.0]), rtol=0, atol=0.1)
    assert (interior - torch.tensor([0.5, 1.0])).abs().max() < 0.25


def test_clip_flow_zero_without_previous_and_errors():
    clip = torch.zeros(2, 3, 8, 32, 32)
    assert torch.equal(clip_flow(None, clip, (2, 3)), torch.zeros(2, 2, 3, 2))
    static = translating_clips(size=64, velocity=(0.0, 0.0))
    assert clip_flow(static[:, 0], static[:, 1], 4).abs().max() < 0.05
    with pytest.raises(ValueError, match="method"):
        clip_flow(clip, clip, 2, method="lk")
    with pytest.raises(ValueError, match="clip must be"):
        clip_flow(None, torch.zeros(2, 8, 32, 32), 2)
    with pytest.raises(ValueError, match="previous_clip"):
        clip_flow(torch.zeros(2, 3, 8, 16, 16), clip, 2)


# --------------------------------------------------------------------------- learnability
MAP, STEPS, VELOCITY, SIGMA = 16, 5, (1.0, 2.0), 1.2


def blob_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, STEPS, 1, MAP, MAP]``: a Gaussian blob moving (1, 2) cells per step."""
    span = ((STEPS - 1) * VELOCITY[0], (STEPS - 1) * VELOCITY[1])
    y0 = 2 + torch.rand(n, generator=generator) * (MAP - 5 - span[0])
    x0 = 2 + torch.rand(n, generator=generator) * (MAP - 5 - span[1])
    ys = torch.arange(MAP).float().view(1, 1, MAP, 1)
    xs = torch.arange(MAP).float().view(1, 1, 1, MAP)
    t = torch.arange(STEPS).float().view(1, STEPS, 1, 1)
    cy = y0.view(n, 1, 1, 1) + t * VELOCITY[0]
    cx = x0.view(n, 1, 1, 1) + t * VELOCITY[1]
    return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * SIGMA**2)).unsqueeze(2)


class NextFramePredictor(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = build_cell(kind, 1, 8, bottleneck=8)
        self.head = torch.nn.Conv2d(8, 1, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        state, preds = None, []
        for t in range(seq.shape[1] - 1):
            out, state = self.cell(seq[:, t], state)
            preds.append(self.head(out))
        return torch.stack(preds, 1)


def train_predictor(kind: str, seed: int, steps: int = 150):
    torch.manual_seed(seed)
    init = NextFramePredictor("conv").state_dict()
    net = NextFramePredictor(kind)
    net.load_state_dict(init, strict=False)  # same start; the warp predictor starts at zero
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        seq = blob_sequences(16, g)
        # step 0 has no state to warp: score the predictions made from step 1 on
        loss = F.mse_loss(net(seq)[:, 1:], seq[:, 2:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = blob_sequences(64, torch.Generator().manual_seed(seed + 999))
    with torch.no_grad():
        return F.mse_loss(net(test)[:, 1:], test[:, 2:]).item(), net


@pytest.mark.slow
def test_warp_cell_learns_motion_better_than_conv_cell():
    # Motion of 2 cells per step is out of reach of the ConvLSTM's 3x3 gates; the
    # warp cell can move its state. Checked locally with seeds 0-5: warp/conv loss
    # ratio 0.3-0.65.
    conv_loss, _ = train_predictor("conv", seed=0)
    warp_loss, net = train_predictor("warp", seed=0)
    assert warp_loss < 0.8 * conv_loss, (warp_loss, conv_loss)
    # the learned displacements point along the motion (down and right)
    mean_offset = net.cell.last_offsets.mean(dim=(0, 1))
    assert mean_offset[0] > 0.1 and mean_offset[1] > 0.3, mean_offset


@pytest.mark.parametrize("kind", KINDS)
def test_every_cell_takes_one_signature_with_context(kind):
    """cell(x, state=None, context=None): the flow cell reads context["flow"] (or flow=),
    the others ignore the context; context_keys names what a cell reads."""
    torch.manual_seed(0)
    cell = build_cell(kind, 3, 4, bottleneck=2).double()
    x = rand(2, 3, 6, 7, seed=1, dtype=torch.float64)
    _, state = cell(x, None, None)
    flow = rand(2, 6, 7, 2, seed=2, dtype=torch.float64)
    by_context, _ = cell(x, state, {"flow": flow})
    by_keyword, _ = cell(x, state, flow=flow)
    torch.testing.assert_close(by_context, by_keyword, rtol=0, atol=0)
    assert cell.context_keys == (("flow",) if kind == "flow" else ())
    if kind != "flow":
        torch.testing.assert_close(by_context, cell(x, state)[0], rtol=0, atol=0)


def test_clip_flow_lives_with_the_data_and_sequence_flows():
    from stvr.data import flow as data_flow

    assert clip_flow is data_flow.clip_flow
    clips = torch.zeros(2, 3, 3, 4, 32, 32)   # [B, L, 3, T, S, S], static
    flows = data_flow.sequence_flows(clips, None, 2)
    assert flows.shape == (2, 3, 2, 2, 2) and flows.abs().max() < 0.05
    assert torch.equal(flows[:, 0], torch.zeros(2, 2, 2, 2))


def test_warp_cell_survives_coinciding_control_points(caplog):
    """Predicted destinations that coincide make the unregularized spline singular: the cell
    fits that step with a small regularization (and says so once) instead of raising."""
    import logging

    from stvr.recurrent import build_cell

    torch.manual_seed(0)
    cell = build_cell("warp", 4, 4, bottleneck=4, grid=3)
    x = torch.randn(2, 4, 12, 12)
    _, state = cell(x)
    pts, _ = cell.predict_offsets(x, state[0])
    # move every control point onto the first one: offsets = pts[0] - pts
    with torch.no_grad():
        cell.offset.weight.zero_()
    target = (pts[0] - pts)                                   # [N, 2]

    def fixed(xx, hh):
        return pts, target.expand(xx.shape[0], -1, -1).clone()

    cell.predict_offsets = fixed
    with caplog.at_level(logging.WARNING, logger="stvr.recurrent"):
        out, (h, c) = cell(x, state)
        out2, _ = cell(x, state)
    assert torch.isfinite(out).all() and torch.isfinite(c).all()
    assert sum("coincide" in r.getMessage() for r in caplog.records) == 1


def test_warp_cell_max_offset_bounds_the_displacements_softly():
    torch.manual_seed(0)
    x, h, c = (rand(2, 4, 20, 20, seed=s, dtype=torch.float64) for s in range(3))
    free = build_cell("warp", 4, 4, bottleneck=3).double()
    bound = build_cell("warp", 4, 4, bottleneck=3, max_offset=1.5).double()
    bound.load_state_dict(free.state_dict())
    for raw in ([0.0, 0.0], [0.01, -0.02], [3.0, -6.0]):
        with torch.no_grad():
            for cell in (free, bound):
                cell.offset.bias.copy_(torch.tensor(raw))
        free(x, (h, c))
        bound(x, (h, c))
        r = torch.tensor(raw, dtype=torch.float64).expand(2, 9, 2)
        torch.testing.assert_close(free.last_offsets, r)
        torch.testing.assert_close(bound.last_offsets, 1.5 * torch.tanh(r / 1.5))
    assert bound.last_offsets.abs().max() < 1.5
    # identity to first order at zero: zero-initialized, the bounded cell is still a ConvLSTM
    assert "max_offset=1.5" in repr(bound)
    with pytest.raises(ValueError, match="max_offset"):
        build_cell("warp", 4, 4, max_offset=-1.0)
