#!/usr/bin/env python
"""Run the SDCA chain: ``python launch/slurm.py conf=NAME nodes=N [overrides...]``.

On a SLURM cluster (``cluster=slurm``, the default of the real-dataset presets) it submits, with
submitit, one job per stage (src -> dist_init -> sdca -> pseudo_label -> ssl), chained with
``afterok`` dependencies; each job runs ``nodes x cluster.tasks_per_node`` ranks started by srun.
With ``cluster=local`` it runs the same chain on this machine, stage after stage, under torchrun.

* stages whose DONE marker exists are skipped; ``stages=[sdca,ssl]`` runs a subset;
* ``seeds=K`` runs the chain once per seed (a job array per stage on SLURM) and writes
  ``<run_dir>/summary.json`` and ``summary.md`` (mean +- std per stage);
* ``with_oracle=true`` adds the oracle (target-label) reference;
* ``dry_run=true`` prints the composed config and the sbatch parameters, submits nothing;
* ``wait=true`` waits and exits 0 only when every stage completed.

Preemption: each job is checkpointable the safe way. The engine turns SIGUSR2/SIGTERM into an
all-rank checkpoint at a step boundary and raises ``Preempted``; only then does rank 0 hand the
signal to submitit, whose ``checkpoint()`` requeues a fresh instance that resumes from it.
No collective ever runs inside a signal handler.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from omegaconf import DictConfig  # noqa: E402

from sdca_dist.config import ConfigError, compose_config, config_to_yaml  # noqa: E402
from sdca_dist.config.schema import CHAIN  # noqa: E402

LAUNCHER_KEYS = ("nodes", "wait", "dry_run", "seeds", "stages", "with_oracle")


class LaunchError(RuntimeError):
    """A problem found before or while running the chain; one line, names what is at fault."""


# --------------------------------------------------------------------------------------------
# the job that runs on the cluster
# --------------------------------------------------------------------------------------------
class StageJob:
    """The submitit callable of one stage (one seed). Picklable; ``checkpoint()`` requeues a fresh one."""

    def __init__(self, overrides: Sequence[str]) -> None:
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from sdca_dist.engine.preemption import Preempted
        from sdca_dist.engine.runner import run_stage

        cfg = compose_config(self.overrides)
        try:
            return run_stage(cfg)
        except Preempted as exc:
            # the checkpoint is on disk (all ranks wrote it); now let submitit requeue us
            if exc.signum == signal.SIGUSR2:
                exc.forward_to_previous_handler()  # rank 0: checkpoint() + requeue + exit
            raise

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.overrides))


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
def stage_overrides(user: Sequence[str], stage: str, run_dir: Path, seed: int) -> list[str]:
    keep = [o for o in user if o.split("=", 1)[0].lstrip("+~") not in ("stage", "run_dir", "seed")]
    return keep + [f"stage={stage}", f"run_dir={run_dir}", f"seed={seed}"]


def seed_runs(cfg: DictConfig) -> list[tuple[int, Path]]:
    root = Path(cfg.run_dir)
    if int(cfg.seeds) == 1:
        return [(int(cfg.seed), root)]
    return [(int(cfg.seed) + k, root / f"seed_{int(cfg.seed) + k}") for k in range(int(cfg.seeds))]


def planned_stages(cfg: DictConfig) -> list[str]:
    stages = [s for s in CHAIN if s in cfg.stages] + [s for s in cfg.stages if s not in CHAIN]
    if cfg.with_oracle and "oracle" not in stages:
        stages = ["oracle"] + stages
    return stages


def preflight(cfg: DictConfig, stages: list[str]) -> list[str]:
    """Everything the config names must exist before anything is submitted; returns the problems."""
    from sdca_dist.engine.data import manifest_path, shard_set
    from sdca_dist.engine.runner import STAGE_SHARDS

    from sdca_dist.engine.run_dir import required_inputs

    problems = []
    # inputs that no planned stage produces must already be in the run folder(s)
    for seed, run_dir in seed_runs(cfg):
        for stage in stages:
            for rel in required_inputs(stage, str(cfg.eval.model_from)):
                producer = rel.split("/", 1)[0]
                if producer not in stages and not (run_dir / rel).exists():
                    problems.append(f"stage {stage} needs {run_dir / rel} (from stage {producer}, not planned)")
    if not cfg.data.synthetic:  # synthetic shards are generated by the launcher itself
        names = sorted({getattr(cfg.data, k) for s in stages for k in STAGE_SHARDS[s]})
        for name in names:
            mp = manifest_path(shard_set(cfg, name))
            if not mp.is_file():
                problems.append(f"missing shard manifest {mp} (pack it with python -m sdca_dist.shard)")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        problems.append(f"missing pretrained weights model.pretrained={cfg.model.pretrained}")
    return problems


def check_partition(cfg: DictConfig) -> None:
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
    if cfg.nodes > nodes:
        raise LaunchError(f"nodes={cfg.nodes} but partition {part or '(default)'} has {nodes} node(s)")
    want = int(cfg.cluster.gpus_per_node)
    if want > 0:
        have = 0
        for r in rows:
            for gres in r[1].split(","):
                bits = gres.split("(")[0].split(":")
                if bits[0] == "gpu" and bits[-1].isdigit():
                    have = max(have, int(bits[-1]))
        if want > have:
            raise LaunchError(f"cluster.gpus_per_node={want} but partition {part or '(default)'} offers {have} GPU(s) per node")


def slurm_parameters(cfg: DictConfig, stage: str) -> dict[str, Any]:
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"sdca-{cfg.conf}-{stage}",
        "nodes": int(cfg.nodes),
        "ntasks_per_node": int(c.tasks_per_node),
        "cpus_per_task": int(c.cpus_per_task),
        "time": int(c.time_min),
        "signal_delay_s": int(c.signal_delay_s),
    }
    if int(c.gpus_per_node) > 0:
        params["gpus_per_node"] = int(c.gpus_per_node)
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
def run_local(cfg: DictConfig, user: Sequence[str], stages: list[str]) -> list[dict]:
    """The chain on this machine: one torchrun (or plain python) process group per stage."""
    from sdca_dist.engine.run_dir import RunDir

    records = []
    ranks = int(cfg.cluster.tasks_per_node) * int(cfg.nodes)
    for seed, run_dir in seed_runs(cfg):
        for stage in stages:
            run = RunDir(run_dir)
            if run.is_done(stage):
                print(f"[launch] seed {seed} {stage}: DONE marker present, skipped", flush=True)
                records.append({"seed": seed, "stage": stage, "state": "SKIPPED", "run_dir": str(run_dir)})
                continue
            overrides = stage_overrides(user, stage, run_dir, seed)
            if ranks > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                       "-m", "sdca_dist.train", *overrides]
            else:
                cmd = [sys.executable, "-m", "sdca_dist.train", *overrides]
            print(f"[launch] seed {seed} {stage}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd, cwd=os.getcwd())
            state = "COMPLETED" if rc == 0 and run.is_done(stage) else f"FAILED(rc={rc})"
            records.append({"seed": seed, "stage": stage, "state": state, "run_dir": str(run_dir),
                            "seconds": round(time.time() - t0, 1)})
            if state != "COMPLETED":
                raise LaunchError(f"stage {stage} (seed {seed}) failed with exit code {rc}; see its output above "
                                  f"and {run_dir / stage}")
    return records


def submit_slurm(cfg: DictConfig, user: Sequence[str], stages: list[str]) -> list[tuple[str, list[Any]]]:
    """One job (an array over seeds) per stage, each depending afterok on the previous one."""
    import submitit

    from sdca_dist.engine.run_dir import RunDir

    root = Path(cfg.run_dir)
    runs = seed_runs(cfg)
    previous: Optional[str] = None
    submitted = []
    for stage in stages:
        todo = [(seed, rd) for seed, rd in runs if not RunDir(rd).is_done(stage)]
        if not todo:
            print(f"[launch] {stage}: DONE for every seed, skipped", flush=True)
            continue
        executor = submitit.SlurmExecutor(folder=str(root / "slurm" / stage / "%j"),
                                          max_num_timeout=int(cfg.cluster.max_requeues))
        params = slurm_parameters(cfg, stage)
        if previous and stage != "oracle":
            params["dependency"] = f"afterok:{previous}"
        executor.update_parameters(**params)
        jobs = []
        with executor.batch():
            for seed, rd in todo:
                jobs.append(executor.submit(StageJob(stage_overrides(user, stage, rd, seed))))
        base = str(jobs[0].job_id).split("_")[0]
        if stage != "oracle":
            previous = base
        submitted.append((stage, jobs))
        print(f"[launch] {stage}: job {base} ({len(jobs)} seed(s)) logs {root / 'slurm' / stage}", flush=True)
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
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE"}


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


def write_summary(cfg: DictConfig, stages: list[str]) -> Optional[Path]:
    """summary.json + summary.md: per stage, each seed's mIoU, mean and std, per-class IoU (mean over
    seeds) and wall time. Papers report 3-seed means; single-seed numbers are hard to reproduce."""
    root = Path(cfg.run_dir)
    runs = seed_runs(cfg)
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
            entry.update({"per_seed": per_seed, "mIoU": ious, "mean": mean, "std": std,
                          "per_class_mean": {n: _mean([pc.get(n) for pc in per_class]) for n in names}})
        table[stage] = entry
    if not table:
        return None
    lines = [f"# {cfg.conf}: {len(runs)} seed(s), run folder {root}", "",
             "| stage | mIoU mean ± std | per seed | wall time (s, mean) |", "|---|---|---|---|"]
    for stage, row in table.items():
        if "mean" in row:
            per = ", ".join(f"{v['seed']}: {v['mIoU']:.2f}" for v in row["per_seed"])
            lines.append(f"| {stage} | {row['mean']:.2f} ± {row['std']:.2f} | {per} | {row['wall_seconds_mean']:.0f} |")
        else:
            lines.append(f"| {stage} | - | - | {row['wall_seconds_mean']:.0f} |")
    scored = [s for s in table if "per_class_mean" in table[s]]
    if scored:
        lines += ["", "Per-class IoU (mean over seeds):", "",
                  "| class | " + " | ".join(scored) + " |", "|---|" + "---|" * len(scored)]
        for name in table[scored[0]]["per_class_mean"]:
            vals = [table[s]["per_class_mean"].get(name) for s in scored]
            lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines += ["", f"TensorBoard: tensorboard --logdir {root}"]
    root.mkdir(parents=True, exist_ok=True)
    payload = {"conf": cfg.conf, "seeds": [s for s, _ in runs], "stages": table}
    if "oracle" in table:
        payload["oracle"] = table["oracle"]
    (root / "summary.json").write_text(json.dumps(payload, indent=1) + "\n")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return root / "summary.md"


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    user = [a for a in argv if a not in ("--dry-run",)]
    if "--dry-run" in argv:
        user.append("dry_run=true")
    try:
        cfg = compose_config(user)
        stages = planned_stages(cfg)
        problems = preflight(cfg, stages)
        if problems:
            raise LaunchError("; ".join(problems))
        if cfg.dry_run:
            print(config_to_yaml(cfg))
            for stage in stages:
                print(f"[dry-run] {stage}: " + (json.dumps(slurm_parameters(cfg, stage)) if cfg.cluster.name == "slurm"
                                                  else f"local, {cfg.cluster.tasks_per_node * cfg.nodes} rank(s)"))
            return 0
        print(config_to_yaml(cfg), flush=True)
        if cfg.data.synthetic:
            from sdca_dist.engine.data import ensure_synthetic_shards

            ensure_synthetic_shards(cfg, log=lambda m: print(f"[launch] {m}", flush=True))
        print(f"[launch] run folder {Path(cfg.run_dir).resolve()}; follow with: tensorboard --logdir {cfg.run_dir}",
              flush=True)
        if cfg.cluster.name == "local":
            run_local(cfg, user, stages)
            write_summary(cfg, stages)
            return 0
        check_partition(cfg)
        submitted = submit_slurm(cfg, user, stages)
        if not cfg.wait:
            print("[launch] submitted; watch with: squeue --me / sacct", flush=True)
            return 0
        records = wait_slurm(submitted)
        write_summary(cfg, stages)
        failed = [r for r in records if r["state"] != "COMPLETED"]
        if failed:
            first = failed[0]
            later = ", ".join(f"{r['stage']} ({r['state']})" for r in failed[1:])
            raise LaunchError(f"stage {first['stage']} job {first['job_id']} ended {first['state']}: {first['error']}"
                              + (f"; not run: {later}" if later else ""))
        return 0
    except (ConfigError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
