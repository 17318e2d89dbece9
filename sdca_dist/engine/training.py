"""The training loop shared by src, sdca, ssl and oracle.

The loop is short on purpose: the stage supplies a ``step`` (its losses and micro-steps); the
loop owns resume, the poly LR, periodic all-rank checkpoints, stop signals, progress/TensorBoard
and the end-of-stage outputs (model_final.pt, eval metrics.json, DONE). With
``train.select=best_val`` it also evaluates on target val every ``select_every`` iterations and
keeps the best weights (``sdca_dist.engine.selection``); the default ``final`` adds nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

from sdca_dist.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from sdca_dist.engine.distributed import StopVote
from sdca_dist.engine.health import TrainingHealth
from sdca_dist.engine.model_engine import ModelEngine
from sdca_dist.engine.observe import memory_high_water_mb
from sdca_dist.engine.preemption import StopSignal
from sdca_dist.engine.schedule import poly_lr
from sdca_dist.engine.selection import BestValSelection, selection_for
from sdca_dist.engine.stage_context import Schedule, StageContext
from sdca_dist.run_folder import CHECKPOINTS


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


#: (engine, batches by loader name, iteration) -> scalars to log: its loss terms as detached
#: tensors (read on the host only at log steps: ``float()`` every step would stall a GPU)
StepFn = Callable[[ModelEngine, Mapping[str, dict], int], dict[str, torch.Tensor | float]]


@dataclass
class TrainingPlan:
    schedule: Schedule
    engine: ModelEngine
    loaders: dict[str, Any]
    step: StepFn
    #: rank-identical state saved once (e.g. the semantic distributions)
    shared_state: dict[str, Stateful] = field(default_factory=dict)
    #: scalars logged every ``log_every`` besides the step's own (e.g. estimator statistics)
    extra_scalars: Callable[[], dict[str, float]] | None = None
    images_per_step: int = 1


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


#: key of ``run_training``'s statistics that hands the selection to ``finish_training`` (never
#: written anywhere: ``finish_training`` removes it)
SELECTION_KEY = "_selection"


def resume(sc: StageContext, plan: TrainingPlan, ckpt: Checkpointer, selection: BestValSelection | None = None) -> int:
    """Restore the newest whole checkpoint (if any); returns the iteration to start from."""
    path = ckpt.latest_valid()
    if path is None:
        return 0
    common, mine = ckpt.load(path, map_location=sc.ctx.device)
    plan.engine.load(common["model"], common.get("optimizer"), mine.get("optimizer"))
    for name, loader in plan.loaders.items():
        loader.load_state_dict(mine["loaders"][name])
    for name, obj in plan.shared_state.items():
        obj.load_state_dict(common["shared"][name])
    if selection is not None:
        selection.load_state_dict(common["selection"])
    set_rng_state(mine["rng"])
    sc.observer.log(f"resumed from {path} at iteration {common['iteration']}")
    return int(common["iteration"])


def save_checkpoint(
    sc: StageContext, plan: TrainingPlan, ckpt: Checkpointer, iteration: int, selection: BestValSelection | None = None
) -> None:
    common_opt, rank_opt = plan.engine.optimizer_state()
    common = {
        "iteration": iteration,
        "model": plan.engine.model_state(),
        "optimizer": common_opt,
        "shared": {n: o.state_dict() for n, o in plan.shared_state.items()},
    }
    if selection is not None:  # absent with train.select=final: nothing to save
        common["selection"] = selection.state_dict()
    mine = {
        "optimizer": rank_opt,
        "loaders": {n: l.state_dict() for n, l in plan.loaders.items()},
        "rng": rng_state(),
    }
    path = ckpt.save(iteration, common, mine)
    sc.observer.log(f"checkpoint {path.name}")


def run_training(sc: StageContext, plan: TrainingPlan) -> dict:
    """Train to ``schedule.iters`` (resuming if possible); returns the loop's final statistics."""
    cfg, ctx, obs = sc.cfg, sc.ctx, sc.observer
    sched = plan.schedule
    ckpt = Checkpointer(sc.folder / CHECKPOINTS, ctx, keep=cfg.train.keep_checkpoints, log=obs.log)
    selection = selection_for(sc, sched)
    start = resume(sc, plan, ckpt, selection)
    obs.total = sched.iters
    obs.restart_clock(start)
    every = sched.checkpoint_every
    log_every = sched.log_every
    iterators = {n: iter(l) for n, l in plan.loaders.items()}
    data_time = step_time = 0.0
    window_start = time.time()
    window_steps = 0
    last_scalars: dict[str, float] = {}
    vote = StopVote(ctx)
    health = TrainingHealth(sc.name, ctx, cfg.data.num_classes)
    with StopSignal() as stop:
        for it in range(start, sched.iters):
            t0 = time.time()
            batches = {n: _to_device(next(iterators[n]), ctx.device) for n in plan.loaders}
            for name, batch in batches.items():
                if "label" in batch:
                    health.labels(it, name, batch["label"])
            t1 = time.time()
            lr = poly_lr(sched.lr, it, sched.schedule_iters, cfg.train.poly_power, sched.warmup_iters)
            plan.engine.train(True)
            scalars = plan.step(plan.engine, batches, it)
            health.observe(it, scalars)
            plan.engine.step(lr)
            t2 = time.time()
            data_time += t1 - t0
            step_time += t2 - t0
            window_steps += 1
            done = it + 1
            stop_now = vote.vote(stop.requested)
            if stop_now:
                vote.close()  # nothing in flight while the ranks checkpoint together
            log_due = done % log_every == 0 or done == sched.iters or stop_now
            select_due = selection is not None and selection.due(done)
            checkpoint_due = done % every == 0 or done == sched.iters or stop_now
            if log_due or select_due or checkpoint_due:  # the only host reads of the step's values
                health.check()
            if select_due or checkpoint_due:
                health.check_weights(plan.engine.module.state_dict(), done)
            if log_due:
                wall = time.time() - window_start
                scalars = {
                    **{k: float(v) for k, v in scalars.items()},
                    "lr": lr,
                    "images_per_s": plan.images_per_step * ctx.world_size * window_steps / max(wall, 1e-9),
                    "data_wait_share": data_time / max(step_time, 1e-9),
                }
                if plan.extra_scalars is not None:
                    scalars.update(plan.extra_scalars())
                obs.scalars(done, scalars, prefix="train/")
                obs.progress(done, {k: v for k, v in scalars.items() if k in ("loss", "lr", "images_per_s")})
                last_scalars = scalars
                data_time = step_time = 0.0
                window_start, window_steps = time.time(), 0
            if select_due:  # before the checkpoint, which records it
                selection.evaluate(plan.engine, done)
            if checkpoint_due:
                save_checkpoint(sc, plan, ckpt, done, selection)
            if stop_now:
                obs.log("stop signal: checkpoint written, exiting for requeue")
                stop.raise_preempted(done)
        vote.close()
    obs.log(f"training done; memory high-water {memory_high_water_mb():.0f} MiB")
    stats = {
        "final_scalars": {k: float(v) for k, v in last_scalars.items()},
        "memory_high_water_mb": round(memory_high_water_mb(), 1),
    }
    if selection is not None:
        stats[SELECTION_KEY] = selection
    return stats
