"""The query encoder's RoI crop: :func:`crop_features` (``tf.image.crop_and_resize``
emulated with ``roi_align``, then max-pool), used for the query boxes and the proposals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["crop_features", "crop_queries"]


def crop_features(features: Tensor, boxes: Tensor, batch_index: Tensor, crop_size: int = 14,
                  pool: int = 2, mapping: str = "tf", image_size: int | None = None) -> Tensor:
    """RoI features: ``crop_size`` x ``crop_size`` bilinear samples, then max-pool.

    Args:
        features: ``[N, C, h, w]`` feature maps.
        boxes: ``[K, 4]`` normalized ``[x1, y1, x2, y2]``.
        batch_index: ``[K]`` int64 map index of each box.
        mapping: how a normalized box lands on the map.
            ``"tf"``: TF ``crop_and_resize`` (the official code): 0..1 spans the map's
            first to last cell centre, samples on the box corners and between.
            ``"pixel"``: the geometry of a stride-``image_size / w`` backbone whose
            cell ``i`` is centred on pixel ``stride * i`` (stride-2, kernel-3, padding-1
            convolutions, as the tiny backbone): the box's pixel extent is mapped to
            cell units and sampled at ``crop_size`` bin centres (``roi_align``).
        image_size: S, the input side in pixels (``"pixel"`` mapping only; default ``16 * w``).
    Returns:
        ``[K, C, crop_size // pool, crop_size // pool]``.
    """
    h, w = features.shape[-2:]
    if mapping == "tf":
        scale = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
        b = boxes * scale                                       # corners in feature cells
        step = (b[:, 2:] - b[:, :2]) / max(crop_size - 1, 1)     # sample spacing (x, y)
        rois = torch.cat([b[:, :2] - 0.5 * step + 0.5, b[:, 2:] + 0.5 * step + 0.5], dim=1)
    elif mapping == "pixel":
        size = float(image_size or 16 * w)
        stride = boxes.new_tensor([size / w, size / h, size / w, size / h])
        # pixel k (centre at k + 0.5) lies in cell (k) / stride; roi_align(aligned=True) wants +0.5
        rois = (boxes * size - 0.5) / stride + 0.5
    else:
        raise ValueError(f"unknown RoI mapping {mapping!r}; choose 'tf' or 'pixel'")
    rois = torch.cat([batch_index.to(rois.dtype)[:, None], rois], dim=1)
    out = roi_align(features, rois, (crop_size, crop_size), spatial_scale=1.0,
                    sampling_ratio=1, aligned=True)
    return F.max_pool2d(out, pool, pool) if pool > 1 else out


def crop_queries(features: Tensor, boxes: Tensor, crop_size: int, mapping: str = "tf",
                 image_size: int | None = None) -> Tensor:
    """Query features ``[Nq, C, 7, 7]``: box ``i`` (normalized ``[Nq, 4]``) cropped from map ``i``
    of ``features [Nq, C, h, w]``."""
    idx = torch.arange(features.shape[0], device=features.device)
    return crop_features(features, boxes.to(features.dtype), idx, crop_size,
                         mapping=mapping, image_size=image_size)
