"""``python -m sdca_dist.train`` ends in one line naming the file or key at fault, never a traceback:
no space while writing a checkpoint, a read-only run folder, ``data.shards_root`` naming a file,
a crafted checkpoint file with forged hashes, ``model.pretrained`` on a model without ImageNet
weights. Real file systems (tmpfs; root needed, else skipped) and the real CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_fixtures import last_error, run_train, tiny
from fault_fixtures import tmpfs


@pytest.fixture(scope="module")
def src_done(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults_train") / "run"
    proc = run_train(1, tiny(shards, "stage=src", f"run_dir={run}", "train.iters=2", "train.checkpoint_every=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _one_line(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = last_error(proc)
    for needle in needles:
        assert needle in line, line
    return line


def test_no_space_while_writing_a_checkpoint(shards, src_done, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src_done / "config.yaml", run / "config.yaml")
    shutil.copy(src_done / "config.origin.json", run / "config.origin.json")
    with tmpfs(run / "src", size="1200k"):  # room for logs, not for a 1.8 MB checkpoint
        proc = run_train(1, ["stage=src", f"run_dir={run}"])
        _one_line(proc, "No space left on device", str(run / "src" / "checkpoints"))
        assert not list((run / "src").rglob(".tmp-*")), "a half-written file was left"


def test_a_read_only_run_folder(src_done, tmp_path):
    run = tmp_path / "ro"
    with tmpfs(run, size="1m"):
        shutil.copy(src_done / "config.yaml", run / "config.yaml")
        subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
        proc = run_train(1, ["stage=src", f"run_dir={run}"])
        _one_line(proc, "Read-only file system", str(run))


def test_shards_root_naming_a_file(tmp_path):
    afile = tmp_path / "not_a_folder"
    afile.write_text("x")
    proc = run_train(1, ["conf=synthetic", "stage=src", f"run_dir={tmp_path / 'run'}", f"data.shards_root={afile}"])
    _one_line(proc, f"data.shards_root={afile}")


def test_a_crafted_checkpoint_file_is_refused_in_one_line(src_done, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(src_done, run, ignore=shutil.ignore_patterns(".lock"))
    ckpt = sorted((run / "src" / "checkpoints").glob("iter_*"))[-1]
    common = ckpt / "common.pt"
    common.write_bytes(pickle.dumps({"iteration": print}))  # a pickle the safe loader must not execute
    complete = json.loads((ckpt / "COMPLETE.json").read_text())  # hashes forged to match
    complete["files"]["common.pt"] = {
        "sha256": hashlib.sha256(common.read_bytes()).hexdigest(),
        "bytes": common.stat().st_size,
    }
    (ckpt / "COMPLETE.json").write_text(json.dumps(complete))
    (run / "src" / "DONE").unlink()
    proc = run_train(1, ["stage=src", f"run_dir={run}"])
    _one_line(proc, str(common), "weights-only loader")


def test_pretrained_weights_on_a_model_without_them(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    proc = run_train(
        1, ["conf=synthetic", "stage=src", f"run_dir={tmp_path / 'run'}", "model=small", f"model.pretrained={weights}"]
    )
    _one_line(proc, "model.pretrained=", "has no ImageNet weights")
