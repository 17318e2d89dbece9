"""launch/slurm.py before anything is submitted: config mistakes, missing inputs, dry runs.

These never reach a cluster: every one must fail (or print) before sbatch would be called. A
dry run plans without data (missing shard sets and weights are listed as what the run will
need); a real launch refuses them.
"""

from __future__ import annotations

import subprocess
import sys

from engine_fixtures import REPO, child_env, dry_run_plan, fake_shard_sets, last_error, run_launcher


def test_unknown_preset_lists_the_valid_choices():
    proc = run_launcher(["conf=gta2cty", "nodes=4"], timeout=120)
    assert proc.returncode == 2
    assert last_error(proc) == "error: unknown conf='gta2cty'; valid choices: gta2city, synthetic, synthia2city"


def test_unknown_key_and_wrong_type_fail_before_submission():
    bad_key = run_launcher(["conf=gta2city", "cluster.partiton=gpu"], timeout=120)
    assert bad_key.returncode == 2 and "cluster.partiton" in last_error(bad_key)
    bad_type = run_launcher(["conf=gta2city", "nodes=four"], timeout=120)
    assert bad_type.returncode == 2 and "nodes" in last_error(bad_type)
    zero = run_launcher(["conf=gta2city", "nodes=0"], timeout=120)
    assert zero.returncode == 2 and last_error(zero) == "error: nodes=0 must be >= 1"


def test_missing_shards_and_weights_are_all_named(tmp_path):
    """A real launch refuses, naming every missing manifest (with the command that packs it) and
    the weights file, and writes nothing; a dry run plans anyway and lists them as what the run
    will need."""
    argv = ["conf=gta2city", "nodes=4", f"data.shards_root={tmp_path}", f"model.pretrained={tmp_path}/resnet101.pth"]
    real = run_launcher([*argv, f"run_dir={tmp_path / 'run'}"], timeout=120)
    dry = run_launcher([*argv, f"run_dir={tmp_path / 'run'}", "dry_run=true"], timeout=120)
    assert real.returncode == 2
    err = last_error(real)
    for layout, split in (("gta5", "train"), ("cityscapes", "train"), ("cityscapes", "val")):
        folder = tmp_path / f"{layout}_{split}"
        need = (
            f"missing shard manifest {folder}/manifest.json (pack it with python -m sdca_dist.shard "
            f"--layout {layout} --root data/{layout} --split {split} --out {folder})"
        )
        assert need in err, err
        assert f"[launch] the run will need: {need}\n" in dry.stdout, dry.stdout
    weights = f"missing pretrained weights model.pretrained={tmp_path}/resnet101.pth"
    assert weights in err and f"[launch] the run will need: {weights}" in dry.stdout
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert list(dry_run_plan(dry.stdout)) == ["src", "dist_init", "sdca", "pseudo_label", "ssl"]
    assert "[launch] 4 input(s) missing: a real launch refuses until they exist" in dry.stdout
    assert not (tmp_path / "run").exists()


def test_the_readme_plan_works_on_a_fresh_clone(tmp_path):
    """The README's first cluster command, run where a fresh clone has no shards yet."""
    command = "launch/slurm.py conf=gta2city nodes=4 dry_run=true"
    assert f".venv/bin/python {command}" in (REPO / "README.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(REPO / command.split()[0]), *command.split()[1:]],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = dry_run_plan(proc.stdout)
    assert list(plan) == ["src", "dist_init", "sdca", "pseudo_label", "ssl"]
    assert plan["dist_init"]["sbatch"]["nodes"] == 4
    assert "[launch] the run will need: missing shard manifest shards/gta5_train/manifest.json" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_stage_whose_producer_is_not_planned_needs_its_input(tmp_path):
    proc = run_launcher(
        ["conf=synthetic", "cluster=local", "stages=[sdca]", f"run_dir={tmp_path}", "dry_run=true"], timeout=120
    )
    assert proc.returncode == 2
    assert f"stage sdca needs {tmp_path}/src/model_final.pt (from stage src, not planned)" in last_error(proc)


def test_dry_run_prints_each_stage_plan_and_sbatch_parameters(tmp_path):
    shards = fake_shard_sets(tmp_path / "shards")
    proc = run_launcher(
        [
            "conf=gta2city",
            "nodes=1",
            f"data.shards_root={shards}",
            "cluster.partition=gpu",
            f"run_dir={tmp_path / 'run'}",
            "--dry-run",
        ],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"[launch] conf=gta2city with data.shards_root={shards}" in proc.stdout
    rows = dry_run_plan(proc.stdout)
    assert list(rows) == ["src", "dist_init", "sdca", "pseudo_label", "ssl"]
    for row in rows.values():
        assert row["nodes"] == 1 and row["ntasks_per_node"] == 4 and row["world_size"] == 4
        params = row["sbatch"]
        assert params["nodes"] == 1 and params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4
        assert params["partition"] == "gpu" and params["signal_delay_s"] == 120
        assert params["srun_args"] == ["--kill-on-bad-exit=1"]  # a dead rank ends the step
    assert (rows["src"]["global_batch"], rows["src"]["lr"], rows["src"]["iters"]) == (8, 5e-4, 20000)
    assert (rows["sdca"]["global_batch"], rows["sdca"]["global_target_batch"]) == (4, 4)
    assert not (tmp_path / "run").exists(), "a dry run wrote into the run folder"
