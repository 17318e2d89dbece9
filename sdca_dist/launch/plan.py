"""The launch plan, made and checked before anything is written or queued.

Which seeds run in which folder, each folder's run configuration (frozen, or composed for a new
run), which stages the launch plans (the chain's, plus each reference stage whose
``launch_flag`` is set), each stage's job shape, and the checks that refuse a plan that cannot
run: a cluster shape the machine cannot give, an input no planned stage produces, a missing shard
manifest or weights file (which a dry run lists as what the run will need, with how to make it,
and plans anyway). Writes nothing; imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from sdca_dist.config import ConfigError, compose_config
from sdca_dist.config.run_config import resolve, with_values
from sdca_dist.config.schema import LaunchConfig
from sdca_dist.launch.backends.base import LaunchError
from sdca_dist.rank_scaling import parse_scale, plan_row, resolve_scale
from sdca_dist.run_folder import planned_seed_folders, seed_folders
from sdca_dist.stage_table import LAUNCH_FLAGS, ordered, spec


def planned_stages(launch: LaunchConfig) -> list[str]:
    """``stages=`` plus the reference stages whose launcher key is set, in table order."""
    stages = ordered(launch.stages)
    for flag, stage in LAUNCH_FLAGS.items():
        if getattr(launch, flag) and stage not in stages:
            stages = ordered(stages + [stage])
    return stages


def _arg(argv: Sequence[str], key: str) -> Optional[str]:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def _base_seed(root: Path, run_overrides: list[str], seeds: int) -> int:
    """The first seed: the command line's, else the preset's (new run), else the run folder's."""
    given = _arg(run_overrides, "seed")
    if given is not None:
        try:
            return int(given)
        except ValueError:
            raise ConfigError(f"seed={given!r} must be an integer >= 0") from None
    if any(o.split("=", 1)[0] == "conf" for o in run_overrides):
        return int(compose_config([o for o in run_overrides if o.split("=", 1)[0] != "run_dir"]).seed)
    if seeds > 1:
        found = [seed for seed, folder in seed_folders(root) if folder != root]
        return found[0] if found else 0
    return 0


def run_configs(
    run_overrides: list[str], launch: LaunchConfig, stages: list[str]
) -> list[tuple[int, Path, DictConfig, bool]]:
    """(seed, run folder, configuration, is new) per seed: the frozen configuration of an
    existing run folder (refused, naming each key, when this command line's settings differ) or
    the composed one of a new folder, with ``train.scale=auto`` resolved. Writes nothing."""
    run_dir = _arg(run_overrides, "run_dir")
    if run_dir is not None and not run_dir.strip():
        raise ConfigError("run_dir is empty; name the run folder (run_dir=runs/NAME)")
    root = Path(run_dir or "runs/default")
    base = _base_seed(root, run_overrides, launch.seeds)
    out = []
    for seed, folder in planned_seed_folders(root, [base + k for k in range(launch.seeds)]):

        def adjust(cfg: DictConfig, seed: int = seed) -> DictConfig:
            updates: dict = {"seed": seed}
            if parse_scale(cfg.train.scale) == "auto":
                ranks = launch.nodes * int(cfg.cluster.tasks_per_node)
                updates["train__scale"] = resolve_scale(cfg, ranks, stages)
            return with_values(cfg, **updates)

        overrides = [o for o in run_overrides if o.split("=", 1)[0] not in ("seed", "run_dir")]
        cfg, new = resolve(folder, overrides + ([f"seed={seed}"] if overrides else []), adjust=adjust)
        out.append((seed, folder, cfg, new))
    return out


def stage_plan(cfg: DictConfig, launch: LaunchConfig, stages: list[str]) -> dict[str, dict]:
    """Each stage's job shape and (training stages) scaled schedule: what the dry run prints."""
    k = int(parse_scale(cfg.train.scale))
    return {s: plan_row(cfg, s, launch.nodes, int(cfg.cluster.tasks_per_node), k) for s in stages}


