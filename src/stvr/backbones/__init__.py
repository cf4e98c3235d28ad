"""Video backbones: ``i3d`` (paper preset) and ``tiny`` (cpu preset).

Both map clips ``[N, 3, T, S, S]`` (RGB in [-1, 1]) to one feature map per clip
``[N, backbone_channels, S/16, S/16]``.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .i3d import I3DBackbone, load_state_dict_file, same_padding
from .tiny import TinyBackbone

__all__ = ["I3DBackbone", "TinyBackbone", "build_backbone", "load_state_dict_file", "same_padding"]


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone named by ``cfg.backbone`` ("i3d" | "tiny").

    For ``i3d`` the output has ``512 * ceil(clip_frames / 4)`` channels, which must
    equal ``cfg.backbone_channels`` (1024 for 8 frames); ``cfg.i3d_weights`` (a local
    file) is loaded strictly when set.
    """
    if cfg.backbone == "i3d":
        channels = 512 * (-(-cfg.clip_frames // 4))
        if channels != cfg.backbone_channels:
            raise ValueError(f"i3d with {cfg.clip_frames}-frame clips gives {channels} channels, "
                             f"but model.backbone_channels={cfg.backbone_channels}")
        return I3DBackbone(freeze_bn=cfg.freeze_bn, weights=cfg.i3d_weights)
    if cfg.backbone == "tiny":
        return TinyBackbone(cfg.tiny_width, cfg.backbone_channels, cfg.clip_frames)
    raise ValueError(f"unknown backbone {cfg.backbone!r}; choose 'i3d' or 'tiny'")
