"""Where a run (or a grid) stands: ``python launch/slurm.py run_dir=R status=true``.

One row per (grid point,) seed and stage, from the files alone plus the job states the run's
backend gives (``Backend.states``: squeue and sacct on SLURM) for the jobs it recorded:

* ``done``: mIoU, wall time, computed or reused from the stage cache (``DONE``);
* ``stale``: DONE, but no longer valid for the run's settings or inputs, or built on a stage that
  is stale, missing or redone, naming it (``Lineage.fresh``, the launcher's own rule);
  shard tars are judged by their verification records (``sdca_dist.data.verification``): the
  view reads no tar, and a tar whose inode, size, mtime or ctime changed since it was verified
  counts as changed;
* ``running``: iteration i/N, images/s and ETA from the stage's progress record
  (``<stage>/progress.json``, written by rank 0 at each log step), when the stage lock's holder
  is alive on this machine or its SLURM job is running;
* ``pending``, ``requeued``, ``suspended``, ``configuring``, ``completing``: its SLURM job id, squeue's
  state where it is not the row's name (SPECIAL_EXIT, REQUEUE_HOLD...) and its reason
  (``QUEUED_ROWS``; ``<run>/jobs.json`` maps stages to jobs);
* ``failed``: exit code and the last error line (``<stage>/FAILED.json`` written by the local
  launcher, or sacct and the job's log on SLURM);
* ``not run``: its job was cancelled before it started (no log), naming the earlier stage of the
  seed that failed, if one did (SLURM cancels the jobs that depend on a failed one);
  ``cancelled``: cancelled while it ran (scancel), with its log's last error line;
* ``not started``.

Read-only, exit 0: the records it reads are written by the engine and the backends. No torch
here, and no scheduler command: the backend that recorded each job (``jobs.json``) is asked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from sdca_dist.files import read_json_dict
from sdca_dist.launch.backends.base import last_error_line
from sdca_dist.run_folder import DONE, FAILED, GRID, JOBS, LOCK, METRICS, PLAN, PROGRESS, run_folders
from sdca_dist.stage_table import spec


def _fmt_s(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _lock_holder_alive(folder: Path) -> bool:
    """Whether the stage lock's recorded holder may still be alive (read only: taking the lock to
    test it could make a starting job fail); the rule is ``sdca_dist.locks``'s."""
    from sdca_dist.locks import holder_alive

    return holder_alive(folder / LOCK)


def queue_states(folders: list[Path]) -> tuple[dict[Path, dict], dict[str, dict[str, str]]]:
    """({run folder: its jobs.json}, {job id: state}) for the status view: each folder's recorded
    jobs, and their states from the backend that recorded them (``Backend.states``; the record
    names it, as a run's later launches may use another cluster than its first)."""
    from sdca_dist.config import ConfigError
    from sdca_dist.launch.backends import backend

    jobs = {rd: (read_json_dict(rd / JOBS) or {}) for rd in folders}
    by_backend: dict[str, list[str]] = {}
    for recorded in jobs.values():
        for job in recorded.values():
            if isinstance(job, dict) and "job_id" in job and "backend" in job:
                by_backend.setdefault(str(job["backend"]), []).append(str(job["job_id"]))
    states: dict[str, dict[str, str]] = {}
    for name, ids in by_backend.items():
        try:
            states.update(backend(name).states(ids))
        except ConfigError:  # a record naming no backend found here: its rows come from the files
            pass
    return jobs, states


def _stages_of(run_dir: Path) -> list[str]:
    from sdca_dist.stage_table import CHAIN, ordered

    plan = read_json_dict(run_dir / PLAN)
    return ordered(plan["stages"]) if plan and isinstance(plan.get("stages"), dict) else list(CHAIN)


#: squeue's states (squeue(1), JOB STATE CODES) of a job that has not ended, other than RUNNING (read
#: with the progress record above), and the row each shows: never "failed", which is for the states
#: sacct records for an ended job
QUEUED_ROWS = {
    "PENDING": "pending",
    "RESV_DEL_HOLD": "pending",  # held: the reservation it was submitted to was deleted
    "CONFIGURING": "configuring",
    "REQUEUED": "requeued",  # ending, to be queued again
    "REQUEUE_HOLD": "requeued",  # requeued and held until released
    "REQUEUE_FED": "requeued",  # requeued by a federation
    "SPECIAL_EXIT": "requeued",  # requeued and held after a special exit (a site's epilog, scontrol requeuehold)
    "SUSPENDED": "suspended",
    "STOPPED": "suspended",  # stopped, its CPUs kept
    "SIGNALING": "running",  # being signalled (a stop signal, a cancel): no progress shown
    "RESIZING": "running",  # about to change size
    "COMPLETING": "completing",  # its processes are ending (sacct gives the outcome once they have)
    "STAGE_OUT": "completing",
}


def stops_chain(stage: str, state: str) -> bool:
    """Whether ``stage`` in row ``state`` keeps the later stages of its seed from running: it
    failed and gates the chain (``StageSpec.gates_chain``). The status view and the grid summary
    both name it in the rows of the stages after it."""
    return state == "failed" and spec(stage).gates_chain


