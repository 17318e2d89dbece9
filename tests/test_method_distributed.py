"""Real multi-process (gloo) runs: every rank ends identical to one process on the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from method_fixtures import pooled_statistics, random_batches, reference_running_merge, run_distributed, shard

from sdca_dist.method import ClassThresholds, ConfusionMatrix, SemanticDistribution, update_distributions

C, A = 5, 16
NUM_BATCHES = 8


def _global_data():
    feats = random_batches(
        seed=11, num_batches=NUM_BATCHES, num_classes=C, dim=A, max_pixels=80, offset=500.0, scale=0.3
    )
    logits = [(f[:, :C] * 0.5 - 2.0, l) for f, l in feats]
    g = torch.Generator().manual_seed(12)
    probs = [torch.randn(6, C, 4, 5, generator=g).mul(3).softmax(1) for _ in range(3)]
    labels = [torch.randint(0, C, (6, 4, 5), generator=g) for _ in range(3)]
    return feats, logits, probs, labels


def _worker(rank: int, world: int) -> dict:
    feats, logits, probs, labels = _global_data()
    calls: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting  # default seam looks dist.all_reduce up at call time
    try:
        feat_d, out_d = SemanticDistribution(C, A), SemanticDistribution(C, C)
        per_update = []
        for (f, l), (o, _) in zip(feats, logits):
            before = len(calls)
            fr, lr = shard((f, l), rank, world)
            orr, _ = shard((o, l), rank, world)
            update_distributions([(feat_d, fr, lr), (out_d, orr, lr)])
            per_update.append(len(calls) - before)
        single_d = SemanticDistribution(C, A)
        before = len(calls)
        single_d.update(*shard(feats[0], rank, world))
        single_calls = len(calls) - before

        th = ClassThresholds(C, bins=2000)
        cm = ConfusionMatrix(C)
        for p, lab in zip(probs, labels):
            b = p.shape[0]
            lo, hi = b * rank // world, b * (rank + 1) // world
            th.update(p[lo:hi])
            cm.update(p[lo:hi].argmax(1), lab[lo:hi])
        before = len(calls)
        thresholds = th.compute(cap=0.9)
        cm.all_reduce()
        metric_calls = len(calls) - before
    finally:
        dist.all_reduce = original
    return {
        "feat": feat_d.state_dict(),
        "out": out_d.state_dict(),
        "per_update": per_update,
        "single_calls": single_calls,
        "thresholds": thresholds,
        "cm": cm.mat,
        "miou": cm.miou(),
        "metric_calls": metric_calls,
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_with_single_process_on_concatenated_batch(world: int):
    results = run_distributed(_worker, world)
    feats, logits, probs, labels = _global_data()

    for r in results:
        assert r["per_update"] == [1] * NUM_BATCHES  # feature + output level share ONE all-reduce
        assert r["single_calls"] == 1
        assert r["metric_calls"] == 2  # one for the threshold histograms, one for the matrix
    # bit-identical on every rank
    for r in results[1:]:
        for level in ("feat", "out"):
            for key, value in results[0][level].items():
                assert torch.equal(value, r[level][key]), (level, key)
        assert torch.equal(r["thresholds"], results[0]["thresholds"])
        assert torch.equal(r["cm"], results[0]["cm"])

    # equal to the float64 single-process running merge over the concatenated (global) batches
    for level, batches, dim in (("feat", feats, A), ("out", logits, C)):
        count, mean, var = reference_running_merge(batches, C)
        got = results[0][level]
        assert torch.equal(got["count"], count.long())
        torch.testing.assert_close(got["mean"], mean, rtol=1e-5, atol=1e-5 * float(mean.abs().max()))
        torch.testing.assert_close(got["var"], var, rtol=1e-5, atol=1e-5 * float(var.abs().max()))
        all_f = torch.cat([f for f, _ in batches])
        all_l = torch.cat([l for _, l in batches])
        _, pooled_mean, pooled_var = pooled_statistics(all_f, all_l, C)
        torch.testing.assert_close(got["var"], pooled_var, rtol=1e-5, atol=1e-5 * float(pooled_var.abs().max()))

    # thresholds and mIoU equal the single-process values
    conf = np.concatenate([p.max(1).values.numpy().ravel() for p in probs])
    pred = np.concatenate([p.max(1).indices.numpy().ravel() for p in probs])
    exact = np.array([min(np.median(conf[pred == k]), 0.9) if (pred == k).any() else 0.0 for k in range(C)])
    assert np.abs(results[0]["thresholds"].numpy() - exact).max() <= 0.5 / 2000 + 1e-7
    cm = ConfusionMatrix(C)
    for p, lab in zip(probs, labels):
        cm.update(p.argmax(1), lab)
    assert torch.equal(results[0]["cm"], cm.mat)
    assert results[0]["miou"] == pytest.approx(cm.miou())
