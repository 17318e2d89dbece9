"""launch/slurm.py against the real SLURM test cluster (2 nodes, gloo ranks, one per node).

Specifications:
1. ``python launch/slurm.py conf=synthetic nodes=2 wait=true`` runs the whole chain, one job per
   stage, every job COMPLETED in sacct, final metrics present;
2. a stage signalled with SIGUSR2 mid-run checkpoints (all ranks), is requeued, resumes, and ends
   with weights bitwise equal to an uninterrupted run, even when ``scontrol requeue`` is slow
   (the other ranks never end the step before rank 0 has requeued);
3. a failing stage stops the chain: the next job never starts, and the launcher reports the
   stage's error line;
4. a rank that dies at start (its rendezvous port is taken) ends its job at once instead of
   leaving the other ranks waiting: sacct records the job FAILED within 120 s of run time and its
   rank step cancelled by srun;
5. a 2 x 2 grid's dry run plans every point and submits nothing;
6. a grid point that fails cancels only its own dependent jobs (seed arrays chained with
   aftercorr); the other point completes and the grid summary names the failures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_fixtures import REPO, child_env, last_error, run_launcher, tiny  # noqa: E402

from sdca_dist.launch.backends.slurm import TERMINAL_STATES  # noqa: E402

pytestmark = pytest.mark.timeout(900)

CHAIN = ["src", "dist_init", "sdca", "pseudo_label", "ssl"]


def _job_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"\[launch\] (\w+): job (\d+)", stdout))


def _cluster(slurm, *extra: str) -> list[str]:
    return ["nodes=2", f"cluster.partition={slurm.low_partition}", "cluster.time_min=30", *extra]


def test_whole_chain_on_two_nodes_of_two_tasks_takes_each_stage_its_planned_shape(slurm, shards, tmp_path):
    """2 nodes x 2 CPU ranks granted: the tiny chain's src and ssl (global batch 4) and the
    inference stages use all 4 ranks on both nodes, sdca (2 + 2) one node of 2. sacct's NNodes /
    NTasks of every job equal the dry run's plan."""
    run = tmp_path / "run"
    args = tiny(shards, *_cluster(slurm, f"run_dir={run}", "cluster.tasks_per_node=2", "train.iters=4"))
    dry = run_launcher(args + ["dry_run=true"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    plan = {
        ln.split(":", 1)[0][len("[dry-run] ") :]: json.loads(ln.split(": ", 1)[1])
        for ln in dry.stdout.splitlines()
        if ln.startswith("[dry-run] ")
    }
    assert {s: (p["nodes"], p["ntasks_per_node"]) for s, p in plan.items()} == {
        "src": (2, 2),
        "dist_init": (2, 2),
        "sdca": (1, 2),
        "pseudo_label": (2, 2),
        "ssl": (2, 2),
    }

    proc = run_launcher(args + ["wait=true"])
    jobs = _job_ids(proc.stdout)
    for j in jobs.values():
        slurm.track(j)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(jobs) == CHAIN, jobs
    for stage, job in jobs.items():
        assert slurm.wait_sacct_state(job, {"COMPLETED"}, 30, stage) == "COMPLETED"
        want = plan[stage]
        assert int(slurm.sacct(job)[-1]["NNodes"]) == want["nodes"], stage
        # the srun step that ran the ranks (JobID.0): its node and task counts are the plan's
        steps = [
            ln.split("|")
            for ln in slurm.run("sacct", "-j", job, "-n", "-P", "-o", "JobID,NNodes,NTasks").stdout.splitlines()
        ]
        srun = [st for st in steps if st[0] == f"{job}.0"]
        assert srun and (int(srun[-1][1]), int(srun[-1][2])) == (want["nodes"], want["world_size"]), (stage, steps)
        done = json.loads((run / stage / "DONE").read_text())
        assert done["world_size"] == want["world_size"], (stage, done["world_size"])
    assert (run / "ssl" / "metrics.json").is_file()
    # each stage after src was submitted afterok on the stage before it (sacct keeps no
    # dependencies and scontrol clears satisfied ones: the batch script is the record)
    for before, stage in zip(CHAIN, CHAIN[1:]):
        scripts = sorted((run / "slurm" / stage).rglob("*_submission.sh"))
        assert scripts, f"no batch script for {stage}"
        deps = re.findall(r"^#SBATCH --dependency=(\S+)$", scripts[0].read_text(), re.M)
        assert deps == [f"afterok:{jobs[before]}"], (stage, deps)
    assert not re.search(
        r"^#SBATCH --dependency", next((run / "slurm" / "src").rglob("*_submission.sh")).read_text(), re.M
    )


def _wait_log(path_glob, pattern: str, timeout_s: float, base: Path) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for log in base.glob(path_glob):
            text = log.read_text(errors="replace")
            if re.search(pattern, text):
                return text
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in {base}/{path_glob} after {timeout_s}s")


def _src_job(launcher: subprocess.Popen, slurm) -> str:
    """src's job id as the running launcher prints it (``[launch] src: job N``), tracked for cleanup."""
    for line in launcher.stdout:
        m = re.search(r"\[launch\] src: job (\d+)", line)
        if m:
            return slurm.track(m.group(1))
    raise AssertionError("the launcher printed no job id")


def _slow_requeue(folder: Path, delay_s: int) -> dict[str, str]:
    """The PATH (for ``child_env``) whose ``scontrol requeue`` takes ``delay_s`` seconds (a loaded
    controller): a wrapper first on PATH, which the job inherits from the launcher. Each requeue it
    passes on is recorded in ``folder/requeues``."""
    folder.mkdir(parents=True)
    real = shutil.which("scontrol")
    assert real, "scontrol is not on PATH"
    wrapper = folder / "scontrol"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = requeue ]; then sleep {delay_s}; echo "$@" >> {folder / "requeues"}; fi\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_usr2_mid_stage_checkpoints_requeues_and_resumes_bitwise(slurm, shards, tmp_path):
    """With a requeue that takes 15 s: the ranks other than 0 end their tasks with success right
    after the checkpoint, so srun (--kill-on-bad-exit=1) never ends the step before rank 0's
    requeue went through."""
    # cache=false: both runs have the same settings, so the second would reuse the first's src
    # from the stage cache instead of training (and being interrupted)
    common = ["stages=[src]", "wait=true", "train.iters=24", "train.checkpoint_every=1000", "cache=false"]
    straight = run_launcher(tiny(shards, *_cluster(slurm, *common, f"run_dir={tmp_path / 'straight'}")))
    for j in _job_ids(straight.stdout).values():
        slurm.track(j)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]

    run = tmp_path / "interrupted"
    slow = tmp_path / "slow-scontrol"
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "slurm.py"), *tiny(shards, *_cluster(slurm, *common, f"run_dir={run}"))],
        cwd=REPO,
        env=child_env(**_slow_requeue(slow, 15)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job = _src_job(launcher, slurm)
        _wait_log(f"slurm/src/{job}/*_0_log.out", r"\[src\] it ([3-9]|1\d)/24", 300, run)
        slurm.run("scancel", "--signal=USR2", job)
        out, err = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-2000:] + err[-2000:]
    log = "".join(p.read_text(errors="replace") for p in sorted((run / "slurm" / "src" / job).glob("*_0_log.out")))
    assert "stop signal: checkpoint written" in log
    m = re.search(r"resumed from .*iter_(\d+) at iteration (\d+)", log)
    assert m, "the requeued job did not resume from the checkpoint"
    assert 3 <= int(m.group(2)) < 24
    records = slurm.sacct(job, duplicates=True)
    assert len(records) >= 2 and records[-1]["State"].startswith("COMPLETED"), records
    assert (slow / "requeues").read_text().split() == ["requeue", job], "the slow requeue was not the one used"
    assert "rank 0 requeues the job" in "".join(
        p.read_text(errors="replace") for p in sorted((run / "slurm" / "src" / job).glob("*_1_log.err"))
    )
    a = torch.load(tmp_path / "straight" / "src" / "model_final.pt", weights_only=True)
    b = torch.load(run / "src" / "model_final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the requeue"


def test_failing_stage_stops_the_chain_and_is_reported(slurm, shards, tmp_path):
    run = tmp_path / "run"
    (run / "src").mkdir(parents=True)
    (run / "src" / "model_final.pt").write_bytes(b"not a checkpoint")
    # a src that says it finished: the job, not the preflight, finds the file unloadable
    from sdca_dist.lineage import sha256_file

    (run / "src" / "DONE").write_text(
        json.dumps({"stage": "src", "outputs": {"model_final.pt": sha256_file(run / "src" / "model_final.pt")}})
    )
    proc = run_launcher(tiny(shards, *_cluster(slurm, "stages=[dist_init,sdca]", "wait=true", f"run_dir={run}")))
    jobs = _job_ids(proc.stdout)
    for j in jobs.values():
        slurm.track(j)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stage dist_init job") and f"{run}/src/model_final.pt" in message, message
    assert "not run: sdca" in message
    assert slurm.sacct(jobs["dist_init"])[-1]["State"].startswith("FAILED")
    assert not (run / "sdca").exists(), "the dependent stage started"
    assert slurm.sacct(jobs["sdca"])[-1]["State"].split()[0] in {"CANCELLED", "PENDING"}


def test_what_the_partition_cannot_give_is_refused_before_submission(slurm, shards, tmp_path):
    base = tiny(
        shards,
        f"run_dir={tmp_path / 'run'}",
        f"cluster.partition={slurm.low_partition}",
        "cluster.time_min=30",
    )
    gpus = run_launcher(base + ["nodes=2", "cluster.gpus_per_node=4"])
    assert gpus.returncode == 2
    assert gpus.stderr.strip().splitlines()[-1] == (
        f"error: cluster.gpus_per_node=4 but partition {slurm.low_partition} offers 0 GPU(s) per node"
    )
    nodes = run_launcher(base + ["nodes=3"])
    assert nodes.returncode == 2
    assert nodes.stderr.strip().splitlines()[-1] == f"error: nodes=3 but partition {slurm.low_partition} has 2 node(s)"
    assert not (tmp_path / "run" / "slurm").exists(), "something was submitted"


def test_seeds_run_as_one_job_array_and_are_summarised(slurm, shards, tmp_path):
    run = tmp_path / "run"
    proc = run_launcher(
        tiny(
            shards,
            *_cluster(slurm, "stages=[src]", "seeds=2", "wait=true", f"run_dir={run}", "train.iters=2"),
        )
    )
    jobs = _job_ids(proc.stdout)
    for j in jobs.values():
        slurm.track(j)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "src: job" in proc.stdout and "(2 seed(s), 2x1 ranks)" in proc.stdout
    records = slurm.sacct(jobs["src"])
    assert sorted(r["JobID"] for r in records) == [f"{jobs['src']}_0", f"{jobs['src']}_1"], records
    assert all(r["State"].startswith("COMPLETED") for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["stages"]["src"]["mIoU"]) == 2
    for seed in (0, 1):
        assert f"seed: {seed}" in (run / f"seed_{seed}" / "config.yaml").read_text()


#: how long (sacct's Elapsed) the job of the dying-rank test may run: its ranks need about 20 s to
#: start and fail; ranks left waiting for rank 0 would wait far longer (the process-group timeout is
#: 30 minutes, and a rank whose store handshake went to a listener that never answers waits with no
#: timeout at all: without --kill-on-bad-exit the job ran until the listener closed)
ENDS_WITHIN_S = 120


def _steps(slurm, job: str) -> dict[str, dict[str, str]]:
    """sacct's records of a job and its steps ({JobID: {State, ExitCode, Elapsed (s)}})."""
    out = slurm.run("sacct", "-j", job, "-n", "-P", "-o", "JobID,State,ExitCode,ElapsedRaw").stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.strip()]
    return {r[0]: {"State": r[1].split()[0], "ExitCode": r[2], "Elapsed": r[3]} for r in rows}


