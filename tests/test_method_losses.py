"""Losses: SDCA contrastive upper bound, Lovasz-softmax, CE, confidence pseudo labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from method_fixtures import IGNORE

from sdca_dist.method import (
    ConfusionMatrix,
    confidence_pseudo_labels,
    lovasz_softmax,
    pixel_contrastive_loss,
    segmentation_ce,
    segmentation_loss,
)


def _direct_contrastive(feat, labels, mean, var, tau):
    """docs/method.md's formula, pixel by pixel, in float64 Python arithmetic."""
    f, mu, s = feat.double(), mean.double(), var.double()
    total, n = 0.0, 0
    for i in range(f.shape[0]):
        y = int(labels[i])
        if y == IGNORE:
            continue
        z = f[i] / f[i].norm()
        terms = []
        for k in range(mu.shape[0]):
            m_k = mu[k] / mu[k].norm()
            s_k = s[k] / s[k].norm()
            terms.append(float(z @ m_k) / tau + float((z * z) @ s_k) / (2 * tau * tau))
        m_y = mu[y] / mu[y].norm()
        total += -float(z @ m_y) / tau + math.log(sum(math.exp(t) for t in terms))
        n += 1
    return total / n


def _inputs(seed, n=20, a=7, c=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, a, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::5] = IGNORE
    mean = torch.randn(c, a, generator=g, dtype=torch.float64)
    var = torch.rand(c, a, generator=g, dtype=torch.float64) + 0.1
    return feat, labels, mean, var


def test_contrastive_loss_matches_direct_formula():
    for tau in (100.0, 0.5):  # tau=0.5 makes the variance term matter
        feat, labels, mean, var = _inputs(0)
        got = pixel_contrastive_loss(feat, labels, mean, var, tau=tau)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert abs(float(got) - _direct_contrastive(feat, labels, mean, var, tau)) < 1e-5 * max(1, abs(float(got)))


def test_contrastive_loss_equals_reference_cross_entropy_form():
    feat, labels, mean, var = _inputs(1, dtype=torch.float64)
    tau = 2.0
    z = F.normalize(feat, dim=1)
    m, s = F.normalize(mean, dim=1), F.normalize(var, dim=1)
    logits = z @ m.t() / tau + (z * z) @ s.t() / (2 * tau * tau)
    valid = labels != IGNORE
    ce = F.cross_entropy(logits[valid], labels[valid])
    extra = ((z * z)[valid] * s[labels[valid]]).sum(1).mean() / (2 * tau * tau)
    torch.testing.assert_close(pixel_contrastive_loss(feat, labels, mean, var, tau=tau), ce + extra)


def test_contrastive_loss_gradcheck_and_no_gradient_into_statistics():
    feat, labels, mean, var = _inputs(2, n=6, a=4, c=3, dtype=torch.float64)
    feat.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: pixel_contrastive_loss(f, labels, mean, var, tau=0.7), (feat,))
    mean.requires_grad_(True)
    var.requires_grad_(True)
    pixel_contrastive_loss(feat, labels, mean, var).backward()
    assert mean.grad is None and var.grad is None and feat.grad is not None


def test_contrastive_loss_without_valid_pixels_is_a_differentiable_zero():
    feat, labels, mean, var = _inputs(3)
    feat.requires_grad_(True)
    loss = pixel_contrastive_loss(feat, torch.full_like(labels, IGNORE), mean, var)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(feat.grad == 0)
    empty = torch.zeros(0, feat.shape[1], requires_grad=True)
    assert float(pixel_contrastive_loss(empty, torch.zeros(0, dtype=torch.long), mean, var).detach()) == 0.0


def test_confidence_pseudo_labels_keep_only_confident_argmax():
    probs = torch.tensor([[0.95, 0.5, 0.1, 0.9], [0.05, 0.5, 0.9, 0.1]]).view(1, 2, 1, 4)
    labels = confidence_pseudo_labels(probs, delta=0.9, from_logits=False)
    assert labels.dtype == torch.int64 and labels.tolist() == [[[0, IGNORE, 1, 0]]]
    logits = probs.log()
    assert torch.equal(confidence_pseudo_labels(logits, delta=0.9), labels)


