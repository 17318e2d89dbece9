"""Cache hits restored by the launcher itself: no job, no allocation, no stage process.

When the launcher plans a stage that must run and whose stage key (``sdca_dist.stage_keys``)
already has an entry in the stage cache, it restores the entry into the stage folder itself,
exactly as the stage's own start would (``sdca_dist.engine.runner``): the stage lock, the
lineage record (inputs verified against their producers' records; shard tars from their
verification records), the entry's files linked or copied and verified, then ``DONE`` with the
producer's summary, ``reused_from`` and ``restored_by: "launcher"``. On SLURM that saves a GPU
allocation that would only copy files; locally a stage process (torch and DALI imports, ~6 s).

The key is the one the stage's job would compute: the planned world size and the device type the
engine would pick (``cuda`` with ``cluster.gpus_per_node > 0``, else ``cpu``). Anything that
keeps the launcher from being sure ends in "not restored" and the stage runs as a job, as before:
no cache for the stage (``cache=false``, ``redo=``), an input not there yet (its producer runs in
this launch), a shard tar without a valid verification record (the launcher reads no tar to
make a key: the stage's ranks hash it, in parallel), no entry or a corrupt one (the job
reports and removes it under the key's lock), a key being computed right now (the launcher
never waits for it), a stage folder in use. A miss is never wrong, only slower. No torch here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from sdca_dist.data.verification import Unverified
from sdca_dist.lineage import Lineage, MissingInputError, RunFolderBusy, StageInputError, StageLock, settings_record
from sdca_dist.stage_cache import CachedStage, cache_for_run
from sdca_dist.stage_keys import code_version, stage_key


def engine_device(cfg: Any) -> str:
    """The device type a stage's ranks run on: ``cuda`` when the cluster gives GPUs (the engine
    refuses to run without them then), else ``cpu``."""
    return "cuda" if int(cfg.cluster.gpus_per_node) > 0 else "cpu"


def restore_from_cache(
    cfg: Any, run_dir: Path, stage: str, world_size: int, log: Callable[[str], None] = print
) -> Optional[dict]:
    """Restore ``stage`` of ``run_dir`` from the stage cache when its key has an entry; the DONE
    summary written, or None (the stage must run as a job)."""
    t0 = time.time()
    cache = cache_for_run(run_dir, stage, log=lambda m: log(f"[{stage}] {m}"))
    if cache is None:
        return None
    lineage = Lineage(run_dir, read_tars=False)  # a tar without a valid record: left to the stage's ranks
    try:
        record = {**lineage.current(cfg, stage)}
    except (MissingInputError, StageInputError, Unverified, OSError):
        return None  # the stage's job reports it, in its own words
    key = stage_key(cfg, stage, record["inputs"], world_size=world_size, device=engine_device(cfg))
    entry = cache.peek(key)
    if entry is None:
        return None
    lock = StageLock(Path(run_dir) / stage)
    try:
        lock.acquire()
    except (RunFolderBusy, OSError):
        return None
    try:
        lineage.begin(stage, record, log=log)
        summary = CachedStage(cache, key, stage, Path(run_dir) / stage).restore(entry, t0, remove_corrupt=False)
        if summary is None:
            return None
        summary["restored_by"] = "launcher"
        summary["world_size"] = world_size
        lineage.finish(
            stage,
            {**record, "reused_from": key},
            {**summary, "key": key, "code": code_version()},
            settings=settings_record(cfg),
        )
    finally:
        lock.release()
    log(
        f"[{stage}] reused from {key} (computed in {entry.get('producer')}); restored by the launcher "
        f"into {Path(run_dir) / stage}: no job, no stage process"
    )
    return summary
