"""A small, fast 3D CNN with the I3D output contract (the ``cpu`` preset's backbone).

``[N, 3, T, S, S] -> [N, out_channels, S/16, S/16]``: four conv3d (3x3x3) +
BatchNorm3d + ReLU blocks with strides (1,2,2), (2,2,2), (2,2,2), (1,2,2), so
time shrinks by 4 (8 frames -> 2) and space by 16, like I3D's Mixed_4c (with
``output_stride=8`` the last block keeps the spatial size: the same weights
evaluated on every stride-8 cell, ``S/8 x S/8``, cell ``i`` centred on pixel 8 i); the
remaining time steps are flattened into channels time-major (channel =
t * C' + c), exactly as the I3D backbone does, so ``out_channels`` must be a
multiple of ``T / 4``.

Unlike the pretrained I3D, the tiny backbone is trained from scratch, so its
BatchNorm layers use batch statistics in training (``freeze_bn`` is not applied;
``STVRModel`` runs query and reference clips through it in one call so that
they share the statistics).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int]) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
        )


class TinyBackbone(nn.Module):
    """Four strided conv3d blocks, widths ``width * (1, 2, 4)`` then ``out_channels / T'``.

    Args:
        width: base width (``ModelConfig.tiny_width``).
        out_channels: channels of the output map (``ModelConfig.backbone_channels``).
        clip_frames: frames per clip T (T' = ceil(T / 4) time steps are flattened).
        output_stride: 16, or 8 (no spatial stride in the last block; same parameters).
    """

    def __init__(self, width: int = 16, out_channels: int = 64, clip_frames: int = 8,
                 output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        self.output_stride = output_stride
        self.time_steps = -(-clip_frames // 4)
        if out_channels % self.time_steps:
            raise ValueError(f"backbone_channels={out_channels} must be a multiple of "
                             f"the {self.time_steps} flattened time steps")
        self.out_channels = out_channels
        self.blocks = nn.Sequential(
            _Block(3, width, (1, 2, 2)),
            _Block(width, 2 * width, (2, 2, 2)),
            _Block(2 * width, 4 * width, (2, 2, 2)),
            _Block(4 * width, out_channels // self.time_steps, (1, 2, 2) if output_stride == 16 else (1, 1, 1)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, clips: Tensor) -> Tensor:
        """``[N, 3, T, S, S] -> [N, out_channels, S/stride, S/stride]``."""
        x = self.blocks(clips)                         # [N, C', T', h, w]
        n, c, t, h, w = x.shape
        if t != self.time_steps:                       # other clip lengths: pool to T'
            x = F.adaptive_avg_pool3d(x, (self.time_steps, h, w))
            t = self.time_steps
        return x.permute(0, 2, 1, 3, 4).reshape(n, t * c, h, w)
