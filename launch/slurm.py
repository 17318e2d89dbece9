#!/usr/bin/env python
"""Run the SDCA chain: ``python launch/slurm.py conf=NAME nodes=N [settings...] [launcher keys...]``.

On a SLURM cluster (``cluster=slurm``, the default of the real-dataset presets) it submits, with
submitit, one job per stage (src -> dist_init -> sdca -> pseudo_label -> ssl), chained with
``afterok`` dependencies, each with the shape the stage's plan gives it (``sdca_dist.scaling``:
inference stages take all ``nodes x cluster.tasks_per_node`` ranks, training stages as many as
their global batch splits over, or all of them with ``train.scale``). With ``cluster=local`` it
runs the same chain on this machine, stage after stage, under torchrun.

* the run configuration is frozen in ``<run_dir>/config.yaml`` at the first launch; a relaunch
  with other settings is refused, naming each key (``sdca_dist.config.run_config``);
* a stage whose DONE still matches its settings and inputs is skipped (``sdca_dist.lineage``);
  ``redo=[sdca]`` reruns it and every stage after it; ``stages=[sdca,ssl]`` runs a subset;
* ``seeds=K`` runs the chain once per seed (a job array per stage) and writes
  ``<run_dir>/summary.json`` and ``summary.md`` (mean +- std per stage);
* ``with_oracle=true`` adds the oracle (target-label) reference, ``with_ablation=true`` the sdca
  stage without its contrastive terms and the paired difference;
* ``dry_run=true`` prints each stage's plan and sbatch parameters, submits and writes nothing;
* ``wait=true`` waits and exits 0 only when every stage completed.

Every plan that cannot run is refused before anything is written or queued (exit 2, one line).

Preemption: each job (``sdca_dist.jobs.StageJob``) is checkpointable the safe way. The engine
turns SIGUSR2/SIGTERM into an all-rank checkpoint at a step boundary and raises ``Preempted``;
only then does rank 0 hand the signal to submitit, whose ``checkpoint()`` requeues a fresh
instance that resumes from it. No collective ever runs inside a signal handler.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from omegaconf import DictConfig  # noqa: E402

from sdca_dist.config import ConfigError, compose_config  # noqa: E402
from sdca_dist.config.run_config import freeze, parse_launch, resolve, split_overrides, with_values  # noqa: E402
from sdca_dist.config.schema import LaunchConfig  # noqa: E402
from sdca_dist.scaling import ScaleError, parse_scale, plan_row, resolve_scale  # noqa: E402
from sdca_dist.stage_table import ordered, spec  # noqa: E402


class LaunchError(RuntimeError):
    """A problem found before or while running the chain; one line, names what is at fault."""


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
def seed_runs(run_dir: Path, seed: int, seeds: int) -> list[tuple[int, Path]]:
    if seeds == 1:
        return [(seed, run_dir)]
    return [(seed + k, run_dir / f"seed_{seed + k}") for k in range(seeds)]


def planned_stages(launch: LaunchConfig) -> list[str]:
    stages = ordered(launch.stages)
    if launch.with_oracle and "oracle" not in stages:
        stages = ordered(stages + ["oracle"])
    if launch.with_ablation and "sdca_no_align" not in stages:
        stages = ordered(stages + ["sdca_no_align"])
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
        found = sorted(int(p.name[5:]) for p in root.glob("seed_*") if p.name[5:].isdigit())
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
    for seed, folder in seed_runs(root, base, launch.seeds):

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
    """Refuse, before anything is written or queued, a cluster shape that cannot run."""
    c = cfg.cluster
    if c.gpus_per_node > 0 and c.tasks_per_node > c.gpus_per_node:
        raise LaunchError(
            f"cluster.tasks_per_node={c.tasks_per_node} is more than cluster.gpus_per_node="
            f"{c.gpus_per_node} (one rank per GPU): use cluster.tasks_per_node={c.gpus_per_node}"
        )
    if c.name == "local" and launch.nodes > 1:
        raise LaunchError(
            f"nodes={launch.nodes} with cluster=local: this machine is one node; use "
            f"cluster.tasks_per_node={launch.nodes * c.tasks_per_node} for as many local ranks"
        )


def preflight(cfg: DictConfig, run_dir: Path, stages: list[str]) -> list[str]:
    """Everything the plan reads and does not produce itself must exist; returns the problems."""
    from sdca_dist.engine.data import manifest_path, shard_set
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
    if not cfg.data.synthetic:  # synthetic shards are generated by the launcher itself
        names = sorted({getattr(cfg.data, k) for s in stages for k in spec(s).shard_sets})
        for name in names:
            mp = manifest_path(shard_set(cfg, name))
            if not mp.is_file():
                problems.append(f"missing shard manifest {mp} (pack it with python -m sdca_dist.shard)")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        problems.append(f"missing pretrained weights model.pretrained={cfg.model.pretrained}")
    return problems


def stages_to_run(cfg: DictConfig, run_dir: Path, stages: list[str]) -> list[tuple[str, str]]:
    """(stage, why) for the planned stages that are not fresh; a stage after one that reruns
    reruns too (its input changes)."""
    from sdca_dist.lineage import Lineage

    lineage = Lineage(run_dir)
    todo: list[tuple[str, str]] = []
    for stage in stages:
        ok, why = lineage.fresh(cfg, stage, rerun=[s for s, _ in todo])
        if ok:
            print(f"[launch] {run_dir} {stage}: DONE with these settings and inputs, skipped", flush=True)
        else:
            todo.append((stage, why))
    return todo


def check_partition(cfg: DictConfig, launch: LaunchConfig) -> None:
    """Fail when the partition cannot give ``nodes`` nodes with ``gpus_per_node`` GPUs each."""
    part = cfg.cluster.partition
    args = ["sinfo", "-h", "-o", "%D %G %P"] + (["-p", str(part)] if part else [])
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot query SLURM with sinfo ({exc}); is SLURM_CONF set?") from None
    rows = [r.split() for r in out.strip().splitlines() if r.strip()]
    if part:
        rows = [r for r in rows if r[2].rstrip("*") == part]
    if not rows:
        raise LaunchError(f"partition {part!r} does not exist (sinfo lists none)")
    nodes = sum(int(r[0]) for r in rows)
    if launch.nodes > nodes:
        raise LaunchError(f"nodes={launch.nodes} but partition {part or '(default)'} has {nodes} node(s)")
    want = int(cfg.cluster.gpus_per_node)
    if want > 0:
        have = 0
        for r in rows:
            for gres in r[1].split(","):
                bits = gres.split("(")[0].split(":")
                if bits[0] == "gpu" and bits[-1].isdigit():
                    have = max(have, int(bits[-1]))
        if want > have:
            raise LaunchError(
                f"cluster.gpus_per_node={want} but partition {part or '(default)'} offers {have} GPU(s) per node"
            )


def slurm_parameters(cfg: DictConfig, stage: str, row: dict) -> dict[str, Any]:
    """sbatch parameters of ``stage``'s job: its planned shape, one GPU per task."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"sdca-{cfg.conf}-{stage}",
        "nodes": int(row["nodes"]),
        "ntasks_per_node": int(row["ntasks_per_node"]),
        "cpus_per_task": int(c.cpus_per_task),
        "time": int(c.time_min),
        "signal_delay_s": int(c.signal_delay_s),
    }
    if int(c.gpus_per_node) > 0:
        params["gpus_per_node"] = int(row["ntasks_per_node"])
    for key in ("partition", "account", "qos", "constraint"):
        if c[key]:
            params[key] = str(c[key])
    if c.mem_gb:
        params["mem"] = f"{int(c.mem_gb)}GB"
    if c.extra:
        params["additional_parameters"] = dict(c.extra)
    return params


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
Todo = list[tuple[int, Path, list[tuple[str, str]]]]  # (seed, run folder, [(stage, why)])


