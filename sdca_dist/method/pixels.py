"""Dense maps -> per-pixel rows, the shape every per-pixel method operation consumes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of integer labels [B, H, W] to ``size`` (as the reference does).

    Nearest never invents a class at a boundary and keeps 255 as 255.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).long()


def flatten_pixels(feature_map: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``feature_map [B, A, h, w]`` and ``labels [B, H, W]`` -> ``feats [B*h*w, A]``, ``labels [B*h*w]``.

    Labels are resized NEAREST to (h, w) first (a no-op when already that size). Row order is
    (b, y, x), identical for both outputs. Gradients flow through ``feats``.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be [B, A, h, w], got {tuple(feature_map.shape)}")
    b, a, h, w = feature_map.shape
    if labels.shape[0] != b:
        raise ValueError(f"batch sizes differ: feature_map {b}, labels {labels.shape[0]}")
    small = downsample_labels(labels, (h, w))
    return feature_map.permute(0, 2, 3, 1).reshape(b * h * w, a), small.reshape(-1)
