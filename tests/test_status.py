"""``python launch/slurm.py run_dir=R status=true`` on a local run (the real launcher and stages).

Specifications: one row per seed and stage, exit 0 in every case:
* done: mIoU, wall time and "computed" (or "reused from <key>");
* running: iteration i/N, images/s and ETA from the stage's progress record, while the stage
  lock's holder is alive;
* failed: the exit code and the last error line of the stage's process (FAILED.json, written
  by the local launcher);
* stale: DONE, but an output is no longer the file it wrote;
* not started.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from engine_fixtures import run_launcher

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


def test_status_of_a_folder_that_is_no_run(tmp_path):
    proc = run_launcher([f"run_dir={tmp_path}", "status=true"], timeout=300)
    assert proc.returncode == 0 and "no run folder here" in proc.stdout
