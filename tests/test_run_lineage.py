"""A run folder has one configuration and a lineage, exercised through the real CLI.

Specifications:
* a stage stopped by a signal and resumed with another setting is refused, naming the key with
  its old and new value; config.yaml is unchanged; resuming with no settings continues;
* a finished run relaunched with other settings is refused (skipping every stage would report
  the numbers of the other settings), nothing written;
* ``redo=[sdca]`` reruns sdca AND every stage after it, computed (not restored from the stage
  cache) and newly finished, while src and dist_init before it stay as they were;
* an input file corrupted after its producer finished is refused by its consumer, naming it, and
  the launcher reruns the producer instead of using it;
* two runs in one stage folder: the second gets one line naming the holder; a lock left by a
  killed run is taken over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from engine_fixtures import REPO, child_env, copy_run, last_error, run_launcher, run_train, tiny, train_cmd

CHAIN = ["src", "dist_init", "sdca", "pseudo_label", "ssl"]


def test_with_ablation_trains_sdca_without_alignment_from_the_same_inputs(tiny_chain):
    """The one-command ablation is a stage of the table, reported beside sdca."""
    sdca = json.loads((tiny_chain / "sdca" / "DONE").read_text())
    off = json.loads((tiny_chain / "sdca_no_align" / "DONE").read_text())
    assert off["lineage"]["inputs"] == sdca["lineage"]["inputs"]  # same src model, distributions, shards
    assert off["final_scalars"]["feat_src"] > 0 and off["final_scalars"]["loss"] == pytest.approx(
        off["final_scalars"]["seg"], rel=1e-6
    )  # the terms are computed but weigh nothing
    summary = json.loads((tiny_chain / "summary.json").read_text())
    assert "sdca_no_align" in summary["stages"]
    effect = summary["alignment_effect"]
    assert effect["per_seed"]["0"] == pytest.approx(
        summary["stages"]["sdca"]["mIoU"][0] - summary["stages"]["sdca_no_align"]["mIoU"][0]
    )
    assert "Alignment effect (sdca - sdca_no_align, paired by seed)" in (tiny_chain / "summary.md").read_text()


def _start_until(argv: list[str], pattern: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(
        train_cmd(1, argv), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    end = time.time() + timeout
    for line in proc.stdout:
        if re.search(pattern, line):
            return proc
        if time.time() > end:
            break
    proc.kill()
    raise AssertionError(f"no {pattern!r} from {argv}")


def test_resume_with_another_setting_is_refused_naming_the_key(shards, tmp_path):
    run = tmp_path / "run"
    argv = tiny(shards, "stage=src", f"run_dir={run}", "train.iters=60", "train.checkpoint_every=1000")
    proc = _start_until(argv, r"\] it [2-9]/60")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-2000:]
    frozen = (run / "config.yaml").read_text()
    assert "lr: 0.01" in frozen

    changed = run_train(1, tiny(shards, "stage=src", f"run_dir={run}", "train.iters=60", "src.lr=0.05"))
    assert changed.returncode == 2
    assert "src.lr: 0.01 -> 0.05" in last_error(changed) and "use a new run_dir" in last_error(changed)
    assert (run / "config.yaml").read_text() == frozen, "the refused command rewrote the frozen config"
    for key, value, shown in (
        ("seed", "3", "seed: 0 -> 3"),
        ("src.batch_size", "2", "src.batch_size: 4 -> 2"),
        ("model", "deeplabv2_vgg16", "model.name: small -> deeplabv2_vgg16"),
    ):
        other = run_train(1, ["stage=src", f"run_dir={run}", f"{key}={value}"])
        assert other.returncode == 2 and shown in last_error(other), other.stderr[-2000:]

    resumed = run_train(1, ["stage=src", f"run_dir={run}"])  # the run folder is all it takes
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resumed from .* at iteration \d+", resumed.stdout)
    assert (run / "src" / "DONE").is_file()


def test_finished_run_relaunched_with_other_settings_is_refused(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = run_launcher(["conf=synthetic", "cluster=local", f"run_dir={run}", "model=deeplabv2_vgg16", "src.lr=0.5"])
    assert proc.returncode == 2
    err = last_error(proc)
    assert "model.name: small -> deeplabv2_vgg16" in err and "src.lr: 0.01 -> 0.5" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "something was written"


def test_relaunch_skips_fresh_stages_and_redo_reruns_everything_after(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    same = run_launcher([f"run_dir={run}", "cluster=local"])
    assert same.returncode == 0, same.stderr[-2000:]
    assert same.stdout.count("DONE with these settings and inputs, skipped") == len(CHAIN)  # ablation not planned

    old = {s: json.loads((run / s / "DONE").read_text())["finished"] for s in CHAIN}
    src_hash = json.loads((run / "src" / "DONE").read_text())["outputs"]["model_final.pt"]
    # the shared chain's stage cache holds sdca, pseudo_label and ssl under these very keys: a redo
    # must compute them all the same
    cache = tiny_chain.parent / "stage_cache"
    assert cache.is_dir()
    redo = run_launcher([f"run_dir={run}", "redo=[sdca]", f"cache_dir={cache}"])
    assert redo.returncode == 0, redo.stdout[-2000:] + redo.stderr[-2000:]
    skipped = re.findall(r"\[launch\] \S+ (\w+): DONE with these settings and inputs, skipped", redo.stdout)
    assert skipped == ["src", "dist_init"]  # sdca_no_align is not planned without with_ablation
    for stage in ("sdca", "pseudo_label", "ssl"):
        assert re.search(rf"\[launch\] seed 0 {stage} \(", redo.stdout), f"{stage} did not rerun"
        record = json.loads((run / stage / "DONE").read_text())
        assert record["finished"] > old[stage], f"{stage}: DONE not renewed"
        assert "reused_from" not in record, f"{stage} was restored from the stage cache, not computed"
    for stage in ("src", "dist_init"):
        assert json.loads((run / stage / "DONE").read_text())["finished"] == old[stage], f"{stage} was redone"
    sdca_inputs = json.loads((run / "sdca" / "DONE").read_text())["lineage"]["inputs"]
    assert sdca_inputs["src/model_final.pt"] == src_hash
    ssl_inputs = json.loads((run / "ssl" / "DONE").read_text())["lineage"]["inputs"]
    assert (
        ssl_inputs["sdca/model_final.pt"]
        == json.loads((run / "sdca" / "DONE").read_text())["outputs"]["model_final.pt"]
    )


def test_corrupt_input_is_refused_by_its_consumer_and_redone_by_the_launcher(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    model = run / "src" / "model_final.pt"
    data = bytearray(model.read_bytes())
    for i in range(1000, 1400):  # 400 flipped bytes inside the tensor data
        data[i] ^= 0xFF
    model.write_bytes(bytes(data))

    proc = run_train(1, ["stage=dist_init", f"run_dir={run}"])
    assert proc.returncode == 2
    assert last_error(proc) == (
        f"error: {model} is not the file stage src wrote (sha256 differs from its DONE record): "
        "corrupt or replaced; run stage src again (launcher: redo=[src])"
    )
    assert json.loads((run / "dist_init" / "DONE").read_text())["stage"] == "dist_init", "the old DONE is kept"

    relaunch = run_launcher([f"run_dir={run}", "stages=[src,dist_init]"])
    assert relaunch.returncode == 0, relaunch.stdout[-2000:] + relaunch.stderr[-2000:]
    assert "seed 0 src (its output model_final.pt is not the file it wrote" in relaunch.stdout
    assert "seed 0 dist_init (its input stage src runs again)" in relaunch.stdout


def test_second_run_in_a_stage_folder_is_refused_and_a_dead_holder_is_taken_over(shards, tmp_path):
    run = tmp_path / "run"
    argv = tiny(shards, "stage=src", f"run_dir={run}", "train.iters=40", "train.checkpoint_every=1000")
    first = _start_until(argv, r"\] it \d+/40")
    try:
        second = run_train(1, ["stage=src", f"run_dir={run}"], timeout=120)
        assert second.returncode == 2
        assert last_error(second) == (
            f"error: run folder {run} (stage src) is in use by pid {first.pid} on "
            f"{os.uname().nodename}; wait for it or use another run_dir"
        )
    finally:
        first.kill()  # SIGKILL: no cleanup, the lock file stays behind
        first.wait()
    assert (run / "src" / ".lock").is_file()
    taken = run_train(1, ["stage=src", f"run_dir={run}"], timeout=600)
    assert taken.returncode == 0, taken.stderr[-2000:]


def test_ssl_from_imagenet_reads_no_sdca_model(tiny_chain, tmp_path):
    """The published ssl starts from ImageNet weights (model.pretrained), not from the sdca
    model; its lineage then holds only the pseudo labels (and the shard sets)."""
    run = tmp_path / "run"  # the chain with ssl.init=imagenet: a stage never builds on other settings' outputs
    shards = json.loads((tiny_chain / "config.origin.json").read_text())["overrides"]
    root = [o for o in shards if o.startswith("data.shards_root=")][0].split("=", 1)[1]
    cache = tiny_chain.parent / "stage_cache"  # the chain's: its stages before ssl have these settings
    proc = run_launcher(
        tiny(root, "cluster=local", f"run_dir={run}", "train.iters=2", "ssl.init=imagenet", f"cache_dir={cache}")
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[pseudo_label] reused from " in proc.stdout and "[ssl] reused from " not in proc.stdout
    assert "[ssl] initialised from" not in proc.stdout
    inputs = json.loads((run / "ssl" / "DONE").read_text())["lineage"]["inputs"]
    assert "pseudo_label/shards/manifest.json" in inputs and "sdca/model_final.pt" not in inputs
