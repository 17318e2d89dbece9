"""Run one stage on this rank group: the single entry the CLI and the SLURM launcher share."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from sdca_dist.config import config_to_yaml
from sdca_dist.engine.data import DataConfigError, check_manifests, ensure_synthetic_shards
from sdca_dist.engine.distributed import broadcast_object, init_distributed, shutdown_distributed
from sdca_dist.engine.observe import StageObserver
from sdca_dist.engine.run_dir import RunDir, check_inputs
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.engine.stages import registry

#: shard sets each stage reads directly (pseudo-label shards are checked as a stage input)
STAGE_SHARDS = {
    "src": ("source", "target_val"),
    "oracle": ("target_train", "target_val"),
    "dist_init": ("source",),
    "sdca": ("source", "target_train", "target_val"),
    "pseudo_label": ("target_train",),
    "ssl": ("target_val",),
    "eval": ("target_val",),
}


def run_stage(cfg: DictConfig) -> dict:
    """Run ``cfg.stage``; returns its summary. Raises ``Preempted`` after a stop-signal checkpoint."""
    stage = str(cfg.stage)
    run = RunDir(Path(cfg.run_dir))
    ctx = init_distributed(str(cfg.engine.backend))
    try:
        folder = run.stage(stage)
        if ctx.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        observer = StageObserver(stage, folder, ctx.is_main, num_classes=int(cfg.data.num_classes))
        if ctx.is_main:
            text = config_to_yaml(cfg)
            observer.log(f"rank 0 of {ctx.world_size} ({ctx.backend}, {ctx.device}); config:\n{text}")
            (folder / "config.yaml").write_text(text)
            observer.text("config", text)
        check_inputs(run, stage, str(cfg.eval.model_from))
        # rank 0 generates the synthetic shards (if missing) while the others wait; a failure
        # there is told to every rank, so none is left waiting in a collective
        problem = None
        if ctx.is_main:
            try:
                ensure_synthetic_shards(cfg, log=observer.log)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                problem = f"{type(exc).__name__}: {exc}"
        problem = broadcast_object(problem, ctx)
        if problem is not None:
            raise DataConfigError(f"synthetic benchmark generation failed: {problem}")
        check_manifests(cfg, [getattr(cfg.data, k) for k in STAGE_SHARDS[stage]])
        sc = StageContext(cfg=cfg, ctx=ctx, run=run, name=stage, observer=observer)
        t0 = time.time()
        summary = registry()[stage](sc)
        summary["wall_seconds"] = round(time.time() - t0, 2)
        summary["world_size"] = ctx.world_size
        ctx.barrier()
        if ctx.is_main:
            run.mark_done(stage, summary)
            observer.log(f"done in {summary['wall_seconds']:.1f}s -> {folder}")
        observer.close()
        return summary
    finally:
        shutdown_distributed()
