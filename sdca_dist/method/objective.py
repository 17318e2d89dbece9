"""The SDCA objective (docs/method.md, "The sdca objective") as tensor code: what the sdca step minimises.

``DistributionPair`` holds the two semantic distributions (feature level, output level) that
are updated together with ONE all-reduce per step. ``SDCAObjective`` turns one domain's batch
into its named losses: the source terms (segmentation loss plus the feature- and output-level
contrastive losses with true labels; the distributions are updated with the global source batch
FIRST, as in the reference) and the target terms (the same contrastive losses with confident
pseudo labels). The engine's sdca step keeps only the micro-step choreography and logging, so
everything here runs in a plain unit test with no process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from sdca_dist.config.schema import MethodConfig
from sdca_dist.method.collective import AllReduce
from sdca_dist.method.contrastive import pixel_contrastive_loss
from sdca_dist.method.distribution import PendingUpdate, SemanticDistribution, start_update
from sdca_dist.method.pixels import flatten_pixels
from sdca_dist.method.pseudo_labels import confidence_pseudo_labels
from sdca_dist.method.segmentation_loss import segmentation_loss


class DistributionPair:
    """Feature-level (A = backbone dim) and output-level (A = classes) semantic distributions."""

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        device: torch.device | str = "cpu",
        all_reduce: Optional[AllReduce] = None,
    ) -> None:
        self.feat = SemanticDistribution(num_classes, feature_dim, all_reduce=all_reduce).to(device)
        self.out = SemanticDistribution(num_classes, num_classes, all_reduce=all_reduce).to(device)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Both levels from the same labelled pixels, in one all-reduce."""
        self.start_update(feats, logits, labels).finish()

    @torch.no_grad()
    def start_update(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> PendingUpdate:
        """:meth:`update` with the all-reduce launched and not yet waited for: the distributions
        change only at ``finish()``, so the caller can compute what does not read them first."""
        return start_update([(self.feat, feats.detach().float(), labels), (self.out, logits.detach().float(), labels)])

    def state_dict(self) -> dict:
        return {"feat": self.feat.state_dict(), "out": self.out.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.feat.load_state_dict(state["feat"])
        self.out.load_state_dict(state["out"])

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


@dataclass
class DomainTerms:
    """One domain's part of the objective: the loss to back-propagate and its named parts."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    #: target only: the confident pseudo labels used (255 = not confident)
    pseudo: Optional[torch.Tensor] = None


@dataclass
class SDCAObjective:
    dists: DistributionPair
    method: MethodConfig = field(default_factory=MethodConfig)

    def _contrastive(self, f: torch.Tensor, o: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, tau = self.dists, self.method.tau
        return (
            pixel_contrastive_loss(f, y, d.feat.mean, d.feat.var, tau=tau),
            pixel_contrastive_loss(o, y, d.out.mean, d.out.var, tau=tau),
        )

    def source(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> DomainTerms:
        """Segmentation + contrastive terms with true labels; updates the distributions first.

        The update's all-reduce is launched first and the segmentation loss (which does not read
        the distributions) computed while it is in flight; the contrastive terms then use the
        updated distributions, as in the reference. Same arithmetic as update-then-loss.
        """
        m = self.method
        f, y = flatten_pixels(feats, labels)
        o, _ = flatten_pixels(logits, labels)
        update = self.dists.start_update(f, o, y)
        seg = segmentation_loss(logits, labels, m.lovasz_weight)
        update.finish()
        lf, lo = self._contrastive(f, o, y)
        return DomainTerms(seg + m.feat_weight * lf + m.out_weight * lo, {"seg": seg, "feat_src": lf, "out_src": lo})

    def target(self, feats: torch.Tensor, logits: torch.Tensor) -> DomainTerms:
        """Contrastive terms with confident pseudo labels (max-probability above ``delta``)."""
        m = self.method
        pseudo = confidence_pseudo_labels(logits.detach(), delta=m.delta)
        f, y = flatten_pixels(feats, pseudo)
        o, _ = flatten_pixels(logits, pseudo)
        lf, lo = self._contrastive(f, o, y)
        return DomainTerms(
            m.feat_weight * lf + m.out_weight * lo,
            {"feat_tgt": lf, "out_tgt": lo, "pseudo_label_share": (y != 255).float().mean()},
            pseudo=pseudo,
        )
