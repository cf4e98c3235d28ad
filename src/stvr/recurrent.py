"""Recurrent cells that propagate reference features from clip to clip.

Four cells share one LSTM update (the official ConvLSTM design, reference-facts
section 5, steps 5-11, commit 04780188) and differ only in what they do to the
previous state before it:

- ``"conv"``  :class:`ConvLSTMCell`  -- nothing (the ConvLSTM baseline).
- ``"warp"``  :class:`WarpLSTMCell`  -- warp h and c with a polyharmonic spline
  through a few predicted control-point displacements (paper Eq. 4).
- ``"traj"``  :class:`TrajLSTMCell`  -- TrajGRU's structure-generating network:
  L predicted dense flows, h warped along each, recombined by a 1x1 conv.
- ``"flow"``  :class:`FlowLSTMCell`  -- warp h and c by a given dense optical
  flow (see :func:`stvr.data.flow.clip_flow`).

Every cell is called as ``cell(x, state=None, context=None, **extra) -> (output, state)``
with ``x`` ``[B, C_in, H, W]``, ``output`` ``[B, hidden, H, W]`` and ``state`` the
tuple ``(h, c)``, both ``[B, hidden, H, W]`` (``state=None`` starts from zeros).
``context`` is a dict of per-step inputs besides the features; keyword ``extra``
arguments join it (``cell(x, state, flow=f)`` = ``cell(x, state, {"flow": f})``). A
cell names the keys it reads in ``context_keys`` (the flow cell: ``("flow",)``, a
flow ``[B, H, W, 2]``, see :mod:`stvr.data.flow`); the others ignore the context.
Build one by name with :func:`build_cell`.

Displacements and flows are always in feature-map cells, channel 0 = dy (rows),
channel 1 = dx (columns).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CELL_KINDS
from .data.flow import clip_flow  # noqa: F401  (moved to stvr.data.flow; kept importable here)

log = logging.getLogger(__name__)

#: spline regularization of a warp step whose predicted control points coincide (else singular)
SINGULAR_REGULARIZATION = 1e-3

__all__ = [
    "ConvLSTMCell",
    "WarpLSTMCell",
    "TrajLSTMCell",
    "FlowLSTMCell",
    "CELL_CLASSES",
    "build_cell",
    "cell_options",
    "control_point_grid",
    "clip_flow",
]

State = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- helpers


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _glorot_(module: nn.Module) -> None:
    """Slim defaults: Glorot-uniform weights, zero biases, for every conv/linear inside."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def control_point_grid(height: int, width: int, grid: int = 3, device=None, dtype=None) -> Tensor:
    """Control-point positions of the warp cell, ``[grid * grid, 2]`` (row, col).

    The points sit on ``grid`` evenly spaced interior lines of the map, rows at
    ``(i + 1) * height / (grid + 1)`` and columns likewise, in row-major order
    (20x20, grid 3 -> rows/cols 5, 10, 15, as in the official code; 8x8 -> 2, 4, 6).
    Units: feature cells. Non-integer positions are kept as they are.
    """
    grid = _check_positive_int("grid", grid)
    rows = torch.arange(1, grid + 1, dtype=torch.float64) * (height / (grid + 1))
    cols = torch.arange(1, grid + 1, dtype=torch.float64) * (width / (grid + 1))
    pts = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return pts.to(device=device, dtype=dtype or torch.get_default_dtype())