def check_shape(cfg: DictConfig, launch: LaunchConfig, stages: list[str]) -> None:
    """Refuse, before anything is written or queued, a cluster shape that cannot run: more ranks
    per node than GPUs, or a shape the backend cannot give (``Backend.check_shape``)."""
    from sdca_dist.launch.backends import backend

    c = cfg.cluster
    if c.gpus_per_node > 0 and c.tasks_per_node > c.gpus_per_node:
        raise LaunchError(
            f"cluster.tasks_per_node={c.tasks_per_node} is more than cluster.gpus_per_node="
            f"{c.gpus_per_node} (one rank per GPU): use cluster.tasks_per_node={c.gpus_per_node}"
        )
    backend(c.name).check_shape(cfg, launch)


def preflight(cfg: DictConfig, run_dir: Path, stages: list[str]) -> list[str]:
    """Every stage input the plan reads and does not produce itself must exist and be finished;
    returns the problems (a plan that cannot run, dry or not)."""
    from sdca_dist.lineage import Lineage, stage_inputs

    problems = []
    lineage = Lineage(run_dir)
    for stage in stages:
        for inp in stage_inputs(cfg, stage):
            if inp.producer in stages:
                continue
            if not (run_dir / inp.rel).exists():
                problems.append(f"stage {stage} needs {run_dir / inp.rel} (from stage {inp.producer}, not planned)")
            elif lineage.done_record(inp.producer) is None:
                problems.append(
                    f"stage {stage} needs {run_dir / inp.rel}, but stage {inp.producer} has not finished "
                    f"(no DONE); plan it with stages="
                )
    return problems


def missing_data(cfg: DictConfig, stages: list[str]) -> list[str]:
    """The data the planned stages read that is not there yet, each with how to make it: shard
    manifests (with the ``python -m sdca_dist.shard`` command that packs the set) and weights
    files. A real launch refuses while any is missing; a dry run lists them and still plans, so
    a cluster job can be planned before its data is packed."""
    from sdca_dist.data.sets import build_hint, manifest_path, shard_set

    missing = []
    if not cfg.data.synthetic:  # synthetic shards are generated by the launcher itself
        names = sorted({getattr(cfg.data, k) for s in stages for k in spec(s).shard_sets})
        for name in names:
            mp = manifest_path(shard_set(cfg, name))
            if not mp.is_file():
                missing.append(f"missing shard manifest {mp} (pack it with {build_hint(mp.parent)})")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        missing.append(
            f"missing pretrained weights model.pretrained={cfg.model.pretrained} (docs/reproducing.md says where "
            "to get them)"
        )
    return missing


def stages_to_run(
    cfg: DictConfig, run_dir: Path, stages: list[str], restore: Optional[Callable[[str], Optional[dict]]] = None
) -> list[tuple[str, str]]:
    """(stage, why) for the planned stages that are not fresh; a stage after one that reruns
    reruns too (its input changes). ``restore(stage)`` (the launcher's cache restore,
    ``sdca_dist.launch.restore``) is asked for each stale stage none of whose producers runs in
    this launch: a stage it restores is done and runs no job."""
    from sdca_dist.lineage import Lineage, stage_inputs

    lineage = Lineage(run_dir)
    todo: list[tuple[str, str]] = []
    for stage in stages:
        ok, why = lineage.fresh(cfg, stage, rerun=[s for s, _ in todo])
        if ok:
            print(f"[launch] {run_dir} {stage}: DONE with these settings and inputs, skipped", flush=True)
            continue
        running = {s for s, _ in todo}
        if restore is not None and not any(i.producer in running for i in stage_inputs(cfg, stage)):
            if restore(stage) is not None:
                lineage = Lineage(run_dir)  # the stage's files changed: no hash remembered from before
                continue
        todo.append((stage, why))
    return todo
