"""Run one stage on this rank group: the single entry the CLI and the SLURM job share.

Order of business (every rank agrees on each outcome before going on, so no rank is left
waiting in a collective): the synthetic shards (generated on first use by the first rank to take
their lock, before the process group exists), the stage lock (rank 0), the job shape against the
stage's global batches, the shard tars without a valid verification record hashed by all ranks at
once (each its share, about the same number of bytes, results gathered: no rank waits while
another reads the data sets alone), the lineage (inputs verified against their producers'
records; work from other settings or inputs discarded), then the stage's function from the stage
table, then a check that every tensor the stage leaves for later stages (``model_final.pt``,
``distributions.pt``) is finite, then DONE with the lineage, the settings and the output hashes.
Non-finite outputs: one line naming the file and
the count, exit 2, no DONE (a later stage must never build on NaN weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from sdca_dist.config import reads
from sdca_dist.data.sets import DataConfigError, check_manifests, ensure_synthetic_shards
from sdca_dist.data.verification import FULL_CHECK_DAYS, verify_share
from sdca_dist.engine.distributed import (
    DistContext,
    all_gather_object,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from sdca_dist.engine.environment import record_environment
from sdca_dist.engine.observe import StageObserver
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.image_scale import scale_line
from sdca_dist.lineage import (
    Lineage,
    MissingInputError,
    RunFolderBusy,
    StageInputError,
    StageLock,
    StageOutputError,
    settings_record,
)
from sdca_dist.locks import LockError
from sdca_dist.rank_scaling import ScaleError, check_world, plan_warnings, scaled_schedule
from sdca_dist.run_folder import RunDir
from sdca_dist.stage_cache import open_cached_stage
from sdca_dist.stage_keys import code_version, stage_key
from sdca_dist.stage_table import spec

#: errors a rank-0-only step may raise that every rank must raise too (the CLI maps them to exit 2)
_AGREED = {
    c.__name__: c
    for c in (
        MissingInputError,
        StageInputError,
        StageOutputError,
        RunFolderBusy,
        DataConfigError,
        ScaleError,
        LockError,
        FileNotFoundError,
        OSError,  # no space, a read-only run folder: one line naming the path
    )
}


def _on_rank0(ctx: DistContext, work: Callable[[], object]):
    """Run ``work`` on rank 0 and hand its result, or its error, to every rank."""
    outcome: tuple = ("ok", None)
    if ctx.is_main:
        try:
            outcome = ("ok", work())
        except tuple(_AGREED.values()) as exc:
            name = type(exc).__name__
            outcome = (name if name in _AGREED else "OSError", str(exc))
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            outcome = ("RuntimeError", f"{type(exc).__name__}: {exc}")
    outcome = broadcast_object(outcome, ctx)
    if outcome[0] != "ok":
        raise _AGREED.get(outcome[0], RuntimeError)(outcome[1])
    return outcome[1]


#: seconds between two tries for a stage-cache key that another job is computing
CACHE_POLL_S = 2.0
_NO_CACHE = object()


def _cache_outcome(ctx: DistContext, cached):
    """The stage cache's answer for this stage, waited for by every rank together: rank 0 tries
    the key's lock without waiting, every rank learns the outcome (one short collective), and
    while another job computes the key all ranks sleep and try again. No rank ever sits in a
    collective while rank 0 waits for another job (it would pass the process-group timeout).
    Returns the summary on a hit, None on a miss (this job computes), ``_NO_CACHE`` when the
    cache's folder refuses lock files (one line said; the stage computes without the cache)."""
    from sdca_dist.locks import LockError

    def attempt():
        if cached is None:
            return "miss", None
        try:
            return cached.attempt()
        except LockError as exc:
            cached.cache.log(f"stage cache not used: {exc}")
            return "off", None

    said = False
    while True:
        outcome, summary = _on_rank0(ctx, attempt)
        if outcome == "off":
            return _NO_CACHE
        if outcome != "busy":
            return summary
        if ctx.is_main and not said:
            cached.cache.log(
                f"stage cache: key {cached.key[:12]} is being computed by {cached.cache.holder(cached.key)}; "
                "every rank waits for it, then reuses its result"
            )
        said = True
        time.sleep(CACHE_POLL_S)


def check_finite_outputs(stage: str, folder: Path) -> None:
    """Raise StageOutputError naming the first output tensor file of ``stage`` that holds NaN or inf."""
    import torch

    for name in spec(stage).outputs:
        path = folder / name
        if not name.endswith(".pt") or not path.is_file():
            continue
        tensors = _tensors(torch.load(path, map_location="cpu", weights_only=True))
        bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
        if bad:
            total = sum(t.numel() for t in tensors if t.is_floating_point())
            raise StageOutputError(
                f"{path} holds {bad} non-finite values (of {total}): stage {stage} writes no DONE and "
                "no later stage may use it (lower the learning rate or check the inputs, then rerun it)"
            )