def _wait_ended_within(slurm, job: str, within_s: int, start_guard_s: float = 300) -> dict[str, dict[str, str]]:
    """Poll sacct until ``job`` ends; fail (and cancel it) once SLURM records it running for
    ``within_s`` seconds without ending. The wall-clock guard only covers a job that never starts."""
    guard = time.monotonic() + start_guard_s
    while True:
        steps = _steps(slurm, job)
        rec = steps.get(job, {"State": "no record", "Elapsed": "0"})
        if rec["State"] in TERMINAL_STATES:
            return steps
        if int(rec["Elapsed"] or 0) >= within_s:
            slurm.run("scancel", job, check=False)
            pytest.fail(
                f"job {job} still {rec['State']} after {rec['Elapsed']} s of run time (sacct): the ranks were "
                f"left waiting for the rank that died; {steps}",
                pytrace=False,
            )
        if rec["State"] in ("PENDING", "no record") and time.monotonic() > guard:
            slurm.run("scancel", job, check=False)
            pytest.fail(f"job {job} did not start within {start_guard_s:.0f} s ({steps})", pytrace=False)
        time.sleep(1)


def test_a_rank_that_dies_at_start_ends_the_job_instead_of_leaving_the_others_waiting(slurm, shards, tmp_path):
    """Rank 0 cannot listen on the job's rendezvous port (another process holds it, as happens when
    two jobs on one node derive the same port): it exits 1, and srun ends the other ranks
    (``--kill-on-bad-exit``) instead of leaving them waiting for rank 0. Checked from SLURM's own
    records: the job ends FAILED within ENDS_WITHIN_S of run time (sacct's Elapsed), its rank step
    CANCELLED with SIGKILL, srun's log names rank 0's exit 1 and the other three ranks killed, no
    rank reports a timeout, and the launcher reports the failed stage."""
    import socket

    run = tmp_path / "run"
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()  # accepts connections into the backlog and never answers them
        port = holder.getsockname()[1]
        args = _cluster(slurm, "stages=[src]", "wait=true", "cluster.tasks_per_node=2", "cache=false")
        launcher = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "slurm.py"), *tiny(shards, *args, f"run_dir={run}")],
            cwd=REPO,
            env=child_env(MASTER_PORT=str(port)),  # sbatch passes it on to every rank
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            job = _src_job(launcher, slurm)
            _wait_ended_within(slurm, job, ENDS_WITHIN_S)
            out, err = launcher.communicate(timeout=120)  # a guard: the job has ended, the launcher follows
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    assert launcher.returncode == 2, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: stage src job {job} ended FAILED"), err[-2000:]
    steps = _steps(slurm, job)
    ranks = steps.get(f"{job}.0")  # the srun step that ran the 4 ranks
    assert ranks is not None, steps
    # srun ended the step itself (CANCELLED, SIGKILL to the ranks still running) the moment rank 0
    # exited 1; ranks left waiting would end it FAILED (exit 1) after their timeout
    assert steps[job]["State"] == "FAILED", steps
    assert (ranks["State"], ranks["ExitCode"]) == ("CANCELLED", "0:9"), steps
    assert int(steps[job]["Elapsed"]) < ENDS_WITHIN_S, steps  # the job's recorded run time (End - Start)
    log = (run / "slurm" / "src" / job / f"{job}_0_log.err").read_text(errors="replace")
    assert "EADDRINUSE" in log, log[-3000:]
    # srun's account, in the batch step's log (rank 0's file): rank 0 exited 1, the others were killed
    assert re.search(r"^srun: error: \S+: task 0: Exited with exit code 1$", log, re.M), log[-3000:]
    killed = [
        t
        for a, b in re.findall(r"^srun: error: \S+: tasks? (\d+)(?:-(\d+))?: Killed$", log, re.M)
        for t in range(int(a), int(b or a) + 1)
    ]
    assert sorted(killed) == [1, 2, 3], log[-3000:]
    for rank in (1, 2, 3):
        text = (run / "slurm" / "src" / job / f"{job}_{rank}_log.err").read_text(errors="replace")
        assert not re.search(r"[Tt]imed? ?out|DistStoreError", text), f"rank {rank} reports a timeout:\n{text[-2000:]}"


