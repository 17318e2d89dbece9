"""The launcher's command line: plan, check, freeze, run on the backend ``cluster.name`` names,
summarise (the contract: ``sdca_dist.launch``).

Exit codes: 0 when the plan ran (or, without ``wait=true`` on a cluster, was queued); 2 with one
line naming the key, file or job at fault when a setting, an input or a stage was wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import sdca_dist.launch
from sdca_dist.config import ConfigError
from sdca_dist.config.run_config import freeze, parse_launch, split_overrides
from sdca_dist.data.labelled import label_problems
from sdca_dist.files import atomic_write_text
from sdca_dist.launch.backends import backend
from sdca_dist.launch.backends.base import LaunchError, LaunchHooks, Todo
from sdca_dist.launch.plan import (
    _arg,
    check_shape,
    missing_data,
    planned_stages,
    preflight,
    run_configs,
    stage_plan,
    stages_to_run,
)
from sdca_dist.launch.summary import data_manifest, describe_data, write_summary
from sdca_dist.rank_scaling import ScaleError, parse_scale, plan_warnings
from sdca_dist.run_folder import PLAN
from sdca_dist.stage_table import spec


def main(argv: Sequence[str], hooks: Optional[LaunchHooks] = None) -> int:
    """``hooks``: set by a grid (``sdca_dist.launch.grid``) for each of its points, whose command
    line is then one run (never read as a sweep again); handed to the backend's ``run``."""
    if any(a in ("-h", "--help") for a in argv):
        print(sdca_dist.launch.__doc__)
        return 0
    user = [a for a in argv if a not in ("--dry-run", "--multirun", "-m")]
    if "--dry-run" in argv:
        user.append("dry_run=true")
    try:
        run_overrides, launch_overrides = split_overrides(user)
        launch = parse_launch(launch_overrides)
        if launch.status:
            from sdca_dist.launch.status import print_status

            return print_status(Path(_arg(run_overrides, "run_dir") or "runs/default"))
        from sdca_dist.launch.grid import is_grid, run_grid

        if hooks is None and is_grid(user):
            return run_grid(user, main)
        stages = planned_stages(launch)
        runs = run_configs(run_overrides, launch, stages)
        cfg = runs[0][2]
        root = Path(_arg(run_overrides, "run_dir") or "runs/default") if launch.seeds > 1 else runs[0][1]
        check_shape(cfg, launch, stages)
        where = backend(cfg.cluster.name)
        plan = stage_plan(cfg, launch, stages)
        problems = [p for _, folder, c, _ in runs for p in preflight(c, folder, stages)]
        problems += label_problems(cfg, stages, lambda name: data_manifest(cfg, name))
        if problems:
            raise LaunchError("; ".join(dict.fromkeys(problems)))
        needs = list(dict.fromkeys(n for _, _, c, _ in runs for n in missing_data(c, stages)))
        if needs and not launch.dry_run:
            raise LaunchError("; ".join(needs))
        from sdca_dist.config.run_config import differing_from_preset

        changed = differing_from_preset(cfg)
        print(f"[launch] conf={cfg.conf}" + (f" with {' '.join(changed)}" if changed else " as published"), flush=True)
        print(f"[launch] {describe_data(cfg)}", flush=True)
        for stage in stages:
            row = dict(plan[stage])
            row.update(where.job_parameters(cfg, stage, plan[stage]))
            prefix = "[dry-run]" if launch.dry_run else "[plan]"
            print(f"{prefix} {stage}: {json.dumps(row)}", flush=True)
        for line in plan_warnings(cfg, stages):
            print(f"[launch] {line}", flush=True)
        granted = launch.nodes * int(cfg.cluster.tasks_per_node)
        idle = [s for s in stages if spec(s).training and plan[s]["world_size"] < granted]
        if idle and parse_scale(cfg.train.scale) == 1:
            uses = ", ".join(f"{s} uses {plan[s]['world_size']}" for s in idle)
            print(
                f"[launch] note: {uses} of {granted} ranks (published global batches); train.scale=auto uses "
                "them all (docs/scaling.md)",
                flush=True,
            )
        if launch.dry_run:
            for line in needs:
                print(f"[launch] the run will need: {line}", flush=True)
            if needs:
                print(f"[launch] {len(needs)} input(s) missing: a real launch refuses until they exist", flush=True)
            return 0
        from sdca_dist.lineage import Lineage
        from sdca_dist.stage_cache import launch_cache_dir, recomputed, write_run_cache_setting

        cache_dir, recompute = launch_cache_dir(launch, root), recomputed(stages, launch.redo)
        print(f"[launch] stage cache: {cache_dir or 'off (cache=false)'}", flush=True)
        for seed, folder, c, new in runs:
            if new:
                freeze(
                    folder,
                    c,
                    [o for o in run_overrides if o.split("=", 1)[0] not in ("seed", "run_dir")] + [f"seed={seed}"],
                )
            atomic_write_text(folder / PLAN, json.dumps({"nodes": launch.nodes, "stages": plan}, indent=1) + "\n")
            for stage in launch.redo:
                Lineage(folder).invalidate(stage)
            write_run_cache_setting(folder, cache_dir, recompute=recompute)
        if cfg.data.synthetic:
            from sdca_dist.data.sets import ensure_synthetic_shards

            ensure_synthetic_shards(cfg, log=lambda m: print(f"[launch] {m}", flush=True))
        from sdca_dist.launch.restore import restore_from_cache

        def restorer(c, folder):
            def restore(stage: str):
                ranks = int(plan[stage]["world_size"])
                return restore_from_cache(c, folder, stage, ranks, log=lambda m: print(f"[launch] {m}", flush=True))

            return restore

        todo: Todo = [
            (seed, folder, stages_to_run(c, folder, stages, restore=restorer(c, folder))) for seed, folder, c, _ in runs
        ]
        print(f"[launch] run folder {root.resolve()}; follow with: tensorboard --logdir {root}", flush=True)
        seed_folders = [(seed, folder) for seed, folder, _, _ in runs]
        records = where.run(cfg, launch, root, todo, plan, stages, hooks)
        if records is None:
            return 0
        write_summary(cfg, root, seed_folders, stages)
        failure = where.failure(records)
        if failure:
            raise LaunchError(failure)
        return 0
    except (ConfigError, LaunchError, ScaleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
