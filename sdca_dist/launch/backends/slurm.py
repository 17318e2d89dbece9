"""``cluster=slurm``: one submitit job per stage (a job array over the seeds that need it), each
with its planned shape, chained on the last chain stage's job: ``aftercorr`` between arrays over
the same seeds (seed k's stage waits for seed k's previous stage only: one failed seed stops
only its own chain), ``afterok`` otherwise.

Before submitting, the partition must offer ``nodes`` nodes with ``cluster.gpus_per_node`` GPUs
each (``sinfo``). With ``wait=true`` the launch follows every job to a terminal ``sacct`` state
and exits 2, after writing the summary, naming the first failed job's error line from its log;
without it the launch ends once everything is queued.

Each submitted job is recorded in its run folder's ``jobs.json`` (stage -> job id and log); the
status view asks ``states`` (squeue for queued and running jobs, then sacct for ended ones) about
them. A grid's points hand their jobs to ``wait``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig

from sdca_dist.config.schema import LaunchConfig
from sdca_dist.files import atomic_write_text, read_json_dict
from sdca_dist.launch.backends.base import Backend, LaunchError, LaunchHooks, QueuedJob, Todo
from sdca_dist.run_folder import JOBS, SLURM_LOGS
from sdca_dist.stage_table import spec


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
    """sbatch parameters of ``stage``'s job: its planned shape, one GPU per task.

    srun runs the ranks with ``--kill-on-bad-exit=1``: a rank that exits with an error (it could
    not listen on the rendezvous port, ran out of memory, met a bad input) ends the whole step, so
    the job fails at once and the launcher reports it, instead of the other ranks waiting for it
    until the 30-minute process-group timeout while the allocation stays held."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": f"sdca-{cfg.conf}-{stage}",
        "nodes": int(row["nodes"]),
        "ntasks_per_node": int(row["ntasks_per_node"]),
        "cpus_per_task": int(c.cpus_per_task),
        "time": int(c.time_min),
        "signal_delay_s": int(c.signal_delay_s),
        "srun_args": ["--kill-on-bad-exit=1"],
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


@dataclass
class StageArray:
    """One submitted stage: its jobs (an array over ``seeds``, one task per seed in that order)
    and the dependencies it was given (("afterok" | "aftercorr", job id) each)."""

    stage: str
    jobs: list[Any]
    seeds: list[int]
    deps: list[tuple[str, str]] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.jobs[0].job_id).split("_")[0]


def record_job(run_dir: Path, stage: str, job_id: str, stderr: str) -> None:
    """Remember in ``<run_dir>/jobs.json`` which job runs ``stage``, where its log is and which
    backend to ask about it (the status view reads it)."""
    path = Path(run_dir) / JOBS
    jobs = read_json_dict(path) or {}
    jobs[stage] = {"job_id": str(job_id), "stderr": str(stderr), "submitted": time.time(), "backend": "slurm"}
    atomic_write_text(path, json.dumps(jobs, indent=1) + "\n")


def array_task_ids(record_id: str) -> list[str]:
    """The job ids a sacct/squeue ``JobID`` stands for: itself, or for a job array's record that
    still holds several tasks (``17_[0-3,5%2]``: a pending array whose tasks SLURM never split
    out, e.g. one it cancelled whole because an ``afterok`` dependency failed) ``17_0`` ... ``17_5``."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", record_id.strip())
    if m is None:
        return [record_id.strip()]
    ids = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def squeue_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, reason}} of the jobs squeue still lists (queued, running, just ended).
    Asked about several tasks of a pending array, squeue prints them as the array's one row
    (``17_[0-1]``), read as each task's."""
    out: dict[str, dict[str, str]] = {}
    q = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30
    )
    for row in q.stdout.strip().splitlines():
        jid, state, reason = (row.split("|") + ["", ""])[:3]
        for task in array_task_ids(jid):
            out[task] = {"state": state.strip(), "reason": reason.strip()}
    return out


