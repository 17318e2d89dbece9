"""``python launch/slurm.py run_dir=R status=true`` on a real SLURM run (the test cluster).

One launch (src and dist_init, queued without waiting), its states driven with scontrol; every
row is read from the status command's own output, each state polled for with a deadline:
* pending: dist_init waits on src (``afterok``): its job id and squeue's reason, Dependency;
* running: src's job RUNNING, the iteration from the stage's progress record;
* requeued: src requeued and held (``scontrol requeuehold State=SpecialExit``, what a site's epilog
  does with a job that exits with a special code): squeue's SPECIAL_EXIT and its reason, never
  "failed";
* not run: dist_init, cancelled by SLURM once src failed, names src;
* failed: src released after its run configuration was broken by hand: sacct's FAILED, the exit
  code, and the last error line of the job's log.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_fixtures import run_launcher, tiny  # noqa: E402

from sdca_dist.launch.status import last_error_line  # noqa: E402

pytestmark = pytest.mark.timeout(600)

ITERS = 100000  # src never ends by itself: the test decides when it stops


def _status(run: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """({stage: (state, detail)}, the whole output) of one status call on a single-seed run."""
    proc = run_launcher([f"run_dir={run}", "status=true"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {}
    for line in proc.stdout.splitlines()[1:-1]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        if len(cells) >= 3:
            rows[cells[1]] = (cells[2], cells[3] if len(cells) > 3 else "")
    return rows, proc.stdout


def _poll(check: Callable[[], Optional[str]], timeout_s: float, what: str) -> None:
    """Call ``check`` until it returns None (done); fail with its last answer at the deadline."""
    end = time.monotonic() + timeout_s
    last = "never checked"
    while time.monotonic() < end:
        last = check()
        if last is None:
            return
        time.sleep(1)
    raise AssertionError(f"{what}: not seen within {timeout_s:.0f} s; last: {last}")


def _squeue_state(slurm, job: str) -> str:
    return slurm.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()


def test_status_of_a_slurm_run_pending_running_requeued_failed(slurm, shards, tmp_path):
    run = tmp_path / "run"
    proc = run_launcher(
        tiny(
            shards,
            "nodes=1",
            f"cluster.partition={slurm.low_partition}",
            "cluster.time_min=30",
            "stages=[src,dist_init]",
            f"train.iters={ITERS}",
            "train.checkpoint_every=1000",
            "cache=false",
            f"run_dir={run}",
        )
    )
    jobs = dict(re.findall(r"\[launch\] (\w+): job (\d+)", proc.stdout))
    for j in jobs.values():
        slurm.track(j)
    assert proc.returncode == 0 and set(jobs) == {"src", "dist_init"}, proc.stdout[-2000:] + proc.stderr[-2000:]
    src, dist_init = jobs["src"], jobs["dist_init"]
    seen: dict[str, tuple[dict, str]] = {}

    def running() -> Optional[str]:
        rows, out = _status(run)
        seen["running"] = (rows, out)
        state, detail = rows.get("src", ("?", ""))
        ok = state == "running" and re.fullmatch(
            rf"it \d+/{ITERS}, \d+\.\d images/s, ETA \d+:\d\d:\d\d, updated \d+:\d\d:\d\d ago \(job {src}\)", detail
        )
        return None if ok else out

    _poll(running, 240, "src running with its progress record")
    assert _squeue_state(slurm, src) == "RUNNING"  # src cannot end by itself (ITERS)
    rows, out = seen["running"]
    assert rows["dist_init"] == ("pending", f"job {dist_init} (Dependency)"), out

    slurm.run("scontrol", "requeuehold", "State=SpecialExit", src)
    _poll(lambda: None if _squeue_state(slurm, src) == "SPECIAL_EXIT" else _squeue_state(slurm, src), 120, "held")
    rows, out = _status(run)
    assert rows["src"] == ("requeued", f"job {src} SPECIAL_EXIT (job requeued in held state)"), out
    assert rows["dist_init"] == ("pending", f"job {dist_init} (Dependency)"), out

    # a hand edit the job's next start refuses (load_frozen: a key the schema does not have)
    config = run / "config.yaml"
    config.write_text(config.read_text() + "not_a_setting: 1\n")
    slurm.run("scontrol", "release", src)
    slurm.wait_sacct_state(src, {"FAILED"}, 240, "src released with a broken configuration")
    rows, out = _status(run)
    log = next((run / "slurm" / "src" / src).glob(f"{src}_0_log.err")).read_text(errors="replace")
    error = last_error_line(log.splitlines())
    assert "not_a_setting" in error and str(config) in error, log[-3000:]
    assert rows["src"] == ("failed", f"job {src} FAILED, exit code 1:0: {error}"), out
    # dist_init waited on src (afterok): SLURM cancels it, and the view says why it never ran
    slurm.wait_sacct_state(dist_init, {"CANCELLED"}, 120, "dist_init after src failed")
    rows, out = _status(run)
    assert rows["dist_init"] == ("not run", f"job {dist_init} cancelled before it started (src failed)"), out


def test_slurm_states_of_a_pending_array_and_of_one_slurm_cancelled_whole(slurm):
    """Tasks 0 and 1 of an array waiting (``afterok``) on a blocker job: squeue lists both as one
    row ``<id>_[0-1]``, and once the blocker is cancelled SLURM cancels the array whole
    (kill_invalid_depend) before splitting it, so sacct has only the array's row ``<id>_[0-1]``
    (named ``<id>`` until slurmdbd has its task list) and none for ``<id>_0`` (what made a grid
    test's ``sacct -j <id>_0`` come back empty). The status view's ``slurm_states`` still gives
    each task its state: pending (Dependency), then CANCELLED (from squeue while it still lists
    the ended array, and from sacct alone, as once squeue has forgotten it)."""
    from sdca_dist.launch.backends.slurm import sacct_states, slurm_states

    def sbatch(*args: str) -> str:
        out = slurm.run("sbatch", "--parsable", "-p", slurm.low_partition, "-o", "/dev/null", *args).stdout
        return slurm.track(out.strip().split(";")[0])

    blocker = sbatch("--wrap", "sleep 600")
    array = sbatch("-a", "0-1", "-d", f"afterok:{blocker}", "--wrap", "true")
    tasks = [f"{array}_0", f"{array}_1"]
    assert slurm.run("squeue", "-h", "-j", ",".join(tasks), "-o", "%i").stdout.split() == [f"{array}_[0-1]"]

    def both_wait_on_the_blocker() -> Optional[str]:  # the scheduler names the reason on its next pass
        states = slurm_states(tasks)
        rows = [(states.get(t, {}).get("state"), states.get(t, {}).get("reason")) for t in tasks]
        return None if rows == [("PENDING", "Dependency")] * 2 else str(states)

    _poll(both_wait_on_the_blocker, 60, "both tasks pending (Dependency) in slurm_states")

    slurm.run("scancel", blocker)

    def both_cancelled() -> Optional[str]:
        states = slurm_states(tasks)
        return None if [states.get(t, {}).get("state") for t in tasks] == ["CANCELLED"] * 2 else str(states)

    _poll(both_cancelled, 60, "both tasks CANCELLED in slurm_states once their dependency failed")
    states = sacct_states(tasks)
    assert [states.get(t, {}).get("state") for t in tasks] == ["CANCELLED"] * 2, states
    records = [r["JobID"] for r in slurm.sacct(array)]
    assert records in ([array], [f"{array}_[0-1]"]), f"SLURM split the array (no repro): {records}"
    assert slurm.sacct(tasks[0]) == []
