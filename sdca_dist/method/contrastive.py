"""The SDCA pixel-wise contrastive loss (upper bound of the infinite-sample loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdca_dist.classes import IGNORE_INDEX


def pixel_contrastive_loss(
    feat: Tensor, labels: Tensor, mean: Tensor, var: Tensor, tau: float = 100.0, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean over valid pixels of
    ``L(z, y) = -z.m_y/tau + log sum_k exp(z.m_k/tau + (z*z).S_k/(2 tau^2))``
    with ``z = f/|f|``, ``m_k = mu_k/|mu_k|``, ``S_k = s_k/|s_k|`` (docs/method.md).

    ``feat [N, A]`` carries the gradient; ``mean``/``var`` [C, A] are constants (detached, cast to
    the compute dtype). Memory O(N*A + N*C + C*A): the [N, C] logits are two matmuls. Written
    as cross-entropy on ``l_k = z.m_k/tau + (z*z).S_k/(2 tau^2)`` plus ``(z*z).S_y/(2 tau^2)``,
    which is the same quantity with a numerically stable log-sum-exp. Returns a scalar; when
    no pixel is valid, a zero that still carries a (zero) gradient to ``feat``.
    """
    if feat.dim() != 2 or mean.shape != var.shape or mean.shape[1] != feat.shape[1]:
        raise ValueError(
            f"expected feat [N, A], mean/var [C, A]; got {tuple(feat.shape)}, {tuple(mean.shape)}, {tuple(var.shape)}"
        )
    compute = feat.dtype if feat.dtype in (torch.float32, torch.float64) else torch.float32
    f = feat.to(compute)
    m = F.normalize(mean.detach().to(device=f.device, dtype=compute), dim=1)
    s = F.normalize(var.detach().to(device=f.device, dtype=compute), dim=1)
    z = F.normalize(f, dim=1)
    quad = (z * z) @ s.t() / (2.0 * tau * tau)  # [N, C]
    logits = z @ m.t() / tau + quad  # [N, C]
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    own_quad = (quad.gather(1, safe.unsqueeze(1)).squeeze(1) * valid).sum()
    n_valid = valid.sum().clamp_min(1)
    return ((ce + own_quad) / n_valid).to(feat.dtype)