def stage_row(run_dir: Path, stage: str, cfg: Any, lineage: Any, jobs: dict, states: dict) -> tuple[str, str]:
    """(state, detail) of one stage of one run folder."""
    folder = run_dir / stage
    done = read_json_dict(folder / DONE)
    failed = read_json_dict(folder / FAILED)
    if failed is not None and (done is None or (folder / FAILED).stat().st_mtime >= (folder / DONE).stat().st_mtime):
        # the last attempt failed (a failure before the stage began keeps the earlier DONE)
        return "failed", f"exit code {failed.get('exit_code')}: {failed.get('error')}"
    if done is not None:
        fresh, why = (True, "") if cfg is None else lineage.fresh(cfg, stage)
        metrics = read_json_dict(folder / METRICS) or {}
        miou = f"mIoU {float(metrics['mIoU']):.2f}, " if "mIoU" in metrics else ""
        wall = float(done.get("wall_seconds", float("nan")))
        how = (
            f"reused from {str(done['reused_from'])[:12]} (computed in {_fmt_s(done.get('computed_wall_seconds'))})"
            if done.get("reused_from")
            else "computed"
        )
        if not fresh:
            return "stale", f"{why}; was {miou}{how}"
        return "done", f"{miou}wall {_fmt_s(wall)}, {how}"
    job = jobs.get(stage) or {}
    slurm = states.get(str(job.get("job_id", ""))) if job else None
    progress = read_json_dict(folder / PROGRESS)
    running = _lock_holder_alive(folder) or (slurm is not None and slurm.get("state") == "RUNNING")
    if running:
        if progress is None:
            return "running", "starting" + (f" (job {job['job_id']})" if job else "")
        detail = f"it {progress.get('iteration')}/{progress.get('total')}"
        if progress.get("images_per_s") is not None:
            detail += f", {float(progress['images_per_s']):.1f} images/s"
        eta = progress.get("eta_s")
        if eta is not None:
            eta = float(eta) - (time.time() - float(progress.get("time", time.time())))
        detail += f", ETA {_fmt_s(eta)}, updated {_fmt_s(time.time() - float(progress.get('time', time.time())))} ago"
        return "running", detail + (f" (job {job['job_id']})" if job else "")
    row = QUEUED_ROWS.get(str(slurm.get("state"))) if slurm is not None else None
    if row is not None:
        named = "" if row == slurm["state"].lower() else f" {slurm['state']}"
        return row, f"job {job['job_id']}{named} ({slurm.get('reason') or 'no reason given'})"
    if slurm is not None and slurm.get("state"):
        err = Path(str(job.get("stderr", "")))
        if slurm["state"] == "CANCELLED" and not err.is_file():
            # never started (no log): cancelled while it waited, e.g. on a stage that failed
            return "not run", f"job {job['job_id']} cancelled before it started"
        lines = err.read_text(errors="replace").splitlines() if err.is_file() else []
        if slurm["state"] == "CANCELLED":
            return "cancelled", f"job {job['job_id']} cancelled while it ran: {last_error_line(lines) if lines else ''}"
        code = slurm.get("exit_code", "?")
        error = last_error_line(lines) if lines else f"no log at {err}"
        return "failed", f"job {job['job_id']} {slurm['state']}, exit code {code}: {error}"
    if progress is not None:
        where = f"at it {progress.get('iteration')}/{progress.get('total')}"
        return "stopped", f"{where}, no live process (relaunch to resume)"
    return "not started", ""


def status_rows(root: Path) -> list[tuple[str, str, str, str, str]]:
    from sdca_dist.config.run_config import load_frozen
    from sdca_dist.lineage import Lineage

    folders = run_folders(root, read_json_dict(root / GRID))
    all_jobs, states = queue_states([rd for _, _, rd in folders])
    rows = []
    for point, seed, rd in folders:
        try:
            cfg = load_frozen(rd)
        except Exception:  # noqa: BLE001 - a view: an unreadable config only skips the freshness check
            cfg = None
        lineage = Lineage(rd, read_tars=False)  # shard tars from their verification records only
        failed_before: Optional[str] = None  # the first gating stage of this seed that failed
        for stage in _stages_of(rd):
            try:
                state, detail = stage_row(rd, stage, cfg, lineage, all_jobs[rd], states)
            except Exception as exc:  # noqa: BLE001 - one unreadable stage must not hide the others
                state, detail = "unknown", f"{type(exc).__name__}: {exc}"
            if state == "not run" and failed_before is not None:
                detail += f" ({failed_before} failed)"
            if failed_before is None and stops_chain(stage, state):
                failed_before = stage
            rows.append((point, f"seed {seed}", stage, state, detail))
    return rows


def print_status(root: Path | str) -> int:
    root = Path(root)
    rows = status_rows(root)
    if not rows:
        print(f"{root}: no run folder here (no config.yaml, seed_*/ or grid.json)")
        return 0
    has_point = any(r[0] for r in rows)
    head = (("point",) if has_point else ()) + ("seed", "stage", "state", "detail")
    body = [((r[0],) if has_point else ()) + r[1:] for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head) - 1)]
    for r in [head, *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[3]] = counts.get(r[3], 0) + 1
    print(f"{root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0
