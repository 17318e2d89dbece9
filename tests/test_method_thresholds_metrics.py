"""Pseudo-label thresholds (streaming median) and confusion-matrix metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_fixtures import IGNORE

from sdca_dist.classes import SYNTHIA13_IN_16, class_names
from sdca_dist.method import ClassThresholds, ConfusionMatrix, apply_thresholds, miou_report


def _probs(seed: int, b: int = 3, c: int = 5, h: int = 16, w: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 3.0
    logits[:, 4] -= 50.0  # class 4 is never predicted
    return logits.softmax(1)


def numpy_thresholds(probs_list, c, cap):
    conf = np.concatenate([p.max(1).values.numpy().ravel() for p in probs_list])
    pred = np.concatenate([p.max(1).indices.numpy().ravel() for p in probs_list])
    out = np.zeros(c)
    for k in range(c):
        x = conf[pred == k]
        out[k] = min(np.median(x), cap) if x.size else 0.0
    return out


def test_thresholds_match_numpy_median_streaming():
    batches = [_probs(s) for s in range(4)]
    th = ClassThresholds(5)
    for p in batches:
        th.update(p)
    got = th.compute(cap=1.0).numpy()
    exact = numpy_thresholds(batches, 5, cap=1.0)
    assert np.abs(got - exact).max() <= 0.5 / th.bins + 1e-7
    assert got[4] == 0.0
    capped = th.compute(cap=0.6).numpy()  # compute twice: no double counting
    assert np.abs(capped - numpy_thresholds(batches, 5, cap=0.6)).max() <= 0.5 / th.bins + 1e-7
    assert th.counts.shape == (5, th.bins) and int(th.counts.sum()) == sum(p[:, 0].numel() for p in batches)


def test_thresholds_median_of_two_distant_values_is_their_mean():
    probs = torch.tensor([[0.3, 0.9], [0.7, 0.1]]).view(1, 2, 1, 2)  # class 0: 0.9; class 1: 0.7
    probs = torch.cat([probs, torch.tensor([[0.55, 0.2], [0.45, 0.8]]).view(1, 2, 1, 2)], dim=3)
    th = ClassThresholds(2, bins=1000)
    th.update(probs)
    got = th.compute(cap=1.0)
    # class 0 sees {0.9, 0.55} -> 0.725; class 1 sees {0.7, 0.8} -> 0.75
    assert abs(float(got[0]) - 0.725) <= 5e-4 + 1e-6 and abs(float(got[1]) - 0.75) <= 5e-4 + 1e-6


def test_apply_thresholds_ignores_pixels_below_their_class_threshold():
    probs = torch.tensor([[0.95, 0.5, 0.2], [0.05, 0.5, 0.8]]).view(1, 2, 1, 3)
    labels = apply_thresholds(probs, torch.tensor([0.9, 0.85]))
    assert labels.tolist() == [[[0, IGNORE, IGNORE]]]
    labels = apply_thresholds(probs, torch.tensor([0.5, 0.8]))
    assert labels.tolist() == [[[0, 0, 1]]]


def test_confusion_matrix_hand_checked_case():
    # true:  0 0 1 1 2 255 ; pred: 0 1 1 1 0 2
    label = torch.tensor([[[0, 0, 1, 1, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1, 0, 2]]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    assert cm.mat[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = cm.iou()
    # class 0: tp 1, union 1+1+1 = 3; class 1: tp 2, union 3; class 2: tp 0, union 1; class 3: nan
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert math.isnan(float(iou[3]))
    assert cm.miou() == pytest.approx(100.0 / 3.0)
    assert cm.miou([0, 1]) == pytest.approx(50.0)
    table = cm.table(["a", "b", "c", "d"])
    assert "a" in table and "n/a" in table and table.splitlines()[-1].startswith("mIoU")
    with pytest.raises(ValueError, match="labels must lie in"):
        cm.update(pred, torch.tensor([[[0, 0, 1, 1, 7, IGNORE]]]))


def test_miou_report_16_classes_has_13_class_mean():
    g = torch.Generator().manual_seed(9)
    label = torch.randint(0, 16, (2, 8, 8), generator=g)
    pred = torch.where(torch.rand(2, 8, 8, generator=g) < 0.7, label, torch.randint(0, 16, (2, 8, 8), generator=g))
    cm = ConfusionMatrix(16)
    cm.update(pred, label)
    rep = miou_report(cm, 16)
    names = class_names(16)
    assert list(rep["per_class"]) == list(names)
    per = [rep["per_class"][names[i]] for i in SYNTHIA13_IN_16]
    assert rep["mIoU13"] == pytest.approx(float(np.nanmean(per)))
    assert rep["mIoU"] == pytest.approx(float(np.nanmean(list(rep["per_class"].values()))))
    assert "mIoU13" not in miou_report(ConfusionMatrix(19), 19)