def _point_taps(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor | None]:
    """Bilinear taps of ``points`` ``[N, 2]`` (row, col; clamped to the map) on a
    flattened ``H x W`` map: indices ``[N]`` and no weights when every point is on a
    pixel, else indices ``[4 * N]`` (tap-major) and weights ``[4 * N]``."""
    y = points[:, 0].double().clamp(0, height - 1)
    x = points[:, 1].double().clamp(0, width - 1)
    y0, x0 = y.floor(), x.floor()
    wy, wx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    if not bool((wy != 0).any() or (wx != 0).any()):
        return y0 * width + x0, None
    y1 = (y0 + 1).clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    idx = torch.cat([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1])
    w = torch.cat([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    return idx, w


def _sample_points(feat: Tensor, idx: Tensor, weights: Tensor | None) -> Tensor:
    """``feat`` ``[B, C, H, W]`` sampled at the taps of :func:`_point_taps` -> ``[B, C, N]``
    (exact copies at integer positions)."""
    taps = feat.flatten(2).index_select(2, idx)
    if weights is None:
        return taps
    B, C, _ = taps.shape
    return (taps.view(B, C, 4, -1) * weights.to(feat.dtype).view(4, -1)).sum(2)


def _warp_module():
    from . import warp  # imported lazily: the conv and traj cells do not need it

    return warp


# --------------------------------------------------------------------------- ConvLSTM


class ConvLSTMCell(nn.Module):
    """The official ConvLSTM cell (reference-facts section 5 steps 1, 5-11; commit 04780188).

    With ``z = concat(x, h_prev)`` (``C_in + hidden`` channels):

    1. depthwise 3x3 (SAME, no bias) + pointwise 1x1 -> ``bottleneck`` channels (+bias),
       no activation; 1x1 -> ``4 * hidden`` (+bias); split into (i, j, f, o);
    2. LayerNorm of each of i, j, f, o over (C, H, W) per sample (eps 1e-12), then a
       per-channel gamma/beta (init 1/0);
    3. ``c = sigmoid(f + forget_bias) * c_prev + sigmoid(i) * tanh(j)``; ``c = LN(c)``
       (own gamma/beta; the normalized cell is the stored state);
    4. ``out = tanh(c) * sigmoid(o)``; skip: ``out = out + x``; next state ``(out, c)``.

    The candidate uses tanh as in the official code (the paper writes sigmoid).
    When ``in_channels != hidden_channels`` the skip adds a learned 1x1 projection
    of x (no bias) instead of x itself (the official cell always had equal sizes).
    Weights are Glorot-uniform, biases zero (TF-slim defaults).

    Args:
        in_channels: C_in of the input map ``x``.
        hidden_channels: channels of h, c and of the output.
        bottleneck: gate bottleneck channels (official 128).
        forget_bias: added to the forget gate after its LayerNorm (official 1.0).
        layer_norm: LayerNorm on the four gates and on the cell (official True).
        skip: additive skip of the input into the output/hidden state (official True).

    Call: ``cell(x [B, C_in, H, W], state=None) -> (out [B, hidden, H, W], (h, c))``.
    """

    kind = "conv"
    context_keys: tuple[str, ...] = ()   # the context entries the cell reads

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        bottleneck: int = 128,
        forget_bias: float = 1.0,
        layer_norm: bool = True,
        skip: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.hidden_channels = _check_positive_int("hidden_channels", hidden_channels)
        self.bottleneck = _check_positive_int("bottleneck", bottleneck)
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)) or not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        if not isinstance(layer_norm, bool):
            raise ValueError(f"layer_norm must be a bool, got {layer_norm!r}")
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be a bool, got {skip!r}")
        self.forget_bias = float(forget_bias)
        self.layer_norm = layer_norm
        self.skip = skip

        z = self.in_channels + self.hidden_channels
        hid = self.hidden_channels
        self.depthwise = nn.Conv2d(z, z, 3, padding=1, groups=z, bias=False)
        self.pointwise = nn.Conv2d(z, self.bottleneck, 1)
        self.expand = nn.Conv2d(self.bottleneck, 4 * hid, 1)
        if layer_norm:
            self.gate_gamma = nn.Parameter(torch.ones(4, hid))
            self.gate_beta = nn.Parameter(torch.zeros(4, hid))
            self.cell_gamma = nn.Parameter(torch.ones(hid))
            self.cell_beta = nn.Parameter(torch.zeros(hid))
        self.skip_proj = (
            nn.Conv2d(self.in_channels, hid, 1, bias=False) if skip and self.in_channels != hid else None
        )
        _glorot_(self)

    # -- shared pieces ---------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )

    def _init_state(self, x: Tensor, state: State | None) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        B, _, H, W = x.shape
        shape = (B, self.hidden_channels, H, W)
        if state is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"{type(self).__name__}: state must be a tuple (h, c) or None")
        h, c = state
        if tuple(h.shape) != shape or tuple(c.shape) != shape:
            raise ValueError(
                f"{type(self).__name__}: state tensors must be {list(shape)}, "
                f"got h {list(h.shape)} and c {list(c.shape)}"
            )
        return h, c

    def update(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """The LSTM update from input ``x`` and (possibly warped) ``h``, ``c``;
        returns ``(out, c_new)``, both ``[B, hidden, H, W]``."""
        B, _, H, W = x.shape
        hid = self.hidden_channels
        z = torch.cat([x, h], dim=1)
        gates = self.expand(self.pointwise(self.depthwise(z)))
        gates = gates.view(B, 4, hid, H, W)
        if self.layer_norm:
            gates = F.layer_norm(gates, (hid, H, W), eps=1e-12)
            gates = torch.addcmul(
                self.gate_beta.view(1, 4, hid, 1, 1), gates, self.gate_gamma.view(1, 4, hid, 1, 1)
            )
        i, j, f, o = gates.unbind(1)
        c_new = torch.sigmoid(f + self.forget_bias) * c + torch.sigmoid(i) * torch.tanh(j)
        if self.layer_norm:
            c_new = F.layer_norm(c_new, (hid, H, W), eps=1e-12)
            c_new = torch.addcmul(self.cell_beta.view(1, hid, 1, 1), c_new, self.cell_gamma.view(1, hid, 1, 1))
        out = torch.tanh(c_new) * torch.sigmoid(o)
        if self.skip:
            out = out + (x if self.skip_proj is None else self.skip_proj(x))
        return out, c_new

    def forward(self, x: Tensor, state: State | None = None, context: dict[str, Any] | None = None,
                **extra: Any) -> tuple[Tensor, State]:
        h, c = self._init_state(x, state)
        out, c = self.update(x, h, c)
        return out, (out, c)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.hidden_channels}, bottleneck={self.bottleneck}, "
            f"forget_bias={self.forget_bias}, layer_norm={self.layer_norm}, skip={self.skip}"
        )


