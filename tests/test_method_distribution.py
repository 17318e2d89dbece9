"""SemanticDistribution: the running merge of docs/method.md, exact and numerically safe."""

from __future__ import annotations

import pytest
import torch
from method_fixtures import IGNORE, pooled_statistics, random_batches, reference_running_merge

from sdca_dist.method import SemanticDistribution, flatten_pixels, update_distributions


def _assert_matches(d: SemanticDistribution, count, mean, var, rtol: float) -> None:
    assert torch.equal(d.count, count.long())
    scale_m = mean.abs().max().clamp_min(1.0)
    scale_v = var.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(d.mean, mean, rtol=rtol, atol=rtol * scale_m)
    torch.testing.assert_close(d.var, var, rtol=rtol, atol=rtol * scale_v)


def test_running_merge_matches_float64_reference_over_many_batches():
    C, A = 6, 9
    batches = random_batches(seed=1, num_batches=40, num_classes=C, dim=A)
    d = SemanticDistribution(C, A)
    for feats, labels in batches:
        d.update(feats, labels)
    _assert_matches(d, *reference_running_merge(batches, C), rtol=1e-9)
    # ...which is also the pooled statistics of everything seen.
    all_f = torch.cat([f for f, _ in batches])
    all_l = torch.cat([l for _, l in batches])
    _assert_matches(d, *pooled_statistics(all_f, all_l, C), rtol=1e-9)


def test_absent_class_and_all_ignored_batch_leave_state_unchanged():
    C, A = 4, 3
    d = SemanticDistribution(C, A)
    d.update(torch.randn(10, A), torch.tensor([0, 1] * 5))
    before = d.state_dict()
    d.update(torch.randn(5, A), torch.full((5,), IGNORE))
    d.update(torch.randn(0, A), torch.zeros(0, dtype=torch.long))
    for key, value in before.items():
        assert torch.equal(value, d.state_dict()[key]), key
    d.update(torch.randn(4, A), torch.tensor([2, 2, IGNORE, 2]))
    assert d.count.tolist() == [5, 5, 3, 0]
    assert torch.equal(d.mean[0], before["mean"][0]) and torch.equal(d.var[1], before["var"][1])
    assert torch.all(d.mean[3] == 0) and torch.all(d.var[3] == 0)


def test_large_mean_small_std_has_no_cancellation():
    # |mean| / std ~ 6000: a float32 sum-of-squares loses the variance entirely here.
    C, A = 3, 8
    batches = random_batches(seed=7, num_batches=12, num_classes=C, dim=A, max_pixels=200, offset=3000.0, scale=0.5)
    d = SemanticDistribution(C, A)
    for feats, labels in batches:
        d.update(feats, labels)
    count, mean, var = reference_running_merge(batches, C)
    _assert_matches(d, count, mean, var, rtol=1e-6)
    assert var[count > 0].min() > 0.05  # the variance is real, not rounding noise

    # The same data through a naive float32 E[x^2] - E[x]^2 is far off: the test is sensitive.
    all_f = torch.cat([f for f, _ in batches])
    all_l = torch.cat([l for _, l in batches])
    x = all_f[all_l == 0]
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert ((naive.double() - var[0]).abs() / var[0]).max() > 1e-2


def test_update_distributions_uses_exactly_one_all_reduce_and_equals_separate_updates():
    C, A_feat = 5, 12
    batches = random_batches(seed=3, num_batches=6, num_classes=C, dim=A_feat)
    calls: list[int] = []

    def counting_identity(t: torch.Tensor) -> None:
        calls.append(t.numel())

    feat_d = SemanticDistribution(C, A_feat, all_reduce=counting_identity)
    out_d = SemanticDistribution(C, C, all_reduce=counting_identity)
    feat_ref = SemanticDistribution(C, A_feat)
    out_ref = SemanticDistribution(C, C)
    for feats, labels in batches:
        logits = feats[:, :C] * 2 - 1
        calls.clear()
        update_distributions([(feat_d, feats, labels), (out_d, logits, labels)])
        assert len(calls) == 1
        assert calls[0] == (C + 2 * C * A_feat) + (C + 2 * C * C)
        feat_ref.update(feats, labels)
        out_ref.update(logits, labels)
    for a, b in ((feat_d, feat_ref), (out_d, out_ref)):
        assert torch.equal(a.count, b.count)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.var, b.var, rtol=0, atol=0)


def test_state_dict_round_trip_and_clear_errors():
    d = SemanticDistribution(3, 4)
    d.update(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    e = SemanticDistribution(3, 4)
    e.load_state_dict(d.state_dict())
    assert torch.equal(e.mean, d.mean) and torch.equal(e.var, d.var) and torch.equal(e.count, d.count)
    bad = d.state_dict()
    bad["mean"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="'mean' has shape"):
        e.load_state_dict(bad)
    with pytest.raises(KeyError, match="'var'"):
        e.load_state_dict({"count": d.count, "mean": d.mean})


def test_labels_outside_classes_fail_loudly():
    d = SemanticDistribution(3, 2)
    with pytest.raises(ValueError, match="labels must lie in"):
        d.update(torch.randn(4, 2), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(ValueError, match=r"features must be \[N, 2\]"):
        d.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_update_needs_no_grad_and_accepts_graph_features():
    d = SemanticDistribution(2, 3)
    f = torch.randn(6, 3, requires_grad=True)
    d.update(f * 2, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert not d.mean.requires_grad and not d.var.requires_grad


def test_flatten_pixels_downsamples_labels_nearest_and_keeps_row_order():
    fmap = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    labels = torch.tensor(
        [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]], [[1] * 4, [1] * 4, [0] * 4, [0] * 4]]
    )
    feats, flat = flatten_pixels(fmap, labels)
    assert feats.shape == (8, 3)
    assert flat.tolist() == [0, 1, 2, 255, 1, 1, 0, 0]
    assert torch.equal(feats[5], fmap[1, :, 0, 1])
    # already at feature resolution: unchanged
    feats2, flat2 = flatten_pixels(fmap, labels[:, ::2, ::2])
    assert torch.equal(flat2, flat)


def test_accelerator_scatter_path_matches_cpu_path(monkeypatch):
    # GPUs use a one-hot matmul instead of index_add_; exercise that code path on CPU too.
    import sdca_dist.method.distribution as distribution

    C, A = 5, 11
    batches = random_batches(seed=21, num_batches=10, num_classes=C, dim=A)
    cpu_path = SemanticDistribution(C, A)
    for feats, labels in batches:
        cpu_path.update(feats, labels)
    monkeypatch.setattr(distribution, "_use_matmul", lambda device: True)
    monkeypatch.setattr(distribution, "_CHUNK_ELEMS_GPU", 7 * A)  # several chunks
    mm_path = SemanticDistribution(C, A)
    for feats, labels in batches:
        mm_path.update(feats, labels)
    assert torch.equal(mm_path.count, cpu_path.count)
    torch.testing.assert_close(mm_path.mean, cpu_path.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mm_path.var, cpu_path.var, rtol=1e-10, atol=1e-12)
