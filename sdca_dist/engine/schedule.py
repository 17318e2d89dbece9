"""Poly learning-rate schedule with the classifier's multiplier (docs/method.md: power 0.9)."""

from __future__ import annotations

from typing import Iterable


def poly_lr(base_lr: float, iteration: int, schedule_iters: int, power: float = 0.9, warmup_iters: int = 0) -> float:
    """``base * (1 - it/schedule)^power``; the reference decays over a horizon longer than it trains.

    ``warmup_iters`` > 0 (scaled recipe only) ramps the rate linearly from base/warmup to the poly
    value over the first steps: the linear scaling rule's large rate is unstable at the start."""
    frac = min(max(iteration, 0) / float(max(schedule_iters, 1)), 1.0)
    lr = base_lr * (1.0 - frac) ** power
    if warmup_iters > 0 and iteration < warmup_iters:
        lr *= (iteration + 1) / warmup_iters
    return lr


def apply_lr(param_groups: Iterable[dict], lr: float) -> None:
    """Set every group's LR to ``lr * group['lr_mult']`` (classifier groups carry 10x)."""
    for group in param_groups:
        group["lr"] = lr * float(group.get("lr_mult", 1.0))
