"""Statistics over seeds, the one home of them: mean, sample std and the 95% t interval of a
mean, and paired differences by seed.

Both summaries use it: a run's (``sdca_dist.launch.summary``: the alignment effect of the
ablation) and a grid's (``sdca_dist.launch.grid_summary``: every point against the baseline, each
factor's main effect). A seed fixes the src model, the distributions and the data order, so two
results of one seed pair; the interval is that of the mean of the per-seed values (Student's t
with n - 1 degrees of freedom), absent (None) with one seed. No torch, no numpy.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

#: two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (table to 30 degrees of freedom, then the Cornish-Fisher
    expansion, within 0.001 of the exact value); NaN below 1."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1; 0.0 for one value) of a non-empty sequence."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def ci95(mean: float, std: float, n: int) -> Optional[list[float]]:
    """The 95% t interval of a mean of ``n`` values with sample std ``std``; None for n < 2."""
    if n < 2:
        return None
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return [mean - half, mean + half]


def over_seeds(per_seed: dict[int, float]) -> dict[str, Any]:
    """{per_seed, n, mean, std, ci95} of one quantity measured once per seed."""
    vals = list(per_seed.values())
    mean, std = mean_std(vals)
    return {"per_seed": dict(per_seed), "n": len(vals), "mean": mean, "std": std, "ci95": ci95(mean, std, len(vals))}


def paired(a: dict[int, float], b: dict[int, float]) -> Optional[dict[str, Any]]:
    """``a - b`` seed by seed over the seeds both have, with mean, std and 95% interval
    (``over_seeds``); None when they share no seed."""
    common = [s for s in a if s in b]
    if not common:
        return None
    return over_seeds({s: a[s] - b[s] for s in common})


def fmt_interval(stats: dict[str, Any], signed: bool = True) -> str:
    """``[lo, hi]`` (with signs: a difference), or ``n/a (1 seed)``."""
    if stats.get("ci95") is None:
        return "n/a (1 seed)"
    lo, hi = stats["ci95"]
    return f"[{lo:+.2f}, {hi:+.2f}]" if signed else f"[{lo:.2f}, {hi:.2f}]"
