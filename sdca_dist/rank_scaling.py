"""Rank scaling (scale-out): the scaled recipe (``train.scale=K``) and each stage's job shape.

The published recipe fixes GLOBAL batches (src/ssl 8, sdca 4 + 4), so data parallelism beyond
8 ranks needs a different recipe. ``train.scale=K`` is the linear scaling rule (Goyal et al.,
2017): global batches x K, learning rate x K, iterations, poly horizon and every cadence / K, so
the run sees the same number of images on the same schedule; a linear warm-up keeps the first
steps at the larger rate stable. K = 1 is the published recipe, unchanged.

A job shape is (nodes, tasks per node). Inference stages take every rank the user grants (each
image once); a training stage takes the largest world size that its global batches split over
evenly and that the cluster can give. This module has no torch: the launcher's preflight and the
engine's check (torchrun users) both call it, so both refuse the same plans with the same words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sdca_dist.stage_table import TRAINING_STAGES, spec


class ScaleError(ValueError):
    """A plan that cannot run; the one-line message names the key and the fix."""


def parse_scale(value: Any) -> int | str:
    """``train.scale``: an integer >= 1 or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (isinstance(value, str) and value.strip().isdigit())
        or (isinstance(value, float) and value.is_integer())
    ):
        raise ScaleError(f"train.scale={value!r} must be an integer >= 1 or auto")
    k = int(value)
    if k < 1:
        raise ScaleError(f"train.scale={k} must be an integer >= 1 or auto")
    return k


#: fraction of the scaled stage over which ``train.warmup_iters=-1`` ramps the LR up (K > 1).
#: Measured on the synthetic benchmark (benchmarks/2026-11-27-scaled-recipe-accuracy.md; K = 4, src, seed 0,
#: K = 1 scores 24.27): no warm-up 18.00, 5% 16.33, 25% 21.91, 50% 25.53 mIoU.
WARMUP_FRACTION = 0.5


def default_warmup(scale: int, iters: int) -> int:
    """Warm-up length used when ``train.warmup_iters=-1``: none at K=1 (the published recipe);
    otherwise the first half of the scaled stage (``WARMUP_FRACTION``), at least 1 step per unit
    of K. Goyal et al. warm up over ~5 of 90 epochs, but on the short synthetic stages the K x
    learning rate makes the src loss spike in the first steps and sdca diverge; only a long ramp
    avoids it (benchmarks/2026-11-27-scaled-recipe-accuracy.md)."""
    if scale <= 1:
        return 0
    return min(iters, max(scale, round(WARMUP_FRACTION * iters)))


@dataclass(frozen=True)
class ScaledSchedule:
    """A training stage's schedule after scaling: what the engine runs and the dry run prints."""

    iters: int
    schedule_iters: int
    lr: float
    global_batch: int
    global_target_batch: int
    warmup_iters: int
    checkpoint_every: int
    log_every: int
    image_every: int
    scale: int
    #: train.select=best_val: evaluate on target val every this many (scaled) iterations
    select_every: int = 1000

    def as_dict(self) -> dict:
        return asdict(self)


def _div(n: int, k: int) -> int:
    return max(1, math.ceil(n / k))


def scaled_schedule(cfg: Any, stage: str) -> ScaledSchedule:
    """The schedule of training stage ``stage`` under ``cfg.train.scale`` (an integer by then);
    ``train.iters`` overrides the stage's own count (keeping its horizon ratio) before scaling."""
    k = parse_scale(cfg.train.scale)
    if k == "auto":
        raise ScaleError(
            "train.scale=auto must be resolved to an integer before the stage runs "
            "(the launcher does it; under torchrun it is resolved from WORLD_SIZE)"
        )
    s = cfg[spec(stage).schedule]
    base_iters = int(cfg.train.iters) if cfg.train.iters is not None else int(s.iters)
    horizon = max(base_iters, round(int(s.schedule_iters) * base_iters / max(int(s.iters), 1)))
    iters = _div(base_iters, k)
    t = cfg.train
    warm = int(t.warmup_iters)
    return ScaledSchedule(
        iters=iters,
        schedule_iters=max(iters, _div(horizon, k)),
        lr=float(s.lr) * k,
        global_batch=int(s.batch_size) * k,
        global_target_batch=int(s.target_batch_size) * k,
        warmup_iters=default_warmup(k, iters) if warm < 0 else min(warm, iters),
        checkpoint_every=_div(int(t.checkpoint_every), k),
        log_every=_div(int(t.log_every), k),
        image_every=_div(int(t.image_every), k),
        scale=k,
        select_every=_div(int(t.select_every), k),
    )


#: a scaled training stage shorter than this is warned about: the linear scaling rule is measured
#: here up to K = 4 (README "Accuracy of the scaled recipe"); a stage of a few dozen steps at a
#: K-fold learning rate is mostly warm-up and outside anything measured
MIN_SCALED_ITERS = 100


