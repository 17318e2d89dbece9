"""The two semantic-distribution estimators (feature level, output level) as one unit.

Both are updated together with ONE all-reduce per step (``update_distributions``) and saved
together, so dist_init's output is exactly sdca's starting state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdca_dist.engine.checkpoint import atomic_torch_save


class DistributionPair:
    """Feature-level (A = backbone dim) and output-level (A = classes) semantic distributions."""

    def __init__(self, num_classes: int, feature_dim: int, device: torch.device, all_reduce=None) -> None:
        from sdca_dist.method import SemanticDistribution

        self.feat = SemanticDistribution(num_classes, feature_dim, all_reduce=all_reduce).to(device)
        self.out = SemanticDistribution(num_classes, num_classes, all_reduce=all_reduce).to(device)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        from sdca_dist.method import update_distributions

        update_distributions([(self.feat, feats.detach().float(), labels), (self.out, logits.detach().float(), labels)])

    def state_dict(self) -> dict:
        return {"feat": self.feat.state_dict(), "out": self.out.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.feat.load_state_dict(state["feat"])
        self.out.load_state_dict(state["out"])

    def save(self, path: Path) -> None:
        atomic_torch_save({k: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                           for k, v in self.state_dict().items()}, path)

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def statistics(self) -> dict[str, float]:
        """Scalars for TensorBoard: how many classes are estimated and how spread they are."""
        out = {}
        for name, d in (("feat", self.feat), ("out", self.out)):
            seen = d.count > 0
            out[f"dist/{name}_classes_seen"] = float(seen.sum())
            if seen.any():
                out[f"dist/{name}_mean_norm"] = float(d.mean[seen].float().norm(dim=1).mean())
                out[f"dist/{name}_var_mean"] = float(d.var[seen].float().mean())
        return out
