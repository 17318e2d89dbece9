"""``python launch/slurm.py run_dir=R status=true`` on a local run (the real launcher and stages).

Specifications: one row per seed and stage, exit 0 in every case:
* done: mIoU, wall time and "computed" (or "reused from <key>");
* running: iteration i/N, images/s and ETA from the stage's progress record, while the stage
  lock's holder is alive (a real src stage, held still with SIGSTOP during the call);
* stopped: the same stage after SIGTERM (checkpoint, exit 3): where it stopped, no live process;
* reused: a src restored from the shared chain's stage cache says so;
* failed: the exit code and the last error line of the stage's process (FAILED.json, written
  by the local launcher);
* stale: DONE, but an output is no longer the file it wrote; and every stage built on a stale,
  missing or redone stage, naming the stage it depends on (and the one where the change began),
  whichever way the change came: settings, outputs, a deleted stage folder, input shards;
* not started;
* a job squeue still lists (pending, held, requeued, suspended, completing...) is never "failed".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import REPO, child_env, copy_run, run_launcher, tiny, train_cmd

from sdca_dist.lineage import StageLock


def _rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (state, detail)} of a single-seed status table."""
    out = {}
    for line in stdout.splitlines()[1:]:
        m = re.match(r"seed \d+\s+(\w+)\s+(done|running|failed|stale|not started|stopped)\s*(.*)$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


@pytest.fixture(scope="module")
def run(tiny_chain, tmp_path_factory):
    """A run stopped after dist_init: the shared chain's folder without the later stages' folders,
    and a plan of src, dist_init and sdca (the status view lists the planned stages)."""
    later = {"sdca", "sdca_no_align", "pseudo_label", "ssl", ".lock"}
    run = tmp_path_factory.mktemp("status") / "run"
    shutil.copytree(tiny_chain, run, ignore=lambda d, names: [n for n in names if Path(d) == tiny_chain and n in later])
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["dist_init", "src"]
    (run / "plan.json").write_text(json.dumps({"stages": {s: {} for s in ("src", "dist_init", "sdca")}}))
    return run


def test_done_and_not_started_rows(run):
    proc = run_launcher([f"run_dir={run}", "status=true"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(proc.stdout)
    assert rows["src"][0] == "done" and re.match(r"mIoU \d+\.\d\d, wall \d:\d\d:\d\d, computed$", rows["src"][1])
    assert rows["dist_init"][0] == "done" and rows["dist_init"][1].endswith("computed")
    assert rows["sdca"] == ("not started", "")
    assert proc.stdout.strip().splitlines()[-1] == f"{run}: 2 done, 1 not started"


def test_running_row_reads_the_progress_record(run):
    from sdca_dist.engine.observe import StageObserver

    folder = run / "sdca"
    lock = StageLock(folder)
    lock.acquire()  # this process holds the stage, as a running stage's rank 0 does
    try:
        obs = StageObserver("sdca", folder, True, total_iters=300)
        obs.progress(120, {"images_per_s": 12.5})
        obs.close()
        proc = run_launcher([f"run_dir={run}", "status=true"], timeout=300)
    finally:
        lock.release()
        shutil.rmtree(folder)
    assert proc.returncode == 0
    state, detail = _rows(proc.stdout)["sdca"]
    assert state == "running"
    assert re.match(r"it 120/300, 12\.5 images/s, ETA \d+:\d\d:\d\d, updated \d+:\d\d:\d\d ago$", detail), detail


def test_failed_and_stale_rows(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = copy / "src" / "model_final.pt"
    model.write_bytes(model.read_bytes()[:-100])  # truncated: src's DONE no longer holds
    proc = run_launcher([f"run_dir={copy}", "stages=[dist_init]", "cache=false"])
    assert proc.returncode == 2
    # the view lists the stages of the last launch's plan (dist_init alone here): plan all three again
    (copy / "plan.json").write_text(json.dumps({"stages": {s: {} for s in ("src", "dist_init", "sdca")}}))
    status = run_launcher([f"run_dir={copy}", "status=true"], timeout=300)
    assert status.returncode == 0
    rows = _rows(status.stdout)
    assert rows["src"][0] == "stale" and "its output model_final.pt is not the file it wrote" in rows["src"][1]
    assert rows["dist_init"][0] == "failed"
    assert rows["dist_init"][1] == (
        f"exit code 2: error: {model} is not the file stage src wrote (sha256 differs from its DONE record): "
        "corrupt or replaced; run stage src again (launcher: redo=[src])"
    )


def test_the_status_view_imports_no_torch(tiny_chain):
    """A login node's status call: every stage's freshness checked (settings, outputs, inputs,
    shards) without loading torch."""
    view = (
        "import sys; from sdca_dist.launch.cli import main; "
        f"rc = main(['run_dir={tiny_chain}', 'status=true']); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", view], cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " 6 done" in proc.stdout and proc.stdout.splitlines()[-1] == "False", proc.stdout


#: every state squeue(1) lists for a job that has not ended, and the row the view must show (the
#: SLURM test cluster shows PENDING, RUNNING and SPECIAL_EXIT for real: tests/slurm/test_status_slurm.py)
SQUEUE_ROWS = {
    "PENDING": "pending",
    "RESV_DEL_HOLD": "pending",
    "CONFIGURING": "configuring",
    "REQUEUED": "requeued",
    "REQUEUE_HOLD": "requeued",
    "REQUEUE_FED": "requeued",
    "SPECIAL_EXIT": "requeued",
    "SUSPENDED": "suspended",
    "STOPPED": "suspended",
    "SIGNALING": "running",
    "RESIZING": "running",
    "COMPLETING": "completing",
    "STAGE_OUT": "completing",
}


@pytest.mark.parametrize("state", sorted(SQUEUE_ROWS))
def test_a_job_squeue_still_lists_is_never_shown_failed(tmp_path, state):
    from sdca_dist.launch.status import stage_row

    jobs = {"src": {"job_id": "7", "stderr": str(tmp_path / "7_0_log.err")}}
    states = {"7": {"state": state, "reason": "Why"}}  # slurm_states' record of a job squeue lists
    row, detail = stage_row(tmp_path, "src", None, None, jobs, states)
    named = "" if state.lower() == row else f" {state}"
    assert (row, detail) == (SQUEUE_ROWS[state], f"job 7{named} (Why)")


@pytest.mark.parametrize(
    "record, tasks",
    [
        ("17", ["17"]),
        ("17_3", ["17_3"]),
        ("17_[0-1]", ["17_0", "17_1"]),
        ("17_[0,2-3]", ["17_0", "17_2", "17_3"]),
        ("17_[1-2%256]", ["17_1", "17_2"]),
        ("17_[4]", ["17_4"]),
    ],
)
def test_an_array_record_stands_for_each_task_it_holds(record, tasks):
    """squeue and sacct list a pending array's tasks as one record (``17_[0-1]``, with submitit's
    throttle ``%256``); the status view reads it as each task's (the real SLURM case:
    tests/slurm/test_status_slurm.py)."""
    from sdca_dist.launch.backends.slurm import array_task_ids

    assert array_task_ids(record) == tasks


def test_a_job_cancelled_before_it_started_is_not_run_and_one_cancelled_while_running_is_not_failed(tmp_path):
    """sacct's CANCELLED: without a log the job never started (SLURM cancels the jobs that depend
    on a failed one; the SLURM test sees it and the failed stage named); with one, scancel stopped
    it while it ran. Neither is the stage failing."""
    from sdca_dist.launch.status import stage_row

    log = tmp_path / "8_0_log.err"
    jobs = {"dist_init": {"job_id": "8", "stderr": str(log)}}
    states = {"8": {"state": "CANCELLED", "exit_code": "0:0"}}
    assert stage_row(tmp_path, "dist_init", None, None, jobs, states) == (
        "not run",
        "job 8 cancelled before it started",
    )
    log.write_text("starting\nslurmstepd: error: *** JOB 8 ON n1 CANCELLED AT 2026-12-07T05:00:00 ***\n")
    row, detail = stage_row(tmp_path, "dist_init", None, None, jobs, states)
    assert row == "cancelled" and detail.startswith("job 8 cancelled while it ran: slurmstepd: error: *** JOB 8"), (
        detail
    )
    states["8"]["state"] = "FAILED"  # the control: an ended job in any other state is a failure
    assert stage_row(tmp_path, "dist_init", None, None, jobs, states)[0] == "failed"


def test_status_of_a_folder_that_is_no_run(tmp_path):
    proc = run_launcher([f"run_dir={tmp_path}", "status=true"], timeout=300)
    assert proc.returncode == 0 and "no run folder here" in proc.stdout


# ----------------------------------------------------------------------------------------------
# staleness follows the lineage: one change, every stage built on it is stale
# ----------------------------------------------------------------------------------------------
def _status_rows(run: Path) -> dict[str, tuple[str, str]]:
    proc = run_launcher([f"run_dir={run}", "status=true"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _rows(proc.stdout)


def _assert_built_on(rows: dict, stage: str, producer: str, origin: str, cause: str) -> None:
    """``stage`` is stale because of ``producer`` (through ``origin`` when that is further up)."""
    state, detail = rows[stage]
    through = f"through {origin}: " if origin != producer else ""
    assert state == "stale", (stage, rows[stage])
    assert detail.startswith(f"its input stage {producer} is stale ({through}{cause}"), (stage, detail)


def test_settings_changed_makes_every_stage_built_on_it_stale(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    config = run / "config.yaml"
    assert "lr: 0.01\n" in config.read_text()
    config.write_text(config.read_text().replace("lr: 0.01\n", "lr: 0.02\n", 1))  # src.lr edited by hand
    rows = _status_rows(run)
    assert rows["src"][0] == "stale" and rows["src"][1].startswith("done with other settings (src.lr: 0.01 -> 0.02)")
    cause = "done with other settings (src.lr: 0.01 -> 0.02)"
    _assert_built_on(rows, "dist_init", "src", "src", cause)
    _assert_built_on(rows, "sdca", "src", "src", cause)
    _assert_built_on(rows, "sdca_no_align", "src", "src", cause)
    _assert_built_on(rows, "pseudo_label", "sdca", "src", cause)
    _assert_built_on(rows, "ssl", "sdca", "src", cause)


def test_an_output_changed_makes_every_stage_built_on_it_stale(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    model = run / "src" / "model_final.pt"
    model.write_bytes(model.read_bytes()[:-100])
    rows = _status_rows(run)
    cause = "its output model_final.pt is not the file it wrote"
    assert rows["src"][0] == "stale" and rows["src"][1].startswith(cause)
    _assert_built_on(rows, "dist_init", "src", "src", cause)
    _assert_built_on(rows, "pseudo_label", "sdca", "src", cause)
    _assert_built_on(rows, "ssl", "sdca", "src", cause)


def test_a_deleted_stage_folder_makes_every_stage_built_on_it_stale(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    shutil.rmtree(run / "dist_init")
    rows = _status_rows(run)
    assert rows["src"][0] == "done" and rows["dist_init"] == ("not started", "")
    for stage in ("sdca", "sdca_no_align"):
        assert rows[stage] == ("stale", rows[stage][1]) and rows[stage][1].startswith(
            "its input stage dist_init is missing (no dist_init/DONE)"
        ), rows[stage]
    _assert_built_on(rows, "pseudo_label", "sdca", "dist_init", "not done")
    _assert_built_on(rows, "ssl", "sdca", "dist_init", "not done")


def test_changed_input_shards_make_every_stage_built_on_them_stale(tiny_chain, shards, tmp_path):
    """The source shards replaced (a copy of the session's shards root with one tar changed,
    bind-mounted over it in a mount namespace of the status call alone): the stages reading
    them are stale by their own check, and pseudo_label and ssl, which do not read them, are
    stale through sdca."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    from sdca_dist.data.verification import hash_and_record

    run = copy_run(tiny_chain, tmp_path / "run")
    for copied in (run / "pseudo_label" / "shards").glob("*.tar"):
        hash_and_record(copied)  # a copy is another file: verified once (as a launch does), read by no status call
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy, symlinks=True)
    tar = sorted((copy / "gta5_train").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    cmd = [sys.executable, str(REPO / "launch" / "slurm.py"), f"run_dir={run}", "status=true"]
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"', copy, shards, *cmd],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and ("Operation not permitted" in proc.stderr or "permission denied" in proc.stderr):
        pytest.skip(f"no mount namespace here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(proc.stdout)
    shard = shards / "gta5_train" / tar.name
    for stage in ("src", "dist_init", "sdca"):
        assert rows[stage][0] == "stale" and str(shard) in rows[stage][1], (stage, rows[stage])
    for stage in ("pseudo_label", "ssl"):
        state, detail = rows[stage]
        assert state == "stale" and detail.startswith("its input stage sdca is stale (") and str(shard) in detail, (
            stage,
            detail,
        )
    assert _status_rows(run)["ssl"][0] == "done"  # outside the namespace the session's shards are unchanged


def test_a_real_stage_running_then_stopped_then_one_reused(shards, tiny_chain, tmp_path):
    """Rows of real stages, no record written by the test: a src of 40 iterations is held still
    (SIGSTOP) once it has logged iteration 3, so that it cannot finish during the status call,
    then resumed and stopped with SIGTERM; a src of the shared chain's settings is restored from
    its stage cache."""
    run = tmp_path / "run"
    argv = tiny(shards, "stage=src", f"run_dir={run}", "train.iters=40", "train.checkpoint_every=1000")
    stage = subprocess.Popen(
        train_cmd(1, argv), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log: list[str] = []
    try:
        for line in stage.stdout:
            log.append(line)
            m = re.search(r"\[src\] it (\d+)/40 ", line)
            if m and int(m.group(1)) >= 3:
                logged = int(m.group(1))
                break
        else:
            pytest.fail("src ended before iteration 3:\n" + "".join(log[-30:]))
        os.kill(stage.pid, signal.SIGSTOP)
        try:
            running = run_launcher([f"run_dir={run}", "status=true", "stages=[src]"], timeout=300)
        finally:
            os.kill(stage.pid, signal.SIGCONT)
        os.kill(stage.pid, signal.SIGTERM)
        rest, _ = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
    assert running.returncode == 0, running.stderr[-2000:]
    state, detail = _rows(running.stdout)["src"]
    assert state == "running", running.stdout
    m = re.match(r"it (\d+)/40, \d+\.\d images/s, ETA \d+:\d\d:\d\d, updated \d+:\d\d:\d\d ago$", detail)
    assert m and 1 <= int(m.group(1)) <= logged, (detail, logged)  # the stage's own record

    assert stage.returncode == 3, rest[-2000:]
    ckpt = sorted((run / "src" / "checkpoints").glob("iter_*"))[-1]
    stopped_at = int(ckpt.name.split("_")[1])
    stopped = run_launcher([f"run_dir={run}", "status=true"], timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    state, detail = _rows(stopped.stdout)["src"]
    m = re.fullmatch(r"at it (\d+)/40, no live process \(relaunch to resume\)", detail)
    assert state == "stopped" and m and logged - 1 <= int(m.group(1)) <= stopped_at, (state, detail, stopped_at)

    # the shared chain's settings in a new folder, sharing its stage cache: src is restored
    again = tmp_path / "again"
    cache = tiny_chain.parent / "stage_cache"
    assert cache.is_dir()
    restored = run_launcher(
        tiny(shards, "cluster=local", f"run_dir={again}", "train.iters=2", "stages=[src]", f"cache_dir={cache}")
    )
    assert restored.returncode == 0, restored.stdout[-2000:] + restored.stderr[-2000:]
    key = json.loads((again / "src" / "DONE").read_text())["reused_from"]
    status = run_launcher([f"run_dir={again}", "status=true"], timeout=300)
    state, detail = _rows(status.stdout)["src"]
    assert state == "done" and f"reused from {key[:12]} (computed in " in detail, detail