def _lovasz_masked_reference(probs, labels):
    """Lovasz-softmax with ignored pixels removed explicitly and only present classes averaged."""
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c).double()
    y = labels.reshape(-1)
    keep = y != IGNORE
    p, y = p[keep], y[keep]
    losses = []
    for k in range(c):
        fg = (y == k).double()
        if fg.sum() == 0:
            continue
        err = (fg - p[:, k]).abs()
        order = torch.argsort(err, descending=True)
        e, g = err[order], fg[order]
        # Lovasz extension: sum_i e_i * (J(i) - J(i-1)), J(i) = Jaccard loss of the first i.
        prev, value = 0.0, 0.0
        for i in range(len(e)):
            inter = g.sum() - g[: i + 1].sum()
            union = g.sum() + (1 - g[: i + 1]).sum()
            j = 1 - inter / union
            value += float(e[i]) * (float(j) - prev)
            prev = float(j)
        losses.append(value)
    return sum(losses) / len(losses)


def test_lovasz_matches_masked_reference_and_ignores_void():
    g = torch.Generator().manual_seed(4)
    probs = torch.randn(2, 4, 3, 5, generator=g).softmax(1)
    labels = torch.randint(0, 3, (2, 3, 5), generator=g)  # class 3 absent
    labels[0, 0] = IGNORE
    got = lovasz_softmax(probs, labels)
    assert abs(float(got) - _lovasz_masked_reference(probs, labels)) < 1e-6
    # changing the probabilities of ignored pixels changes nothing
    probs2 = probs.clone()
    probs2[0, :, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(4, 1)
    assert abs(float(lovasz_softmax(probs2, labels)) - float(got)) < 1e-7


def test_lovasz_of_hard_predictions_is_one_minus_iou():
    # At one-hot probabilities the Lovasz extension equals the Jaccard loss: mean(1 - IoU_k).
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (1, 6, 6), generator=g)
    labels[0, 0, :3] = IGNORE
    pred = torch.randint(0, 3, (1, 6, 6), generator=g)
    probs = F.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(3)
    cm.update(pred, labels)
    expected = float((1 - cm.iou()).mean())
    assert abs(float(lovasz_softmax(probs, labels)) - expected) < 1e-6


def test_segmentation_ce_upsamples_and_handles_all_ignored():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[:, :2] = IGNORE
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(segmentation_ce(logits, labels), F.cross_entropy(up, labels, ignore_index=IGNORE))
    zero = segmentation_ce(logits, torch.full_like(labels, IGNORE))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert torch.all(logits.grad == 0)
    total = segmentation_loss(logits, labels, lovasz_weight=0.75)
    lov = lovasz_softmax(up.softmax(1), labels)
    torch.testing.assert_close(total, F.cross_entropy(up, labels, ignore_index=IGNORE) + 0.75 * lov)


def _lovasz_one_class_at_a_time(probs, labels):
    """The straightforward arithmetic: one sort per class over all pooled pixels."""
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    y = labels.reshape(-1)
    valid = (y != IGNORE).to(p.dtype)
    total, present = p.sum() * 0.0, 0.0
    for k in range(c):
        fg = (y == k).to(p.dtype)
        err, perm = torch.sort((fg - p[:, k]).abs() * valid, descending=True)
        g = fg[perm]
        inter = g.sum() - g.cumsum(0)
        union = g.sum() + (1 - g).cumsum(0)
        jac = 1 - inter / union
        total = total + (fg.sum() > 0) * torch.dot(err, torch.cat([jac[:1], jac[1:] - jac[:-1]]))
        present += float(fg.sum() > 0)
    return total / max(present, 1.0)


def test_lovasz_sorts_classes_in_blocks_with_the_same_value_and_gradient():
    # A per-class Python loop (19 sorts, ~30 operator calls each, and a backward that zero-fills a
    # [pixels, classes] gradient once PER class) is a per-step cost that does not shrink with the
    # batch, so the classes are sorted in blocks. Every block size gives the one-class-at-a-time value and gradient.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 19, 16, 24, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (2, 16, 24), generator=g)  # classes 17, 18 absent
    labels[:, :3] = IGNORE
    x0 = logits.clone().requires_grad_()
    want = _lovasz_one_class_at_a_time(x0.softmax(1), labels)
    want.backward()
    pixels = labels.numel()
    for block in (1, pixels, 5 * pixels, 19 * pixels, 1 << 22):
        x = logits.clone().requires_grad_()
        got = lovasz_softmax(x.softmax(1), labels, block_elems=block)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x0.grad, rtol=1e-10, atol=1e-12)


def test_lovasz_at_the_synthetic_size_is_one_sort_and_no_per_class_fill():
    from torch.profiler import profile

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 19, 64, 128, generator=g).requires_grad_()
    labels = torch.randint(0, 19, (2, 64, 128), generator=g)
    with profile() as prof:
        lovasz_softmax(x.softmax(1), labels).backward()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::sort", 0) == 1, calls.get("aten::sort")
    assert calls.get("aten::fill_", 0) < 19, calls.get("aten::fill_")  # was one zero-fill per class