def sacct_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, exit_code}} from sacct's allocation records. An array task that never
    left its array's pending record (SLURM cancelled the array whole, e.g. kill_invalid_depend
    after an ``afterok`` dependency failed) has no row of its own, only the array's
    (``17_[0-1]``; named by the bare ``17`` until slurmdbd has its task list), and ``-j 17_0``
    finds nothing: so sacct is asked about whole arrays (``-j 17``) and a task's own row wins
    over its array's."""
    a = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", ",".join(sorted({i.split("_")[0] for i in job_ids}))]
        + ["-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    own: dict[str, dict[str, str]] = {}
    shared: dict[str, dict[str, str]] = {}
    for row in a.stdout.strip().splitlines():
        jid, state, code = (row.split("|") + ["", ""])[:3]
        record = {"state": state.split()[0] if state else "", "exit_code": code.strip()}
        tasks = array_task_ids(jid)
        for task in tasks:
            (own if len(tasks) == 1 else shared).setdefault(task, record)
    out = {}
    for i in job_ids:
        record = own.get(i) or shared.get(i) or (own.get(i.split("_")[0]) if "_" in i else None)
        if record is not None:
            out[i] = record
    return out


def slurm_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, reason | exit_code}} from squeue (queued/running), then sacct (ended);
    empty without SLURM. Each task of a job array is answered by its own id (``17_0``), whatever
    form SLURM's record of it has (``squeue_states``, ``sacct_states``)."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    out: dict[str, dict[str, str]] = {}
    try:
        out.update(squeue_states(ids))
        missing = [i for i in ids if i not in out]
        if missing:
            out.update(sacct_states(missing))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def dependency_on(job_id: str, its_seeds: list[int], seeds: list[int]) -> tuple[str, str]:
    """How an array over ``seeds`` waits for job ``job_id`` (an array over ``its_seeds``):
    ``aftercorr`` when both are arrays over the same seeds (task k waits for task k only, so a
    failed seed stops only that seed), else ``afterok`` on the whole job."""
    same = len(seeds) > 1 and list(seeds) == list(its_seeds)
    return ("aftercorr" if same else "afterok", str(job_id))


def dependency_parameter(deps: list[tuple[str, str]]) -> str:
    """sbatch's ``--dependency`` for ``deps``: every kind's jobs, all required (``,``)."""
    kinds: dict[str, list[str]] = {}
    for kind, job in deps:
        kinds.setdefault(kind, []).append(job)
    return ",".join(f"{kind}:" + ":".join(dict.fromkeys(jobs)) for kind, jobs in kinds.items())


