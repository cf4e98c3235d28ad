"""Optical flow between consecutive reference clips, at feature-map resolution: data
for the ``flow`` recurrent cell (:class:`stvr.recurrent.FlowLSTMCell`, paper section 6.1).

:func:`clip_flow` computes the motion of one clip since the previous one (OpenCV);
:func:`sequence_flows` the flows of every clip of a sequence, as the model feeds them
to its cell (``context["flow"]``). Flows are in feature cells, channel 0 = dy (rows),
channel 1 = dx (columns).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_flow", "sequence_flows"]

def _gray_uint8(frames: Tensor) -> np.ndarray:
    """``[B, 3, T, H, W]`` RGB in [-1, 1] -> ``[B, T, H, W]`` uint8 luma (BT.601)."""
    weights = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1, 1)
    gray = ((frames + 1.0) * 127.5 * weights).sum(1)
    return gray.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def clip_flow(
    previous_clip: Tensor | None,
    clip: Tensor,
    feature_size: int | Sequence[int],
    method: str = "dis",
) -> Tensor:
    """Motion of the current clip since the previous one, at feature resolution.

    Args:
        previous_clip: ``[B, 3, T, H, W]`` in [-1, 1] (only its last frame is used),
            or None (first clip: the flow is zero).
        clip: ``[B, 3, T, H, W]`` in [-1, 1], RGB.
        feature_size: ``h`` or ``(h, w)`` of the feature map.
        method: "dis" (OpenCV DIS, preset FAST) or "farneback".

    Returns ``[B, h, w, 2]`` on ``clip``'s device: for each position p of the current
    clip's last frame, its displacement since the previous clip's last frame, in
    feature cells, channel 0 = dy, 1 = dx -- the convention of :class:`FlowLSTMCell`
    (the state is warped so that p samples ``p - flow(p)``).

    Composition: OpenCV computes T backward flows ``b_k`` (frame k+1 -> frame k, over
    the T + 1 frames "previous last frame, clip frames 0..T-1"); a point of the last
    frame is tracked back by ``q <- q + b_k(q)`` (bilinear, border-clamped), and the
    motion is ``p - q_0``. The pixel flow is then averaged down to ``(h, w)`` (area /
    antialiased bilinear) and scaled by ``h / H`` and ``w / W`` (1/16 for the paper).
    """
    if method not in ("dis", "farneback"):
        raise ValueError(f"method must be 'dis' or 'farneback', got {method!r}")
    if clip.dim() != 5 or clip.shape[1] != 3:
        raise ValueError(f"clip must be [B, 3, T, H, W], got {tuple(clip.shape)}")
    if isinstance(feature_size, (int, np.integer)):
        fh = fw = int(feature_size)
    else:
        fh, fw = (int(v) for v in feature_size)
    if fh < 1 or fw < 1:
        raise ValueError(f"feature_size must be positive, got {feature_size!r}")
    B, _, T, H, W = clip.shape
    if previous_clip is None:
        return clip.new_zeros(B, fh, fw, 2)
    prev_ok = previous_clip.dim() == 5 and previous_clip.shape[:2] == clip.shape[:2]
    if not prev_ok or previous_clip.shape[-2:] != clip.shape[-2:]:
        raise ValueError(
            f"previous_clip must be [{B}, 3, T', {H}, {W}] like clip, got {tuple(previous_clip.shape)}"
        )
    import cv2

    frames = torch.cat([previous_clip[:, :, -1:], clip], dim=2).detach().float()
    gray = _gray_uint8(frames)  # [B, T+1, H, W]
    backward = np.empty((B, T, H, W, 2), np.float32)  # (dx, dy) pixels, frame k+1 -> k
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST) if method == "dis" else None
    for b in range(B):
        for k in range(T):
            nxt, prev = gray[b, k + 1], gray[b, k]
            if dis is not None:
                backward[b, k] = dis.calc(nxt, prev, None)
            else:
                backward[b, k] = cv2.calcOpticalFlowFarneback(nxt, prev, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    back = torch.from_numpy(backward)  # [B, T, H, W, 2]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    base = torch.stack([xs, ys], dim=-1).expand(B, H, W, 2)  # (x, y)
    scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)])
    pos = base.clone()
    for k in range(T - 1, -1, -1):
        field = back[:, k].permute(0, 3, 1, 2)  # [B, 2, H, W] (dx, dy)
        step = F.grid_sample(field, pos * scale - 1.0, mode="bilinear", padding_mode="border", align_corners=True)
        pos = pos + step.permute(0, 2, 3, 1)
    motion = (base - pos)[..., [1, 0]].permute(0, 3, 1, 2)  # [B, 2 (dy, dx), H, W] pixels
    if (fh, fw) != (H, W):
        if H % fh == 0 and W % fw == 0:
            motion = F.interpolate(motion, size=(fh, fw), mode="area")
        else:
            motion = F.interpolate(
                motion, size=(fh, fw), mode="bilinear", align_corners=False, antialias=fh < H or fw < W
            )
    motion = motion * torch.tensor([fh / H, fw / W]).view(1, 2, 1, 1)
    return motion.permute(0, 2, 3, 1).contiguous().to(device=clip.device, dtype=clip.dtype)


def sequence_flows(clips: Tensor, previous: Tensor | None, feature_size: int) -> Tensor:
    """``[B, L, h, h, 2]`` flows between consecutive clips of ``clips [B, L, 3, T, S, S]``
    (zero for the first clip unless ``previous [B, 3, T, S, S]`` is given), ``h =
    feature_size``; no gradient."""
    b, length = clips.shape[:2]
    h = feature_size
    flows = clips.new_zeros(b, length, h, h, 2)
    with torch.no_grad():
        for t in range(length):
            prev = clips[:, t - 1] if t > 0 else previous
            if prev is not None:
                flows[:, t] = clip_flow(prev, clips[:, t], (h, h)).to(flows)
    return flows
