"""Supervised segmentation losses: cross-entropy and Lovasz-softmax, both ignoring 255.

Logits at feature resolution are upsampled bilinearly (align_corners=True, as the method doc
says) to the label size here, once, so callers hand in what the model returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdca_dist.classes import IGNORE_INDEX


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of [B, C, h, w] logits to ``size``; no-op if equal."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def segmentation_ce(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over non-ignored pixels of ``labels [B, H, W]``.

    ``logits [B, C, h, w]`` are upsampled to (H, W) first. Unlike ``F.cross_entropy(...,
    reduction='mean')`` an all-ignored batch gives 0 (with gradient), not NaN: a crop of pure
    void must not poison the weights.
    """
    logits = upsample_logits(logits, tuple(labels.shape[-2:]))
    labels = labels.long()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probs: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Lovasz-softmax (Berman et al. 2018) averaged over the classes present in ``labels``.

    ``probs [B, C, H, W]`` (softmax output at label resolution), ``labels [B, H, W]``; all pixels
    of the batch pooled (per_image=False), as the reference uses it. Ignored pixels get error 0
    and no foreground, which sorts them after every positive error where they cannot change the
    loss; this avoids boolean masking (a host sync on GPU). Loops over classes so memory is
    O(pixels), not O(pixels x classes) for the sorts.
    """
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"expected probs [B, C, H, W] and labels [B, H, W]; got {tuple(probs.shape)}, {tuple(labels.shape)}"
        )
    num_classes = probs.shape[1]
    flat = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
    y = labels.reshape(-1).long()
    valid = (y != ignore_index).to(flat.dtype)
    total = flat.sum() * 0.0
    present_count = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for k in range(num_classes):
        fg = (y == k).to(flat.dtype)
        errors = (fg - flat[:, k]).abs() * valid
        errors_sorted, perm = torch.sort(errors, descending=True)
        loss_k = torch.dot(errors_sorted, _lovasz_grad(fg[perm]))
        present = (fg.sum() > 0).to(flat.dtype)
        total = total + present * loss_k
        present_count = present_count + present
    return total / present_count.clamp_min(1.0)


def segmentation_loss(
    logits: Tensor, labels: Tensor, lovasz_weight: float = 0.75, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The source loss of the src and sdca stages: CE + ``lovasz_weight`` * Lovasz-softmax.

    Upsamples once and shares it between both terms.
    """
    up = upsample_logits(logits, tuple(labels.shape[-2:]))
    loss = segmentation_ce(up, labels, ignore_index)
    if lovasz_weight:
        loss = loss + lovasz_weight * lovasz_softmax(up.softmax(dim=1), labels, ignore_index)
    return loss
