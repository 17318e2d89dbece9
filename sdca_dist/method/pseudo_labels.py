"""Target pseudo labels: confidence masks (sdca stage) and per-class median thresholds (pseudo_label).

The reference keeps every probability map of Cityscapes train in RAM and sorts per class
(~25 GB, quadratic np.append copies). :class:`ClassThresholds` streams instead: one histogram of
max-softmax per predicted class, fixed size (C x bins counts) whatever the number of images,
summed over ranks with one all-reduce, and reads the median from it to within half a bin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdca_dist.classes import IGNORE_INDEX
from sdca_dist.method.collective import AllReduce, resolve_all_reduce


def confidence_pseudo_labels(
    scores: Tensor, delta: float = 0.9, ignore_index: int = IGNORE_INDEX, *, from_logits: bool = True
) -> Tensor:
    """Argmax label where the max softmax probability is >= ``delta``, else ``ignore_index``.

    ``scores [B, C, H, W]`` are logits (softmax taken over dim 1) or, with ``from_logits=False``,
    probabilities. Returns int64 [B, H, W]; no gradient.
    """
    with torch.no_grad():
        probs = scores.float().softmax(dim=1) if from_logits else scores
        conf, pred = probs.max(dim=1)
        return torch.where(conf >= delta, pred, torch.full_like(pred, ignore_index))


def apply_thresholds(probs: Tensor, thresholds: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Argmax labels of ``probs [B, C, H, W]``; pixels whose max prob is below their class's threshold
    become ``ignore_index`` (a pixel exactly at its threshold is kept, as in the reference)."""
    with torch.no_grad():
        conf, pred = probs.max(dim=1)
        thr = thresholds.to(device=probs.device, dtype=conf.dtype)[pred]
        return torch.where(conf >= thr, pred, torch.full_like(pred, ignore_index))


class ClassThresholds:
    """Streaming per-class median of max-softmax over pixels predicted as that class.

    ``update(probs)`` adds a batch to ``counts [C, bins]`` (int64; bin j covers
    [j/bins, (j+1)/bins), 1.0 in the last bin). ``compute(cap)`` all-reduces a copy of the counts
    (one collective; calling it twice is safe) and returns, per class, the midpoint of the bin
    centres of the two middle order statistics, so |estimate - numpy.median| <= 0.5/bins
    (2.5e-4 at the default 2000 bins), then min(., cap); 0 for a class never predicted.
    """

    def __init__(
        self,
        num_classes: int,
        bins: int = 2000,
        *,
        all_reduce: AllReduce | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes <= 0 or bins <= 0:
            raise ValueError(f"ClassThresholds needs num_classes > 0 and bins > 0, got {num_classes}, {bins}")
        self.num_classes = int(num_classes)
        self.bins = int(bins)
        self._all_reduce = all_reduce
        self.counts = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)

    def to(self, device: torch.device | str) -> "ClassThresholds":
        self.counts = self.counts.to(device)
        return self

    def update(self, probs: Tensor, rows: Tensor | None = None) -> None:
        """Add a batch of softmax maps ``probs [B, C, H, W]`` (on the counts' device); ``rows``
        (bool [B]) counts only those images (a mask, not an index: nothing is read on the host)."""
        if probs.dim() != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be [B, {self.num_classes}, H, W], got {tuple(probs.shape)}")
        with torch.no_grad():
            conf, pred = probs.max(dim=1)
            b = (conf.float() * self.bins).long().clamp_(0, self.bins - 1)
            flat = (pred * self.bins + b).reshape(-1)
            ones = torch.ones_like(flat)
            if rows is not None:
                ones = rows.to(flat.device, torch.int64)[:, None, None].expand_as(pred).reshape(-1)
            # index_add_, not bincount: bincount reads its maximum on the host (a sync on CUDA)
            self.counts.view(-1).index_add_(0, flat, ones)

    def compute(self, cap: float = 0.9) -> Tensor:
        """Per-class thresholds float32 [C] over all ranks' pixels (collective)."""
        counts = self.counts.clone()
        resolve_all_reduce(self._all_reduce)(counts)
        n = counts.sum(dim=1)  # [C]
        cum = counts.cumsum(dim=1)  # [C, bins]
        # 0-based ranks of the two middle order statistics (equal when n is odd).
        lo_rank = ((n - 1).clamp_min(0) // 2).unsqueeze(1)
        hi_rank = (n // 2).unsqueeze(1)
        # Bin of the r-th order statistic = number of bins whose cumulative count is <= r.
        lo_bin = (cum <= lo_rank).sum(dim=1)
        hi_bin = (cum <= hi_rank).sum(dim=1)
        median = (lo_bin.double() + hi_bin.double() + 1.0) / (2.0 * self.bins)  # mean of bin centres
        median = torch.where(n > 0, median, torch.zeros_like(median))
        return median.clamp_max(cap).float()
