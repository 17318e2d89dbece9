"""Segmentation metrics: confusion matrix, per-class IoU, mIoU at 19/16/13 classes."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from sdca_dist.classes import IGNORE_INDEX, SYNTHIA13_IN_16, class_names
from sdca_dist.method.collective import AllReduce, resolve_all_reduce


class ConfusionMatrix:
    """``mat[t, p]`` = pixels of true class t predicted as p (int64, on the device given).

    Each rank updates its own; :meth:`all_reduce` sums them once, after which every rank reports
    the same numbers.
    """

    def __init__(
        self, num_classes: int, *, device: torch.device | str = "cpu", all_reduce: AllReduce | None = None
    ) -> None:
        self.num_classes = int(num_classes)
        self._all_reduce = all_reduce
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def to(self, device: torch.device | str) -> "ConfusionMatrix":
        self.mat = self.mat.to(device)
        return self

    def update(self, pred: Tensor, label: Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        """Count ``pred``/``label`` [B, H, W] pairs; labels equal to ``ignore_index`` are skipped.

        Any other label outside [0, C) is an error (it means a wrong class table upstream).
        """
        if pred.shape != label.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} shapes differ")
        C = self.num_classes
        with torch.no_grad():
            t = label.reshape(-1).long().to(self.mat.device)
            p = pred.reshape(-1).long().to(self.mat.device)
            valid = t != ignore_index
            # A clear error now, not torch._assert_async: on CUDA that is a device-side assert that
            # surfaces later at an unrelated call. One host read per evaluated batch.
            if bool((valid & ((t < 0) | (t >= C))).any()):
                raise ValueError(f"labels must lie in [0, {C}) or equal ignore_index={ignore_index}")
            if bool(((p < 0) | (p >= C)).any()):
                raise ValueError(f"predictions must lie in [0, {C})")
            # Ignored pixels go to an extra bin C*C: static shapes, no host sync.
            flat = torch.where(valid, t * C + p, torch.full_like(t, C * C))
            counts = torch.zeros(C * C + 1, dtype=torch.int64, device=flat.device)
            counts.index_add_(0, flat, torch.ones_like(flat))  # bincount would read max(flat) on the host
            self.mat += counts[: C * C].view(C, C)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks in place (one collective). Call exactly once."""
        resolve_all_reduce(self._all_reduce)(self.mat)

    def iou(self) -> Tensor:
        """Per-class IoU (float64, 0-1); NaN for a class with empty union (absent and never predicted)."""
        m = self.mat.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self, subset: Sequence[int] | None = None) -> float:
        """Mean IoU in percent over ``subset`` (default: all classes), skipping NaN classes."""
        iou = self.iou()
        if subset is not None:
            iou = iou[list(subset)]
        iou = iou[~torch.isnan(iou)]
        return float(iou.mean() * 100.0) if iou.numel() else float("nan")

    def table(self, names: Sequence[str] | None = None) -> str:
        """A fixed-width per-class IoU table (percent) ending with the mIoU line."""
        names = list(names) if names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a {self.num_classes}-class matrix")
        width = max(len(n) for n in names + ["mIoU"])
        lines = [f"{'class':<{width}}  IoU(%)"]
        for n, v in zip(names, self.iou().tolist()):
            lines.append(f"{n:<{width}}  {'   n/a' if math.isnan(v) else f'{v * 100:6.2f}'}")
        lines.append(f"{'mIoU':<{width}}  {self.miou():6.2f}")
        return "\n".join(lines)


def miou_report(cm: ConfusionMatrix, num_classes: int | None = None, names: Sequence[str] | None = None) -> dict:
    """The numbers papers report: ``{"mIoU", "per_class": {name: IoU%}}`` plus ``"mIoU13"`` for the
    16-class SYNTHIA setting (the 16 without wall, fence, pole). Percentages; NaN for empty classes.
    ``names``: a classes file's names (a run with ``data.classes``); default the built-in table's."""
    num_classes = cm.num_classes if num_classes is None else num_classes
    if num_classes != cm.num_classes:
        raise ValueError(f"miou_report for {num_classes} classes given a {cm.num_classes}-class matrix")
    custom = names is not None
    names = list(names) if custom else class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class matrix")
    report: dict = {"mIoU": cm.miou(), "per_class": {n: float(v) * 100.0 for n, v in zip(names, cm.iou().tolist())}}
    if num_classes == 16 and not custom:
        report["mIoU13"] = cm.miou(SYNTHIA13_IN_16)
    return report