def _tensors(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def verify_tars_in_parallel(cfg: DictConfig, stage: str, lineage: Lineage, ctx: DistContext, logs: list) -> dict:
    """Every rank hashes its share of the stage's shard tars that have no valid verification
    record (or one older than ``FULL_CHECK_DAYS``), then the results are gathered into
    ``lineage.known`` for rank 0's check. With valid records nothing is read; without, each rank
    reads about 1/world of the bytes and waits in the gather only for the slowest share.
    Returns what this rank hashed ({tar path: {"sha256", **stat}})."""
    t0 = time.time()
    try:
        tars = lineage.shard_tars(cfg, stage)
        mine = verify_share(tars, ctx.rank, ctx.world_size)
    except Exception:  # noqa: BLE001 - never skip the gather; rank 0's own check names any problem
        tars, mine = [], {}
    for part in all_gather_object(mine, ctx):
        lineage.known.update(part)
    if lineage.known:
        gb = sum(int(v["size"]) for v in lineage.known.values()) / 1e9
        logs.append(
            f"hashed {len(lineage.known)} of {len(tars)} shard tars ({gb:.2f} GB, no valid verification record) "
            f"on {ctx.world_size} rank(s) in {time.time() - t0:.1f}s"
        )
    return mine


def _log_start(cfg: DictConfig, ctx: DistContext, run: RunDir, observer: StageObserver) -> None:
    """Rank 0's opening lines: the settings that differ from the preset, the schedule, the
    train/test scale and the plan's warnings. Logging compares every setting and every stage's
    scale, so it is not part of what the stage reads (``sdca_dist.config.reads``)."""
    from sdca_dist.config.run_config import config_path, differing_from_preset

    stage = cfg.stage
    with reads.unrecorded():
        changed = differing_from_preset(cfg)
        observer.log(
            f"rank 0 of {ctx.world_size} ({ctx.backend}, {ctx.device}); conf={cfg.conf}"
            + (f" with {' '.join(changed)}" if changed else " as published")
            + f" (all settings: {config_path(run.root)})"
        )
        if spec(stage).training:
            observer.log(f"schedule: {json.dumps(scaled_schedule(cfg, stage).as_dict())}")
            observer.log(scale_line(cfg, stage))
            for line in plan_warnings(cfg, [stage]):
                observer.log(line)
        observer.text("config", config_path(run.root).read_text() if config_path(run.root).is_file() else "")


def run_stage(cfg: DictConfig) -> dict:
    """Run ``cfg.stage``; returns its summary. Raises ``Preempted`` after a stop-signal checkpoint."""
    reads.start()  # SDCA_RECORD_READS: the stage-key test's record of the settings this stage reads
    stage = cfg.stage
    stage_spec = spec(stage)
    run = RunDir(Path(cfg.run_dir))
    lineage = Lineage(run.root, max_age_days=FULL_CHECK_DAYS)
    lock = StageLock(run.stage(stage))
    # the synthetic shards, by every rank before the process group exists: the first to take the
    # generation lock makes them, the others (and other jobs) wait for the lock, not in a collective.
    # The generator makes every missing shard set (names and generator settings); what this stage
    # reads of them is its own sets, hashed into its key through their manifests
    logs: list[str] = []
    with reads.unrecorded():
        ensure_synthetic_shards(cfg, log=logs.append)
    ctx = init_distributed(cfg.engine.backend, require_cuda=int(cfg.cluster.gpus_per_node) > 0)
    cached = None
    try:
        _on_rank0(ctx, lock.acquire)
        check_world(cfg, stage, ctx.world_size)
        check_manifests(cfg, [getattr(cfg.data, k) for k in stage_spec.shard_sets])
        verify_tars_in_parallel(cfg, stage, lineage, ctx, logs)

        def begin() -> dict:
            record = lineage.current(cfg, stage)
            lineage.begin(stage, record, log=logs.append)
            return record

        record = _on_rank0(ctx, begin)
        # the stage cache: a result computed before under the same stage key is reused, not recomputed
        key = stage_key(cfg, stage, record["inputs"], world_size=ctx.world_size, device=ctx.device.type)
        if ctx.is_main:
            cached = open_cached_stage(run.root, stage, key)
        reused = _cache_outcome(ctx, cached)
        if reused is _NO_CACHE:
            cached, reused = None, None
        if reused is not None:
            ctx.barrier()
            if ctx.is_main:
                lineage.finish(
                    stage,
                    {**record, "reused_from": key},
                    {**reused, "key": key, "code": code_version()},
                    settings=settings_record(cfg),
                )
            return reused
        ctx.barrier()
        from sdca_dist.classes import run_classes

        observer = StageObserver(
            stage,
            run.stage(stage),
            ctx.is_main,
            num_classes=cfg.data.num_classes,
            palette=run_classes(cfg.data).palette(),
        )
        for line in logs:
            observer.log(line)
        if ctx.is_main:
            _log_start(cfg, ctx, run, observer)
            record_environment(run.stage(stage), ctx.device, log=observer.log)
        sc = StageContext(cfg=cfg, ctx=ctx, run=run, name=stage, observer=observer)
        t0 = time.time()
        summary = stage_spec.function()(sc)
        summary["wall_seconds"] = round(time.time() - t0, 2)
        summary["world_size"] = ctx.world_size
        ctx.barrier()
        _on_rank0(ctx, lambda: check_finite_outputs(stage, run.stage(stage)))
        if ctx.is_main:
            lineage.finish(
                stage, record, {**summary, "key": key, "code": code_version()}, settings=settings_record(cfg)
            )
            if cached is not None:
                cached.publish(summary, code_version())
            observer.log(f"done in {summary['wall_seconds']:.1f}s -> {run.stage(stage)}")
        observer.close()
        return summary
    finally:
        reads.write(stage, ctx.rank)
        if cached is not None:
            cached.release()
        if ctx.is_main:
            lock.release()
        shutdown_distributed()
