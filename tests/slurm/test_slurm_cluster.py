"""The test cluster is a real SLURM, and the submitit contract the launcher relies on holds on it:
multi-node ranks that can rendezvous by node name, accounting (sacct) that submitit can poll,
checkpoint/requeue on SIGUSR2 and on real preemption, and afterok chains that stop on failure.

Every wait is bounded and fails with the job's state and log tail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import slurm_jobs
import submitit

# submitit treats a signal within min(20% of the limit, 10 min) of the time limit as a timeout, so
# preemption tests need a limit above 10 minutes for SIGUSR2 to count as a preemption.
TIMEOUT_MIN = 30

# Backstop only (the first test also pays for cluster install + up); every wait below is bounded.
pytestmark = pytest.mark.timeout(600)


def executor(slurm, folder: Path, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    defaults = dict(
        slurm_partition=slurm.low_partition, timeout_min=TIMEOUT_MIN, cpus_per_task=1, nodes=1, tasks_per_node=1
    )
    ex.update_parameters(**{**defaults, **params})
    return ex


def test_cluster_has_two_idle_nodes_in_both_partitions(slurm):
    out = slurm.run("sinfo", "-h", "-N", "-o", "%N %P %t").stdout.split("\n")
    rows = {tuple(line.split()) for line in out if line.strip()}
    for node in slurm.nodes:
        for part in (slurm.low_partition, slurm.high_partition):
            assert any(r[0] == node and r[1].rstrip("*") == part for r in rows), f"{node} not in {part}: {rows}"
    clusters = slurm.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster").stdout.split()
    assert clusters, "slurmdbd knows no cluster: accounting is not wired"


def test_two_node_gloo_allreduce_completes(slurm, tmp_path):
    ex = executor(slurm, tmp_path / "submitit", nodes=2, tasks_per_node=1, name="allreduce")
    job = ex.submit(slurm_jobs.allreduce_rank_sum)
    slurm.track(job.job_id)
    slurm.wait_done(job, 120, "2-node all_reduce")
    results = job.results()
    assert len(results) == 2, results
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results), results
    assert sorted(r["node"] for r in results) == sorted(slurm.nodes), "tasks did not land on both nodes"
    assert all(r["master_addr"] == results[0]["master_addr"] for r in results)
    assert slurm.wait_sacct_state(job.job_id, {"COMPLETED"}, 30, "all_reduce accounting") == "COMPLETED"
    # job.state is submitit's cached sacct view; force a refresh, as a launcher waiting on it must.
    assert job.get_info(mode="force")["State"] == "COMPLETED"


def _wait_for_step(state: Path, at_least: int, timeout_s: float, job) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if state.exists():
            step = json.loads(state.read_text())["step"]
            if step >= at_least:
                return step
        time.sleep(0.2)
    raise AssertionError(
        f"counter job {job.job_id} did not reach step {at_least} in {timeout_s:.0f}s "
        f"(state {job.get_info(mode='force').get('State', '?')})"
    )


def _check_resumed(slurm, job, state: Path, total: int, signalled_at_step: int) -> None:
    slurm.wait_done(job, 150, "requeued counter")
    assert job.result() == total
    assert json.loads(state.read_text())["step"] == total
    starts = [json.loads(line) for line in Path(str(state) + ".starts").read_text().splitlines()]
    assert len(starts) == 2, f"expected one start and one resumed start, got {starts}"
    assert starts[0]["from_step"] == 0 and starts[0]["restart_count"] == 0
    # resumed from what the first run saved (at least the step we saw before signalling)
    assert signalled_at_step <= starts[1]["from_step"] < total, starts
    assert starts[1]["restart_count"] == 1 and starts[1]["job_id"] == starts[0]["job_id"], starts
    # submitit logs INFO to stdout and WARNING to stderr; the requeued run appends to both.
    log = job.paths.stdout.read_text(errors="replace") + job.paths.stderr.read_text(errors="replace")
    assert "this job is preempted" in log and "Requeued job" in log, log[-3000:]
    assert "timed-out" not in log, "the signal was taken for a timeout (timeout_min too small?)"
    # the result pickle can exist a moment before the controller has told slurmdbd
    slurm.wait_sacct_state(job.job_id, {"COMPLETED"}, 30, "requeued counter accounting")
    runs = slurm.sacct(job.job_id, duplicates=True)
    assert len(runs) >= 2 and runs[0]["State"].split()[0] in {"REQUEUED", "PREEMPTED"}, runs


def test_usr2_checkpoints_requeues_and_resumes(slurm, tmp_path):
    total, state = 24, tmp_path / "counter.json"
    ex = executor(slurm, tmp_path / "submitit", name="counter-usr2")
    job = ex.submit(slurm_jobs.StepCounter(str(state), total, 0.5))
    slurm.track(job.job_id)
    seen = _wait_for_step(state, 3, 60, job)
    slurm.run("scancel", "--signal=USR2", str(job.job_id))
    _check_resumed(slurm, job, state, total, seen)


def test_high_partition_preempts_low_job_which_resumes(slurm, tmp_path):
    total, state = 24, tmp_path / "counter.json"
    # Both jobs want the same node exclusively, so the high job can only start by preempting.
    ex = executor(slurm, tmp_path / "submitit", name="counter-preempted", slurm_exclusive=True)
    job = ex.submit(slurm_jobs.StepCounter(str(state), total, 0.5))
    slurm.track(job.job_id)
    seen = _wait_for_step(state, 3, 60, job)
    node = slurm.sacct(job.job_id)[0]["NodeList"]
    marker = tmp_path / "high.ran"
    high = slurm.track(
        slurm.run(
            "sbatch",
            "--parsable",
            "-p",
            slurm.high_partition,
            "-w",
            node,
            "-N1",
            "-n1",
            "--exclusive",
            "-t",
            "5",
            "-o",
            str(tmp_path / "high.out"),
            "--wrap",
            f"echo $SLURM_JOB_ID > {marker}",
        )
        .stdout.strip()
        .split(";")[0]
    )
    slurm.wait_sacct_state(high, {"COMPLETED"}, 90, "high-priority job")
    assert marker.exists()
    _check_resumed(slurm, job, state, total, seen)
    # The high job ran in between: after the low job's first run ended, before its resumed run.
    runs, high_rec = slurm.sacct(job.job_id, duplicates=True), slurm.sacct(high)[0]
    assert runs[0]["End"] <= high_rec["Start"] <= runs[-1]["Start"], (runs, high_rec)


def test_afterok_chain_stops_when_a_job_fails(slurm, tmp_path):
    ex = executor(slurm, tmp_path / "submitit", name="chain-a")
    first = ex.submit(slurm_jobs.fail_on_purpose, "stage A fails on purpose")
    slurm.track(first.job_id)
    marker = tmp_path / "b.ran"
    ex.update_parameters(name="chain-b", slurm_dependency=f"afterok:{first.job_id}")
    second = ex.submit(slurm_jobs.touch, str(marker))
    slurm.track(second.job_id)

    slurm.wait_done(first, 90, "failing job A")
    assert (
        slurm.wait_sacct_state(first.job_id, {"FAILED", "COMPLETED", "CANCELLED"}, 30, "job A accounting") == "FAILED"
    )
    assert first.get_info(mode="force")["State"] == "FAILED"
    exc = first.exception()
    assert exc is not None and "stage A fails on purpose" in str(exc), exc
    # kill_invalid_depend: B is cancelled by the controller as soon as A fails, it never starts.
    state_b = slurm.wait_sacct_state(second.job_id, {"CANCELLED", "COMPLETED", "FAILED"}, 60, "dependent job B")
    assert state_b == "CANCELLED", f"B should be cancelled, sacct says {state_b}"
    assert not marker.exists(), "B ran although its afterok dependency failed"
    rec = slurm.sacct(second.job_id)[0]
    assert rec["Start"] in {"None", "Unknown"} or rec["Start"] == rec["End"], rec
    assert second.done(force_check=True)