def run_local(todo: Todo, plan: dict[str, dict], model_from: str) -> list[dict]:
    """The chain on this machine: one torchrun (or plain python) process group per stage, each
    with its planned world size."""
    from sdca_dist.status import run_recorded

    records = []
    for seed, run_dir, stages in todo:
        for stage, why in stages:
            ranks = int(plan[stage]["world_size"])
            args = [f"stage={stage}", f"run_dir={run_dir}"] + (
                [f"eval.model_from={model_from}"] if stage == "eval" else []
            )
            if ranks > 1:
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={ranks}",
                    "-m",
                    "sdca_dist.train",
                    *args,
                ]
            else:
                cmd = [sys.executable, "-m", "sdca_dist.train", *args]
            print(f"[launch] seed {seed} {stage} ({why}): {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            rc = run_recorded(cmd, run_dir / stage)  # grids: FAILED.json for the status view
            done = (run_dir / stage / "DONE").is_file()
            state = "COMPLETED" if rc == 0 and done else f"FAILED(rc={rc})"
            records.append(
                {
                    "seed": seed,
                    "stage": stage,
                    "state": state,
                    "run_dir": str(run_dir),
                    "seconds": round(time.time() - t0, 1),
                }
            )
            if state != "COMPLETED":
                if not spec(stage).gates_chain:
                    print(f"[launch] seed {seed} {stage} failed (exit {rc}); it gates nothing, going on", flush=True)
                    continue
                raise LaunchError(
                    f"stage {stage} (seed {seed}) failed with exit code {rc}; see its output above "
                    f"and {run_dir / stage}"
                )
    return records


def submit_slurm(
    cfg: DictConfig,
    root: Path,
    todo: Todo,
    plan: dict[str, dict],
    stages: list[str],
    after: Optional[dict[str, list[str]]] = None,
) -> list[tuple[str, list[Any]]]:
    """One job (an array over the seeds that need it) per stage, each with its planned shape and
    depending afterok on the previous chain stage's job (and on ``after[stage]``: a grid's job
    computing the shared stage)."""
    import submitit

    from sdca_dist.jobs import StageJob
    from sdca_dist.status import record_job

    previous: Optional[str] = None
    submitted = []
    for stage in stages:
        runs = [(seed, rd) for seed, rd, st in todo if stage in dict(st)]
        if not runs:
            continue
        executor = submitit.SlurmExecutor(
            folder=str(root / "slurm" / stage / "%j"), max_num_timeout=int(cfg.cluster.max_requeues)
        )
        params = slurm_parameters(cfg, stage, plan[stage])
        deps = ([previous] if previous and spec(stage).gates_chain else []) + list((after or {}).get(stage, []))
        if deps:
            params["dependency"] = "afterok:" + ":".join(deps)
        executor.update_parameters(**params)
        jobs = []
        with executor.batch():
            for seed, rd in runs:
                jobs.append(executor.submit(StageJob(str(rd), stage, str(cfg.eval.model_from))))
        base = str(jobs[0].job_id).split("_")[0]
        for (seed, rd), job in zip(runs, jobs):  # for the status view (sdca_dist.status)
            record_job(rd, stage, str(job.job_id), str(job.paths.stderr))
        if spec(stage).gates_chain:
            previous = base
        submitted.append((stage, jobs))
        shape = f"{params['nodes']}x{params['ntasks_per_node']}"
        print(
            f"[launch] {stage}: job {base} ({len(jobs)} seed(s), {shape} ranks) logs {root / 'slurm' / stage}",
            flush=True,
        )
    return submitted


def job_error(job: Any) -> str:
    """The exception line of a failed job's log (rank 0), else its last line, else its state."""
    err = Path(job.paths.stderr)
    lines = err.read_text(errors="replace").strip().splitlines() if err.is_file() else []
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln) for ln in lines]  # torch's per-rank prefix
    errors = [ln.strip() for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Preempted)\b.*: ", ln.strip())]
    if errors:
        return errors[-1]
    return lines[-1].strip() if lines else f"no log at {err} (the job never started)"