def submit_slurm(
    cfg: DictConfig,
    root: Path,
    todo: Todo,
    plan: dict[str, dict],
    stages: list[str],
    after: Optional[Mapping[str, Sequence[QueuedJob]]] = None,
) -> list[StageArray]:
    """One job (an array over the seeds that need it) per stage, each with its planned shape and
    depending on the previous chain stage's job (and on ``after[stage]``: a grid's jobs
    computing a stage this point shares): ``aftercorr`` where both are arrays over the same
    seeds, ``afterok`` otherwise (``dependency_on``)."""
    import submitit

    from sdca_dist.jobs import StageJob

    previous: Optional[StageArray] = None
    submitted: list[StageArray] = []
    for stage in stages:
        runs = [(seed, rd) for seed, rd, st in todo if stage in dict(st)]
        if not runs:
            continue
        seeds = [seed for seed, _ in runs]
        executor = submitit.SlurmExecutor(
            folder=str(root / SLURM_LOGS / stage / "%j"), max_num_timeout=int(cfg.cluster.max_requeues)
        )
        params = slurm_parameters(cfg, stage, plan[stage])
        deps = [dependency_on(previous.job_id, previous.seeds, seeds)] if previous and spec(stage).gates_chain else []
        deps += [dependency_on(a.job_id, list(a.seeds), seeds) for a in (after or {}).get(stage, [])]
        if deps:
            params["dependency"] = dependency_parameter(deps)
        executor.update_parameters(**params)
        jobs = []
        with executor.batch():
            for seed, rd in runs:
                jobs.append(executor.submit(StageJob(str(rd), stage, str(cfg.eval.model_from))))
        array = StageArray(stage, jobs, seeds, deps)
        for (seed, rd), job in zip(runs, jobs):  # for the status view (``states``)
            record_job(rd, stage, str(job.job_id), str(job.paths.stderr))
        if spec(stage).gates_chain:
            previous = array
        submitted.append(array)
        shape, logs = f"{params['nodes']}x{params['ntasks_per_node']}", root / SLURM_LOGS / stage
        print(
            f"[launch] {stage}: job {array.job_id} ({len(jobs)} seed(s), {shape} ranks) logs {logs}",
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


def _task(job: Any) -> tuple[str, Optional[int]]:
    """(array job id, task index or None) of a submitit job."""
    base, _, index = str(job.job_id).partition("_")
    return base, int(index) if index.isdigit() else None


def _blocked(array: StageArray, index: Optional[int], ended_badly: dict[str, set[Optional[int]]]) -> bool:
    """Whether task ``index`` of ``array`` can never start: a job it depends on ended other
    than COMPLETED (for ``aftercorr``, the task of the same index)."""
    for kind, job in array.deps:
        bad = ended_badly.get(job, set())
        if bad and (kind == "afterok" or index in bad or None in bad):
            return True
    return False


def wait_slurm(submitted: list[StageArray], poll_s: float = 5.0) -> list[dict]:
    """Wait until every job reaches a terminal sacct state; one record per job, in submission
    order. A failure stays in its lane: SLURM itself cancels the dependants of a job that ended
    badly (kill_invalid_depend); on clusters without it such jobs would stay pending forever, so
    the wait cancels exactly those (a task whose dependency can no longer be satisfied, and then
    theirs), never a job of an independent grid point or seed."""
    tasks = [(array, job) for array in submitted for job in array.jobs]
    states: dict[str, str] = {}
    ended_badly: dict[str, set[Optional[int]]] = {}
    while True:
        for array, job in tasks:
            jid = str(job.job_id)
            if states.get(jid) in TERMINAL_STATES:
                continue
            state = job_state(job)
            if state == "PENDING" and _blocked(array, _task(job)[1], ended_badly):
                subprocess.run(["scancel", jid], capture_output=True, timeout=60)
            states[jid] = state
            if state in TERMINAL_STATES:
                print(f"[launch] {array.stage}: job {jid} {state}", flush=True)
                if state != "COMPLETED":
                    base, index = _task(job)
                    ended_badly.setdefault(base, set()).add(index)
        if all(states[str(job.job_id)] in TERMINAL_STATES for _, job in tasks):
            break
        time.sleep(poll_s)
    records = []
    for array, job in tasks:
        rec = {"stage": array.stage, "job_id": str(job.job_id), "state": states[str(job.job_id)]}
        if rec["state"] != "COMPLETED":
            rec["error"] = job_error(job)
        records.append(rec)
    return records


class SlurmBackend(Backend):
    name = "slurm"

    def job_parameters(self, cfg: DictConfig, stage: str, row: dict) -> dict[str, Any]:
        return {"sbatch": slurm_parameters(cfg, stage, row)}

    def run(
        self,
        cfg: DictConfig,
        launch: LaunchConfig,
        root: Path,
        todo: Todo,
        plan: dict[str, dict],
        stages: list[str],
        hooks: Optional[LaunchHooks] = None,
    ) -> Optional[list[dict]]:
        check_partition(cfg, launch)
        submitted = submit_slurm(cfg, root, todo, plan, stages, after=hooks.after if hooks else None)
        if hooks is not None:  # a grid's point: its jobs, for later points' dependencies; the grid waits
            for a in submitted:
                hooks.submitted(QueuedJob(self.name, a.stage, a.job_id, tuple(a.seeds), a))
        if not launch.wait or hooks is not None:
            print("[launch] submitted; watch with: squeue --me / sacct", flush=True)
            return None
        return wait_slurm(submitted)

    def wait(self, jobs: Sequence[QueuedJob]) -> list[dict]:
        return wait_slurm([j.handle for j in jobs])

    def states(self, job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return slurm_states(job_ids)

    def failure(self, records: list[dict]) -> Optional[str]:
        failed = [r for r in records if r["state"] != "COMPLETED"]
        if not failed:
            return None
        first = failed[0]
        later = ", ".join(f"{r['stage']} ({r['state']})" for r in failed[1:])
        return f"stage {first['stage']} job {first['job_id']} ended {first['state']}: {first['error']}" + (
            f"; not run: {later}" if later else ""
        )


BACKEND = SlurmBackend()
