"""Supervised segmentation losses: cross-entropy and Lovasz-softmax, both ignoring 255.

Logits at feature resolution are upsampled bilinearly (align_corners=True, as docs/method.md
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


#: Elements (classes x pixels) sorted together in one batched sort. One sort over a [classes,
#: pixels] block replaces a Python loop of one sort per class: the loop's ~30 operator calls per
#: class (and its backward, which zero-filled a [pixels, classes] gradient once PER class) were a
#: per-step cost that does not shrink with the batch. 2^22 keeps every synthetic-benchmark batch
#: in one block and bounds the temporaries at full resolution (R101, 2 x 1280x720: 2 classes a
#: block, about 200 MB).
_LOVASZ_BLOCK_ELEMS = 1 << 22


def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending.

    ``gt_sorted [K, N]``: one row per class, foreground indicators in the order of that class's
    sorted errors; the result has the same shape.
    """
    gts = gt_sorted.sum(dim=1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(dim=1)
    union = gts + (1.0 - gt_sorted).cumsum(dim=1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_softmax(
    probs: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, block_elems: int = _LOVASZ_BLOCK_ELEMS
) -> Tensor:
    """Lovasz-softmax (Berman et al. 2018) averaged over the classes present in ``labels``.

    ``probs [B, C, H, W]`` (softmax output at label resolution), ``labels [B, H, W]``; all pixels
    of the batch pooled (per_image=False), as the reference uses it. Ignored pixels get error 0
    and no foreground, which sorts them after every positive error where they cannot change the
    loss; this avoids boolean masking (a host sync on GPU). Classes are sorted in blocks of
    ``block_elems // pixels`` rows (at least one) with one batched sort each, so temporaries are
    O(block_elems + pixels), never O(pixels x classes) at full resolution.
    """
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"expected probs [B, C, H, W] and labels [B, H, W]; got {tuple(probs.shape)}, {tuple(labels.shape)}"
        )
    num_classes = probs.shape[1]
    rows = probs.transpose(0, 1).reshape(num_classes, -1)  # [C, N]: one row per class
    n_pix = rows.shape[1]
    y = labels.reshape(1, -1).long()
    valid = (y != ignore_index).to(rows.dtype)
    per_block = max(1, block_elems // max(1, n_pix))
    total = rows.sum() * 0.0
    present_count = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for k0 in range(0, num_classes, per_block):
        k1 = min(num_classes, k0 + per_block)
        classes = torch.arange(k0, k1, device=rows.device).unsqueeze(1)
        fg = (y == classes).to(rows.dtype)  # [K, N]
        errors = (fg - rows[k0:k1]).abs() * valid
        errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
        losses = (errors_sorted * _lovasz_grad(fg.gather(1, perm))).sum(dim=1)  # [K]
        present = (fg.sum(dim=1) > 0).to(rows.dtype)
        total = total + (present * losses).sum()
        present_count = present_count + present.sum()
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