#: sacct states after which a job never runs again (PREEMPTED/REQUEUED jobs come back)
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def job_state(job: Any) -> str:
    """The job's state from sacct (forced refresh: submitit's cached view can lag behind)."""
    return str(job.get_info(mode="force").get("State", "UNKNOWN")).split()[0]


def wait_slurm(submitted: list[tuple[str, list[Any]]], poll_s: float = 5.0) -> list[dict]:
    """Wait until every job reaches a terminal sacct state; SLURM itself cancels the dependants
    of a failed stage (kill_invalid_depend), so a failure never leaves the wait hanging."""
    records = []
    failed = False
    for stage, jobs in submitted:
        for job in jobs:
            state = job_state(job)
            if failed and state == "PENDING":
                # clusters without kill_invalid_depend keep such jobs pending forever
                subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=60)
            while state not in TERMINAL_STATES:
                time.sleep(poll_s)
                state = job_state(job)
            failed = failed or (state != "COMPLETED" and stage != "oracle")  # oracle gates nothing
            rec = {"stage": stage, "job_id": str(job.job_id), "state": state}
            if state != "COMPLETED":
                rec["error"] = job_error(job)
            records.append(rec)
            print(f"[launch] {stage}: job {job.job_id} {state}", flush=True)
    return records


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_summary(cfg: DictConfig, root: Path, runs: list[tuple[int, Path]], stages: list[str]) -> Optional[Path]:
    """summary.json + summary.md: per stage, each seed's mIoU, mean and std, per-class IoU (mean over
    seeds) and wall time. Papers report 3-seed means; single-seed numbers are hard to reproduce."""
    table: dict[str, dict] = {}
    for stage in stages:
        per_seed, walls, per_class = [], [], []
        for seed, rd in runs:
            done = _read_json(rd / stage / "DONE")
            if done is None:
                continue
            walls.append(float(done.get("wall_seconds", float("nan"))))
            metrics = _read_json(rd / stage / "metrics.json")
            if metrics is not None:
                row = {"seed": seed, "mIoU": float(metrics["mIoU"])}
                if "mIoU13" in metrics:
                    row["mIoU13"] = float(metrics["mIoU13"])
                selected = _selected_on_val(rd, stage, metrics)  # train.select=best_val (issue 11)
                if selected is not None:
                    row["selected_iteration"] = selected.get("iteration")
                per_seed.append(row)
                per_class.append(metrics["per_class"])
        if not walls:
            continue
        entry: dict[str, Any] = {"wall_seconds": walls, "wall_seconds_mean": sum(walls) / len(walls)}
        if per_seed:
            ious = [r["mIoU"] for r in per_seed]
            mean = sum(ious) / len(ious)
            std = math.sqrt(sum((x - mean) ** 2 for x in ious) / (len(ious) - 1)) if len(ious) > 1 else 0.0
            names = list(per_class[0])
            entry.update(
                {
                    "per_seed": per_seed,
                    "mIoU": ious,
                    "mean": mean,
                    "std": std,
                    "per_class_mean": {n: _mean([pc.get(n) for pc in per_class]) for n in names},
                }
            )
            entry["selected_on_val"] = any("selected_iteration" in r for r in per_seed)
        table[stage] = entry
    if not table:
        return None
    lines = [
        f"# {cfg.conf}: {len(runs)} seed(s), run folder {root}",
        "",
        "| stage | mIoU mean ± std | per seed | wall time (s, mean) |",
        "|---|---|---|---|",
    ]
    for stage, row in table.items():
        if "mean" in row:
            per = ", ".join(f"{v['seed']}: {v['mIoU']:.2f}" for v in row["per_seed"])
            mark = " †" if row.get("selected_on_val") else ""
            lines.append(
                f"| {stage}{mark} | {row['mean']:.2f} ± {row['std']:.2f} | {per} | {row['wall_seconds_mean']:.0f} |"
            )
        else:
            lines.append(f"| {stage} | - | - | {row['wall_seconds_mean']:.0f} |")
    if any(row.get("selected_on_val") for row in table.values()):
        lines += [
            "",
            "† selected on the evaluation set (train.select=best_val: the weights with the best target-val "
            "mIoU among those evaluated every train.select_every iterations, as the reference code does); "
            "optimistic, not comparable with final-iteration numbers",
        ]
    ablation = alignment_effect(table)
    if ablation is not None:
        lines += [
            "",
            f"Alignment effect (sdca - sdca_no_align, paired by seed): {ablation['mean']:+.2f} ± "
            f"{ablation['std']:.2f} mIoU ({', '.join(f'{k}: {v:+.2f}' for k, v in ablation['per_seed'].items())})",
        ]
    scored = [s for s in table if "per_class_mean" in table[s]]
    if scored:
        lines += [
            "",
            "Per-class IoU (mean over seeds):",
            "",
            "| class | " + " | ".join(scored) + " |",
            "|---|" + "---|" * len(scored),
        ]
        for name in table[scored[0]]["per_class_mean"]:
            vals = [table[s]["per_class_mean"].get(name) for s in scored]
            lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines += ["", f"TensorBoard: tensorboard --logdir {root}"]
    root.mkdir(parents=True, exist_ok=True)
    payload = {"conf": cfg.conf, "seeds": [s for s, _ in runs], "stages": table}
    if "oracle" in table:
        payload["oracle"] = table["oracle"]
    if ablation is not None:
        payload["alignment_effect"] = ablation
    (root / "summary.json").write_text(json.dumps(payload, indent=1) + "\n")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return root / "summary.md"


