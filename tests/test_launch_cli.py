"""launch/slurm.py before anything is submitted: config mistakes, missing inputs, dry runs.

These never reach a cluster: every one must fail (or print) before sbatch would be called.
"""

from __future__ import annotations

from engine_fixtures import dry_run_plan, fake_shard_sets, last_error, run_launcher


def test_unknown_preset_lists_the_valid_choices():
    proc = run_launcher(["conf=gta2cty", "nodes=4"], timeout=120)
    assert proc.returncode == 2
    assert last_error(proc) == (
        "error: unknown conf='gta2cty'; valid choices: city2acdc, city2darkzurich, folder, gta2city, synthetic, "
        "synthia2city"
    )


def test_unknown_key_and_wrong_type_fail_before_submission():
    bad_key = run_launcher(["conf=gta2city", "cluster.partiton=gpu"], timeout=120)
    assert bad_key.returncode == 2 and "cluster.partiton" in last_error(bad_key)
    bad_type = run_launcher(["conf=gta2city", "nodes=four"], timeout=120)
    assert bad_type.returncode == 2 and "nodes" in last_error(bad_type)
    zero = run_launcher(["conf=gta2city", "nodes=0"], timeout=120)
    assert zero.returncode == 2 and last_error(zero) == "error: nodes=0 must be >= 1"


def test_missing_shards_and_weights_are_all_named(tmp_path):
    proc = run_launcher(
        [
            "conf=gta2city",
            "nodes=4",
            f"data.shards_root={tmp_path}",
            f"model.pretrained={tmp_path}/resnet101.pth",
            "dry_run=true",
        ],
        timeout=120,
    )
    assert proc.returncode == 2
    err = last_error(proc)
    for name in ("gta5_train", "cityscapes_train", "cityscapes_val"):
        assert f"{tmp_path}/{name}/manifest.json" in err
    assert f"model.pretrained={tmp_path}/resnet101.pth" in err


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
