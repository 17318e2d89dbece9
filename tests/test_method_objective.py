"""The SDCA objective as method code: unit-tested with no process group.

Specification: the source terms are seg + w_f * L_feat + w_o * L_out with TRUE labels, computed
against distributions that already include this batch (the estimator update comes first, as in
the reference); the target terms use only pixels whose max probability exceeds delta.
"""

from __future__ import annotations

import torch

from sdca_dist.config.schema import MethodConfig
from sdca_dist.method import flatten_pixels, pixel_contrastive_loss, segmentation_loss
from sdca_dist.method.objective import DistributionPair, SDCAObjective


def _batch(seed: int, classes: int = 5, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, dim, 4, 6, generator=g)
    logits = torch.randn(2, classes, 4, 6, generator=g) * 3
    labels = torch.randint(0, classes, (2, 32, 48), generator=g)
    labels[0, :4] = 255
    return feats, logits, labels


def test_source_terms_update_the_distributions_first_then_score_against_them():
    method = MethodConfig(tau=2.0, feat_weight=0.5, out_weight=0.25, lovasz_weight=0.75)
    feats, logits, labels = _batch(0)
    dists = DistributionPair(5, 8)
    terms = SDCAObjective(dists, method).source(feats, logits, labels)

    # the specification, from the method's pieces
    ref = DistributionPair(5, 8)
    f, y = flatten_pixels(feats, labels)
    o, _ = flatten_pixels(logits, labels)
    ref.update(f, o, y)
    assert torch.equal(dists.feat.mean, ref.feat.mean) and torch.equal(dists.out.var, ref.out.var)
    lf = pixel_contrastive_loss(f, y, ref.feat.mean, ref.feat.var, tau=2.0)
    lo = pixel_contrastive_loss(o, y, ref.out.mean, ref.out.var, tau=2.0)
    seg = segmentation_loss(logits, labels, 0.75)
    torch.testing.assert_close(terms.loss, seg + 0.5 * lf + 0.25 * lo)
    assert set(terms.parts) == {"seg", "feat_src", "out_src"}
    torch.testing.assert_close(terms.parts["feat_src"], lf)


def test_target_terms_use_only_confident_pixels():
    method = MethodConfig(tau=1.0, delta=0.9)
    dists = DistributionPair(5, 8)
    feats, logits, labels = _batch(1)
    objective = SDCAObjective(dists, method)
    objective.source(feats, logits, labels)  # distributions to score against
    feats_t, logits_t, _ = _batch(2)
    feats_t.requires_grad_(True)
    logits_t.requires_grad_(True)
    terms = objective.target(feats_t, logits_t)
    confident = logits_t.detach().softmax(1).max(1).values > 0.9
    assert terms.pseudo.shape == (2, 4, 6)
    assert torch.equal(terms.pseudo != 255, confident)
    assert 0 < int(confident.sum()) < confident.numel()  # both kinds of pixel are present
    torch.testing.assert_close(terms.parts["pseudo_label_share"], confident.float().mean())
    # the gradient reaches the features and logits of every confident pixel and no other
    assert terms.loss.requires_grad and torch.isfinite(terms.loss)
    terms.loss.backward()
    for name, grad in (("features", feats_t.grad), ("logits", logits_t.grad)):
        assert grad is not None, f"no gradient reaches the target {name}"
        reached = grad.abs().sum(1) > 0
        assert torch.equal(reached, confident), (
            f"target {name}: gradient at {reached.sum()} pixels, {confident.sum()} confident"
        )
    # no confident pixel: the target terms are zero, never NaN
    flat = objective.target(feats_t, torch.zeros_like(logits_t))
    assert float(flat.loss) == 0.0 and float(flat.parts["pseudo_label_share"]) == 0.0


def test_source_terms_compute_the_segmentation_loss_while_the_estimator_all_reduce_travels(monkeypatch):
    # The segmentation loss does not read the distributions, so the estimator all-reduce is
    # started first and waited for only before the contrastive terms, which do: same values,
    # less time blocked on 2+ ranks.
    import sdca_dist.method.objective as objective_module

    events: list[str] = []

    class Seam:
        def __call__(self, tensor):  # the synchronous face: must not be used by the sdca step
            events.append("blocking all-reduce")

        def start(self, tensor):
            events.append("start")

            class Waiting:
                def wait(self):
                    events.append("wait")

            return Waiting()

    real_seg = objective_module.segmentation_loss

    def seg(*args, **kwargs):
        events.append("segmentation loss")
        return real_seg(*args, **kwargs)

    monkeypatch.setattr(objective_module, "segmentation_loss", seg)
    feats, logits, labels = _batch(3)
    method = MethodConfig(tau=2.0, feat_weight=0.5, out_weight=0.25)
    overlapped = SDCAObjective(DistributionPair(5, 8, all_reduce=Seam()), method).source(feats, logits, labels)
    assert events == ["start", "segmentation loss", "wait"]
    plain = SDCAObjective(DistributionPair(5, 8), method).source(feats, logits, labels)
    assert torch.equal(overlapped.loss, plain.loss)