def _selected_on_val(rd: Path, stage: str, metrics: dict) -> Optional[dict]:
    """The ``selected`` record (train.select=best_val) behind a stage's number, or None: a training
    stage's own, or for eval that of the stage whose model it scored."""
    selected = metrics.get("selected")
    model_from = str(metrics.get("model_from") or "")
    if selected is None and stage == "eval" and model_from and not model_from.endswith(".pt"):
        selected = (_read_json(rd / model_from / "metrics.json") or {}).get("selected")
    return selected if isinstance(selected, dict) and selected.get("rule") == "best_val" else None


def alignment_effect(table: dict[str, dict]) -> Optional[dict]:
    """sdca minus sdca_no_align per seed (same src model, distributions and seed: a paired
    difference), with mean and sample std; None without the ablation."""
    a, b = table.get("sdca", {}), table.get("sdca_no_align", {})
    if "per_seed" not in a or "per_seed" not in b:
        return None
    off = {r["seed"]: r["mIoU"] for r in b["per_seed"]}
    diffs = {r["seed"]: r["mIoU"] - off[r["seed"]] for r in a["per_seed"] if r["seed"] in off}
    if not diffs:
        return None
    vals = list(diffs.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"per_seed": diffs, "mean": mean, "std": std}


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def main(argv: Sequence[str], hooks: Optional[dict] = None) -> int:
    """``hooks`` (a grid's point, sdca_dist.grid): ``after`` {stage: [job ids]} to depend on;
    ``submitted`` receives {stage: job id}."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    user = [a for a in argv if a not in ("--dry-run", "--multirun", "-m")]
    if "--dry-run" in argv:
        user.append("dry_run=true")
    try:
        run_overrides, launch_overrides = split_overrides(user)
        launch = parse_launch(launch_overrides)
        # --- status view and grids (sdca_dist.status, sdca_dist.grid) ---
        if launch.status:
            from sdca_dist.status import print_status

            return print_status(Path(_arg(run_overrides, "run_dir") or "runs/default"))
        from sdca_dist.grid import is_grid, run_grid

        if is_grid(user):
            return run_grid(user, main, wait_slurm)
        stages = planned_stages(launch)
        runs = run_configs(run_overrides, launch, stages)
        cfg = runs[0][2]
        root = Path(_arg(run_overrides, "run_dir") or "runs/default") if launch.seeds > 1 else runs[0][1]
        check_shape(cfg, launch, stages)
        plan = stage_plan(cfg, launch, stages)
        problems = [p for _, folder, c, _ in runs for p in preflight(c, folder, stages)]
        if problems:
            raise LaunchError("; ".join(dict.fromkeys(problems)))
        from sdca_dist.config.run_config import differing_from_preset

        changed = differing_from_preset(cfg)
        print(f"[launch] conf={cfg.conf}" + (f" with {' '.join(changed)}" if changed else " as published"), flush=True)
        for stage in stages:
            row = dict(plan[stage])
            if cfg.cluster.name == "slurm":
                row["sbatch"] = slurm_parameters(cfg, stage, plan[stage])
            prefix = "[dry-run]" if launch.dry_run else "[plan]"
            print(f"{prefix} {stage}: {json.dumps(row)}", flush=True)
        granted = launch.nodes * int(cfg.cluster.tasks_per_node)
        idle = [s for s in stages if spec(s).training and plan[s]["world_size"] < granted]
        if idle and parse_scale(cfg.train.scale) == 1:
            uses = ", ".join(f"{s} uses {plan[s]['world_size']}" for s in idle)
            print(
                f"[launch] note: {uses} of {granted} ranks (published global batches); train.scale=auto uses "
                "them all (README 'Scaling out')",
                flush=True,
            )
        if launch.dry_run:
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
            (folder / "plan.json").write_text(json.dumps({"nodes": launch.nodes, "stages": plan}, indent=1) + "\n")
            for stage in launch.redo:
                Lineage(folder).invalidate(stage)
            # --- the stage cache this launch's stages use (sdca_dist.stage_cache) ---
            write_run_cache_setting(folder, cache_dir, recompute=recompute)
        if cfg.data.synthetic:
            from sdca_dist.engine.data import ensure_synthetic_shards

            ensure_synthetic_shards(cfg, log=lambda m: print(f"[launch] {m}", flush=True))
        todo: Todo = [(seed, folder, stages_to_run(c, folder, stages)) for seed, folder, c, _ in runs]
        print(f"[launch] run folder {root.resolve()}; follow with: tensorboard --logdir {root}", flush=True)
        seed_folders = [(seed, folder) for seed, folder, _, _ in runs]
        if cfg.cluster.name == "local":
            run_local(todo, plan, str(cfg.eval.model_from))
            write_summary(cfg, root, seed_folders, stages)
            return 0
        check_partition(cfg, launch)
        submitted = submit_slurm(cfg, root, todo, plan, stages, after=(hooks or {}).get("after"))
        if hooks is not None:  # a grid's point: its jobs, for the later points' dependencies; the grid waits
            hooks.setdefault("submitted", {}).update({st: str(j[0].job_id).split("_")[0] for st, j in submitted})
            hooks["jobs"] = submitted
        if not launch.wait or hooks is not None:
            print("[launch] submitted; watch with: squeue --me / sacct", flush=True)
            return 0
        records = wait_slurm(submitted)
        write_summary(cfg, root, seed_folders, stages)
        failed = [r for r in records if r["state"] != "COMPLETED"]
        if failed:
            first = failed[0]
            later = ", ".join(f"{r['stage']} ({r['state']})" for r in failed[1:])
            raise LaunchError(
                f"stage {first['stage']} job {first['job_id']} ended {first['state']}: {first['error']}"
                + (f"; not run: {later}" if later else "")
            )
        return 0
    except (ConfigError, LaunchError, ScaleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