# --------------------------------------------------------------------------- warp LSTM


class WarpLSTMCell(ConvLSTMCell):
    """Warp LSTM (paper Eq. 4; reference-facts section 5): a ConvLSTM whose previous
    h and c are first warped by a thin-plate (polyharmonic) spline.

    - Control points (source): ``grid x grid`` points on evenly spaced interior lines,
      see :func:`control_point_grid` (20x20 -> rows/cols 5, 10, 15).
    - Displacements: a 1x1 conv on ``concat(x, h_prev)`` evaluated only at the control
      points, implemented as a :class:`~torch.nn.Linear` on the gathered control-point
      feature vectors (identical, and it never computes the full map). Non-integer
      control positions (map size not divisible by ``grid + 1``) are sampled
      bilinearly. Units: feature cells, channel 0 = dy, 1 = dx; ``dest = source +
      displacement``. The official code parametrises this 1x1 conv as a depthwise
      1x1 scale times a pointwise 1x1 (the same function class).
    - ``max_offset`` m > 0 bounds the displacements softly, ``m * tanh(d / m)`` (cells; not in
      the official code, whose 0 = unbounded is the default).
    - ``offset_init="zero"`` (default) starts the predictor at zero weight and bias, so
      an untrained warp cell computes exactly a ConvLSTM; ``"glorot"`` is the official
      Glorot-uniform init (non-zero initial offsets). Training from zero works because
      ``stvr.warp`` passes the one-sided bilinear derivative at zero flow (TF's is 0).
    - Warp: ``stvr.warp`` sparse image warp of h and c together (one spline fit, one
      bilinear resampling, border-clamped), ``order`` (2 = r^2 log r, 1 = r),
      ``num_boundary_points`` k -> 4k zero-flow points on the border (official 4),
      regularization 0.
    - Then the ConvLSTM update of :class:`ConvLSTMCell` on the warped state.

    With ``state=None`` the zero state is not warped (warping zeros gives zeros).

    Visualization (attributes, detached, refreshed by every call):
    ``cell.control_points`` ``[N, 2]`` buffer (row, col) of the last map size;
    ``cell.last_offsets`` ``[B, N, 2]`` predicted displacements (dy, dx);
    ``cell.last_dense_flow`` ``[B, H, W, 2]`` the interpolated flow applied to the state
    (output p sampled the old state at ``p - flow(p)``), ``None`` when the state was None.
    """

    kind = "warp"

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        bottleneck: int = 128,
        forget_bias: float = 1.0,
        layer_norm: bool = True,
        skip: bool = True,
        grid: int = 3,
        order: int = 2,
        num_boundary_points: int = 4,
        offset_init: str = "zero",
        max_offset: float = 0.0,
    ) -> None:
        super().__init__(in_channels, hidden_channels, bottleneck, forget_bias, layer_norm, skip)
        if isinstance(max_offset, bool) or not isinstance(max_offset, (int, float)) \
                or not math.isfinite(max_offset) or max_offset < 0:
            raise ValueError(f"max_offset must be a finite number >= 0, got {max_offset!r}")
        self.max_offset = float(max_offset)
        self.grid = _check_positive_int("grid", grid)
        self.order = _check_positive_int("order", order)
        self.num_boundary_points = _check_positive_int("num_boundary_points", num_boundary_points, minimum=0)
        if offset_init not in ("zero", "glorot"):
            raise ValueError(f"offset_init must be 'zero' or 'glorot', got {offset_init!r}")
        self.offset_init = offset_init
        self.offset = nn.Linear(self.in_channels + self.hidden_channels, 2)
        if offset_init == "zero":
            nn.init.zeros_(self.offset.weight)
        else:
            nn.init.xavier_uniform_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.register_buffer("control_points", torch.zeros(0, 2), persistent=False)
        self._cp_key: tuple | None = None
        self._cp_taps: tuple[Tensor, Tensor | None] = (torch.zeros(0, dtype=torch.long), None)
        self.last_offsets: Tensor | None = None
        self._warned_singular = False
        self.last_dense_flow: Tensor | None = None

    def _control_points(self, H: int, W: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Control points ``[N, 2]`` of an ``H x W`` map and their sampling taps (cached per size/device)."""
        key = (H, W, x.device)
        if self._cp_key != key or self.control_points.shape[0] != self.grid**2:
            pts = control_point_grid(H, W, self.grid, device=x.device, dtype=torch.float32)
            idx, w = _point_taps(pts, H, W)
            self.control_points = pts
            self._cp_taps = (idx.to(x.device), None if w is None else w.to(x.device))
            self._cp_key = key
        return (self.control_points,) + self._cp_taps

    def predict_offsets(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Control points ``[N, 2]`` and displacements ``[B, N, 2]`` (dy, dx, cells)
        predicted from ``x`` and the unwarped ``h``: the 1x1 conv evaluated at the
        control points only."""
        H, W = x.shape[-2:]
        pts, idx, w = self._control_points(H, W, x)
        feats = torch.cat([_sample_points(x, idx, w), _sample_points(h, idx, w)], dim=1)  # [B, C_in+hid, N]
        offsets = self.offset(feats.transpose(1, 2))
        if self.max_offset > 0:   # soft bound m * tanh(d / m): identity near 0, |d| < m
            offsets = self.max_offset * torch.tanh(offsets / self.max_offset)
        return pts, offsets

    def forward(self, x: Tensor, state: State | None = None, context: dict[str, Any] | None = None,
                **extra: Any) -> tuple[Tensor, State]:
        h, c = self._init_state(x, state)
        pts, offsets = self.predict_offsets(x, h)
        self.last_offsets = offsets.detach()
        if state is None:
            self.last_dense_flow = None
        else:
            src = pts.to(x.dtype).unsqueeze(0).expand_as(offsets)
            try:
                (h, c), flow = _warp_module().warp_states(
                    (h, c), src, src + offsets, order=self.order, num_boundary_points=self.num_boundary_points
                )
            except ValueError as err:
                # predicted destinations that (nearly) coincide make the official, unregularized
                # spline system singular (TF would return garbage); fit this step with a small
                # regularization instead of stopping a training run or an inference
                if "coincide" not in str(err):
                    raise
                if not self._warned_singular:
                    log.warning("warp LSTM: two predicted control points coincide; fitting the spline "
                                "with regularization %g for such steps", SINGULAR_REGULARIZATION)
                    self._warned_singular = True
                (h, c), flow = _warp_module().warp_states(
                    (h, c), src, src + offsets, order=self.order, num_boundary_points=self.num_boundary_points,
                    regularization_weight=SINGULAR_REGULARIZATION,
                )
            self.last_dense_flow = flow.detach()
        out, c = self.update(x, h, c)
        return out, (out, c)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", grid={self.grid}, order={self.order}, num_boundary_points={self.num_boundary_points}, "
            f"offset_init={self.offset_init!r}, max_offset={self.max_offset:g}"
        )


