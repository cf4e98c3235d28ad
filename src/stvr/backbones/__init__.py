"""Video backbones: ``i3d`` (paper preset) and ``tiny`` (cpu preset).

Both map clips ``[N, 3, T, S, S]`` (RGB in [-1, 1]) to one feature map per clip
``[N, backbone_channels, S/16, S/16]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..config import ModelConfig
from .i3d import I3DBackbone, load_state_dict_file, same_padding
from .tiny import TinyBackbone

__all__ = ["I3DBackbone", "TinyBackbone", "build_backbone", "load_state_dict_file", "load_tiny_weights",
           "same_padding", "BUILTIN_TINY_WEIGHTS"]

log = logging.getLogger(__name__)

#: the tiny backbone pretrained on synthetic actors (``stvr pretrain``; recipe in its metadata)
BUILTIN_TINY_WEIGHTS = Path(__file__).parent / "weights" / "tiny_synthetic.safetensors"


def resolve_backbone_weights(name: str) -> Path:
    """``"builtin"`` -> the shipped file; anything else is a local path."""
    return BUILTIN_TINY_WEIGHTS if name == "builtin" else Path(name)


def load_tiny_weights(backbone: nn.Module, name: str) -> dict[str, str] | None:
    """Load a ``.safetensors`` state dict (``"builtin"`` = the shipped weights) into a
    :class:`TinyBackbone`; returns the file's metadata (None when the builtin weights do
    not fit this backbone's sizes: then nothing is loaded, with a warning).

    Raises ``ValueError`` naming the file when it is missing, unreadable, or made for
    another width / channel count (the message tells which ``model`` fields to set).
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = resolve_backbone_weights(name)
    if not path.is_file():
        raise ValueError(f"model.backbone_weights: {path} does not exist (use 'builtin', a "
                         f".safetensors file written by `stvr pretrain`, or none)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"model.backbone_weights: {path} is not a readable .safetensors file ({err})") from None
    own = backbone.state_dict()
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    extra = sorted(set(state) - set(own))
    if (bad or extra) and name == "builtin":
        # the default of the cpu preset, with other widths: nothing to load (said, not silent)
        log.warning("model.backbone_weights='builtin' holds the tiny backbone of the cpu preset "
                    "(tiny_width=16, backbone_channels=64); this backbone has other sizes and starts "
                    "from a random initialization (pretrain one with `stvr pretrain`)")
        return None
    if bad or extra:
        raise ValueError(f"model.backbone_weights: {path} does not fit this tiny backbone "
                         f"(mismatched {bad[:3] or extra[:3]}); it was made for {meta.get('model', '?')[:200]}; "
                         "set model.tiny_width / backbone_channels to match or pretrain again")
    backbone.load_state_dict(state, strict=True)
    return dict(meta)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone named by ``cfg.backbone`` ("i3d" | "tiny").

    For ``i3d`` the output has ``512 * ceil(clip_frames / 4)`` channels, which must
    equal ``cfg.backbone_channels`` (1024 for 8 frames); ``cfg.i3d_weights`` (a local
    file) is loaded strictly when set.
    """
    if cfg.backbone == "i3d":
        if cfg.feature_stride != 16:
            raise ValueError(f"model.feature_stride={cfg.feature_stride}: the I3D backbone has stride 16")
        channels = 512 * (-(-cfg.clip_frames // 4))
        if channels != cfg.backbone_channels:
            raise ValueError(f"i3d with {cfg.clip_frames}-frame clips gives {channels} channels, "
                             f"but model.backbone_channels={cfg.backbone_channels}")
        backbone = I3DBackbone(freeze_bn=cfg.freeze_bn, weights=cfg.i3d_weights)
        backbone.pretrained = cfg.i3d_weights is not None
        return backbone
    if cfg.backbone == "tiny":
        backbone = TinyBackbone(cfg.tiny_width, cfg.backbone_channels, cfg.clip_frames, cfg.feature_stride)
        backbone.pretrained = bool(cfg.backbone_weights) and load_tiny_weights(backbone, cfg.backbone_weights) is not None
        return backbone
    raise ValueError(f"unknown backbone {cfg.backbone!r}; choose 'i3d' or 'tiny'")
