"""Saving and loading the semantic distributions (the pair itself is method code:
``sdca_dist.method.objective.DistributionPair``), so dist_init's output is exactly sdca's
starting state."""

from __future__ import annotations

from pathlib import Path

import torch

from sdca_dist.engine.checkpoint import atomic_torch_save
from sdca_dist.method.objective import DistributionPair

__all__ = ["DistributionPair", "load_distributions", "save_distributions"]


def save_distributions(dists: DistributionPair, path: Path) -> None:
    atomic_torch_save(
        {
            k: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
            for k, v in dists.state_dict().items()
        },
        path,
    )


def load_distributions(dists: DistributionPair, path: Path) -> None:
    dists.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