# --------------------------------------------------------------------------- TrajLSTM


def _grid_from_flow(flow_yx: Tensor) -> Tensor:
    """``flow_yx`` ``[B, 2, H, W]`` (dy, dx, cells) -> grid_sample grid ``[B, H, W, 2]``
    (normalized x, y, align_corners=True) sampling at ``p - flow(p)``. Needs H, W >= 2."""
    B, _, H, W = flow_yx.shape
    ys = torch.arange(H, device=flow_yx.device, dtype=flow_yx.dtype).view(1, H, 1)
    xs = torch.arange(W, device=flow_yx.device, dtype=flow_yx.dtype).view(1, 1, W)
    gy = (ys - flow_yx[:, 0]) * (2.0 / (H - 1)) - 1.0
    gx = (xs - flow_yx[:, 1]) * (2.0 / (W - 1)) - 1.0
    return torch.stack([gx, gy], dim=-1)


class TrajLSTMCell(ConvLSTMCell):
    """TrajLSTM baseline (paper section 6.1): TrajGRU's structure-generating network
    (reference-facts section 12) in front of the ConvLSTM update.

    - ``a = LeakyReLU_0.2(conv5x5(x -> traj_channels) + conv5x5(h_prev -> traj_channels))``
      (both with bias), ``flows = conv5x5(a -> 2 * links)``; the output conv starts at
      zero weight and bias (TrajGRU's INIT_GRID), i.e. identity warps at init. Link l
      uses channels (2l, 2l+1) = (dy, dx), feature cells.
    - ``h_prev`` is warped along each flow (output p samples ``p - flow_l(p)``,
      bilinear, ZERO outside the map as in TrajGRU and the paper's Fig. 7), the ``links``
      warped maps are concatenated and a 1x1 conv (no bias) maps them to ``hidden``
      channels (= the sum of TrajGRU's per-link 1x1 convs). That map replaces
      ``h_prev`` in the ConvLSTM update.
    - ``c_prev`` is not warped (the paper does not say; TrajGRU has no cell).
    Needs H, W >= 2.
    """

    kind = "traj"

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        bottleneck: int = 128,
        forget_bias: float = 1.0,
        layer_norm: bool = True,
        skip: bool = True,
        links: int = 5,
        traj_channels: int = 32,
    ) -> None:
        super().__init__(in_channels, hidden_channels, bottleneck, forget_bias, layer_norm, skip)
        self.links = _check_positive_int("links", links)
        self.traj_channels = _check_positive_int("traj_channels", traj_channels)
        self.traj_x = nn.Conv2d(self.in_channels, self.traj_channels, 5, padding=2)
        self.traj_h = nn.Conv2d(self.hidden_channels, self.traj_channels, 5, padding=2)
        self.traj_out = nn.Conv2d(self.traj_channels, 2 * self.links, 5, padding=2)
        self.combine = nn.Conv2d(self.links * self.hidden_channels, self.hidden_channels, 1, bias=False)
        for m in (self.traj_x, self.traj_h, self.combine):
            _glorot_(m)
        nn.init.zeros_(self.traj_out.weight)
        nn.init.zeros_(self.traj_out.bias)
        self.last_flows: Tensor | None = None

    def flows(self, x: Tensor, h: Tensor) -> Tensor:
        """The ``links`` flows ``[B, links, 2, H, W]`` (dy, dx, feature cells)."""
        a = F.leaky_relu(self.traj_x(x) + self.traj_h(h), 0.2)
        f = self.traj_out(a)
        return f.view(f.shape[0], self.links, 2, *f.shape[-2:])

    def forward(self, x: Tensor, state: State | None = None, context: dict[str, Any] | None = None,
                **extra: Any) -> tuple[Tensor, State]:
        h, c = self._init_state(x, state)
        B, _, H, W = x.shape
        flows = self.flows(x, h)
        self.last_flows = flows.detach()
        # All links in one grid_sample: grids stacked along the output rows, so the
        # result [B, hid, L*H, W] is the [B, hid*L, H, W] stack (channel = c*L + l).
        grid = _grid_from_flow(flows.reshape(B * self.links, 2, H, W)).view(B, self.links * H, W, 2)
        warped = F.grid_sample(h, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        h_comb = self.combine(warped.reshape(B, self.hidden_channels * self.links, H, W))
        out, c = self.update(x, h_comb, c)
        return out, (out, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", links={self.links}, traj_channels={self.traj_channels}"


# --------------------------------------------------------------------------- flow-warped LSTM


class FlowLSTMCell(ConvLSTMCell):
    """Optical-flow baseline (paper section 6.1): a ConvLSTM whose previous h and c
    are warped by a given dense flow before the update.

    Call: ``cell(x, state, {"flow": [B, H, W, 2]})`` or ``cell(x, state, flow=...)``;
    ``flow`` in feature cells, channel 0 = dy, 1 = dx, the motion from the previous
    clip to the current one at each position of the current map (e.g. from
    :func:`stvr.data.flow.clip_flow`). The state is warped
    with ``stvr.warp.dense_warp_states`` (h and c in one pass; output p samples the
    old state at ``p - flow(p)``, bilinear, border-clamped, = ``dense_image_warp``). A missing flow is an error unless
    ``state`` is None (the zero state needs no warp).
    """

    kind = "flow"

    context_keys = ("flow",)

    def forward(self, x: Tensor, state: State | None = None, context: dict[str, Any] | None = None,
                **extra: Any) -> tuple[Tensor, State]:
        flow = {**(context or {}), **extra}.get("flow")
        h, c = self._init_state(x, state)
        if state is not None:
            if flow is None:
                raise ValueError("FlowLSTMCell needs flow=[B, H, W, 2] whenever a state is given")
            B, _, H, W = x.shape
            if flow.dim() != 4 or tuple(flow.shape) != (B, H, W, 2):
                raise ValueError(f"FlowLSTMCell: flow must be [{B}, {H}, {W}, 2], got {tuple(flow.shape)}")
            # h and c share one packed table: one resampling pass for both
            h, c = _warp_module().dense_warp_states((h, c), flow.to(x.dtype))
        out, c = self.update(x, h, c)
        return out, (out, c)


# --------------------------------------------------------------------------- factory

# the kinds are named once, in stvr.config.CELL_KINDS ("none" = no cell, the Clip baseline);
# each class carries its kind
CELL_CLASSES: dict[str, type[ConvLSTMCell]] = {
    cls.kind: cls for cls in (ConvLSTMCell, WarpLSTMCell, TrajLSTMCell, FlowLSTMCell)}
if set(CELL_CLASSES) != set(CELL_KINDS) - {"none"}:
    raise ImportError(f"stvr.recurrent cell classes {sorted(CELL_CLASSES)} do not match "
                      f"stvr.config.CELL_KINDS {CELL_KINDS}")


def build_cell(kind: str, in_channels: int, hidden_channels: int, **options: Any) -> nn.Module:
    """Build a recurrent cell by name.

    ``kind``: "conv" | "warp" | "traj" | "flow". ``options`` are the keyword arguments
    of the class (:class:`ConvLSTMCell`: bottleneck, forget_bias, layer_norm, skip;
    warp adds grid, order, num_boundary_points, offset_init; traj adds links,
    traj_channels). Unknown kinds, unknown options and bad values raise ValueError.
    """
    if kind not in CELL_CLASSES:
        raise ValueError(f"unknown cell kind {kind!r}; choose one of {sorted(CELL_CLASSES)}")
    cls = CELL_CLASSES[kind]
    fixed = ("self", "in_channels", "hidden_channels")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in fixed]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for cell kind {kind!r}; allowed: {allowed}")
    return cls(in_channels, hidden_channels, **options)


def cell_options(model_config: Any, kind: str | None = None) -> dict[str, Any]:
    """The :func:`build_cell` options of ``kind`` (default ``model_config.cell``) taken
    from a :class:`stvr.config.ModelConfig` (cell_bottleneck, warp_grid, warp_order,
    warp_boundary_points, warp_max_offset, traj_links)."""
    kind = kind or model_config.cell
    opts: dict[str, Any] = {"bottleneck": model_config.cell_bottleneck}
    if kind == "warp":
        opts.update(
            grid=model_config.warp_grid,
            order=model_config.warp_order,
            num_boundary_points=model_config.warp_boundary_points,
            max_offset=model_config.warp_max_offset,
        )
    elif kind == "traj":
        opts.update(links=model_config.traj_links)
    return opts