def test_a_two_key_grid_dry_run_plans_every_point_and_submits_nothing(slurm, shards, tmp_path):
    """A 2 x 2 grid (tau x sdca's length tied to its schedule horizon) on SLURM: the dry run
    prints the four points, which stages each reuses, each point's sbatch parameters, and
    writes and submits nothing."""
    root = tmp_path / "g"
    args = tiny(
        shards,
        *_cluster(slurm, "method.tau=1,10", "sdca.iters,sdca.schedule_iters=2,3", f"run_dir={root}", "dry_run=true"),
    )
    before = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
    proc = run_launcher(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [f"method.tau={t}+sdca.iters={i}+sdca.schedule_iters={i}" for t in (1, 10) for i in (2, 3)]
    assert "[grid] 4 point(s) x 1 seed(s)" in proc.stdout
    assert f"[grid] {names[0]} (baseline): computes src, dist_init, sdca, pseudo_label, ssl" in proc.stdout
    assert f"[grid] {names[3]}: computes sdca, pseudo_label, ssl; reuses src from {names[0]}" in proc.stdout
    for name in names:
        section = proc.stdout.split(f"[grid] --- {name} ---", 1)[1].split("[grid] ---", 1)[0]
        sdca = json.loads(
            next(ln for ln in section.splitlines() if ln.startswith("[dry-run] sdca: ")).split(": ", 1)[1]
        )
        assert sdca["sbatch"]["partition"] == slurm.low_partition and sdca["iters"] == int(name[-1]), sdca
    assert not root.exists(), "a dry run writes nothing"
    assert slurm.run("squeue", "-h", "-o", "%i").stdout.split() == before, "a dry run submits nothing"


def test_a_failed_grid_point_cancels_only_its_own_jobs(slurm, shards, tmp_path):
    """src.lr=1e9 stops on non-finite values (exit 2, in src or dist_init) in both seeds; the
    point's later stages never run, while the other point's src, dist_init and sdca (queued
    behind the failing jobs) complete. Seed arrays chain with aftercorr; the grid summary names the
    failed jobs and their error line."""
    root = tmp_path / "g"
    args = tiny(
        shards,
        "nodes=1",
        f"cluster.partition={slurm.low_partition}",
        "cluster.time_min=30",
        "src.iters=2",
        "sdca.iters=2",
        "src.lr=1e9,0.01",
        "seeds=2",
        "stages=[src,dist_init,sdca]",
        "wait=true",
        f"run_dir={root}",
    )
    proc = run_launcher(args)
    for j in re.findall(r"\[launch\] \w+: job (\d+)", proc.stdout):
        slurm.track(j)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    bad, good = root / "src.lr=1e9", root / "src.lr=0.01"
    for seed in (0, 1):
        assert (good / f"seed_{seed}" / "sdca" / "DONE").is_file(), proc.stdout[-3000:]
        assert not (bad / f"seed_{seed}" / "sdca" / "DONE").exists()
    jobs = {
        (p.name, st): json.loads((p / "seed_0" / "jobs.json").read_text())[st]["job_id"].split("_")[0]
        for p in (bad, good)
        for st in ("src", "dist_init", "sdca")
    }
    summary = json.loads((root / "summary.json").read_text())
    failed = {(f["point"], f["seed"], f["stage"]): f for f in summary["failures"]}
    first = (
        failed["src.lr=1e9", 0, "dist_init"]
        if ("src.lr=1e9", 0, "src") not in failed
        else failed["src.lr=1e9", 0, "src"]
    )
    stage = first["stage"]
    assert first["state"] == "failed" and "FAILED" in first["why"] and "non-finite" in first["why"], first
    for seed in (0, 1):
        assert slurm.task_state(jobs["src.lr=1e9", stage], seed).startswith("FAILED")
        # a task SLURM cancels before splitting it out of its array's pending record is recorded
        # only as the array's row (``<id>_[0-1]``): task_state reads either form
        state = slurm.task_state(jobs["src.lr=1e9", "sdca"], seed)
        assert state.startswith("CANCELLED"), state
        after = failed["src.lr=1e9", seed, "sdca"]
        assert after["state"] == "not run" and after["why"].startswith(f"{stage} failed"), after
    assert {p for p, _, _ in failed} == {"src.lr=1e9"}, failed
    script = next((good / "slurm" / "dist_init").rglob("*_submission.sh")).read_text()
    assert f"--dependency=aftercorr:{jobs['src.lr=0.01', 'src']}" in script, script
    assert set(summary["table"]["src.lr=0.01"]) == {"src", "dist_init", "sdca"}
    assert last_error(proc).startswith(
        f"error: grid {root} ended with failures ({stage} job {jobs['src.lr=1e9', stage]}_"
    )