def plan_warnings(cfg: Any, stages: list[str] | None = None) -> list[str]:
    """One line per absurd part of a plan (it still runs; the launcher and the stage print these):
    a warm-up that covers a whole stage (the learning rate never reaches its value), and a scaled
    stage (K > 1) left with fewer than ``MIN_SCALED_ITERS`` iterations."""
    out = []
    for stage in [s for s in (stages or TRAINING_STAGES) if s in TRAINING_STAGES]:
        s = scaled_schedule(cfg, stage)
        if s.warmup_iters >= s.iters and s.warmup_iters > 0:
            out.append(
                f"warning: stage {stage}: warm-up ({s.warmup_iters} iterations) covers the whole stage "
                f"({s.iters} iterations): its learning rate never reaches {s.lr:g}"
                + (f" (train.scale={s.scale})" if s.scale > 1 else " (lower train.warmup_iters)")
            )
        if s.scale > 1 and s.iters < MIN_SCALED_ITERS:
            out.append(
                f"warning: stage {stage}: train.scale={s.scale} leaves {s.iters} iterations at global batch "
                f"{s.global_batch} and lr {s.lr:g}; the scaled recipe is measured up to K=4 (README "
                "'Scaling out'): use fewer ranks or a smaller train.scale"
            )
    return out


def _batches(cfg: Any, stage: str, k: int) -> list[tuple[str, int]]:
    s = cfg[spec(stage).schedule]
    return [(f"{stage}.{key}", int(s[key]) * k) for key in spec(stage).batch_keys]


def splits(cfg: Any, stage: str, world: int, k: int) -> bool:
    return all(b >= world and b % world == 0 for _, b in _batches(cfg, stage, k))


def resolve_scale(cfg: Any, total_ranks: int, stages: list[str] | None = None) -> int:
    """``train.scale`` as an integer; ``auto`` = the smallest K with which every training stage
    (of ``stages``, default all) can use all ``total_ranks`` ranks."""
    k = parse_scale(cfg.train.scale)
    if k != "auto":
        return k
    names = [s for s in (stages or TRAINING_STAGES) if s in TRAINING_STAGES]
    for cand in range(1, 4096 + 1):
        if all(splits(cfg, s, total_ranks, cand) for s in names):
            return cand
    raise ScaleError(f"train.scale=auto: no K <= 4096 lets every training stage use {total_ranks} ranks")


@dataclass(frozen=True)
class JobShape:
    nodes: int
    ntasks_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def job_shape(cfg: Any, stage: str, nodes: int, tasks_per_node: int, k: int) -> JobShape:
    """The shape of ``stage``'s job when the user grants ``nodes x tasks_per_node`` ranks.

    Inference stages take them all. A training stage takes the largest world size its global
    batches split over evenly; among shapes of that size, the fewest nodes (whole nodes, or part
    of one node: fewer hosts means less inter-node traffic for the same world size)."""
    if not spec(stage).training:
        return JobShape(nodes, tasks_per_node)
    best: JobShape | None = None
    for n in range(1, nodes + 1):
        for t in range(1, tasks_per_node + 1):
            if n > 1 and t != tasks_per_node:
                continue  # several nodes: whole nodes only (a rank per GPU on every node used)
            shape = JobShape(n, t)
            if splits(cfg, stage, shape.world_size, k) and (best is None or shape.world_size > best.world_size):
                best = shape
    if best is None:  # a global batch below 1 (validated elsewhere) or not splittable even on 1 rank
        raise ScaleError(f"stage {stage}: its global batch cannot run on any job shape")
    return best


def check_world(cfg: Any, stage: str, world: int) -> None:
    """Refuse a training stage whose (scaled) global batches do not split over ``world`` ranks,
    naming the fix; the engine calls this before building anything (torchrun users)."""
    if not spec(stage).training:
        return
    k = parse_scale(cfg.train.scale)
    if k == "auto":
        k = resolve_scale(cfg, world, [stage])
    for key, batch in _batches(cfg, stage, k):
        if batch < world or batch % world:
            fix = _fix(cfg, stage, world, k)
            raise ScaleError(
                f"{key}={batch // k}{f' x train.scale={k}' if k > 1 else ''} = global batch {batch} "
                f"does not split evenly over {world} ranks; {fix}"
            )


def _fix(cfg: Any, stage: str, world: int, k: int) -> str:
    fits = [w for w in range(world - 1, 0, -1) if splits(cfg, stage, w, k)]
    options = []
    for cand in range(k + 1, k * 64 + 1):
        if splits(cfg, stage, world, cand):
            options.append(f"use train.scale={cand}")
            break
    if fits:
        options.append(f"run it on {fits[0]} rank{'s' if fits[0] > 1 else ''}")
    return " or ".join(options) if options else "change the batch size"


def plan_row(cfg: Any, stage: str, nodes: int, tasks_per_node: int, k: int) -> dict:
    """One stage's plan as printed by the dry run and saved in ``<run_dir>/plan.json``."""
    shape = job_shape(cfg, stage, nodes, tasks_per_node, k)
    row: dict[str, Any] = {
        "nodes": shape.nodes,
        "ntasks_per_node": shape.ntasks_per_node,
        "world_size": shape.world_size,
    }
    if spec(stage).training:
        s = scaled_schedule(cfg, stage)
        row.update({"global_batch": s.global_batch, "per_rank_batch": s.global_batch // shape.world_size})
        if "target_batch_size" in spec(stage).batch_keys:
            row["global_target_batch"] = s.global_target_batch
        row.update(
            {
                "lr": s.lr,
                "iters": s.iters,
                "schedule_iters": s.schedule_iters,
                "warmup_iters": s.warmup_iters,
                "scale": s.scale,
            }
        )
    return row
