"""Scale-out: per-stage job shapes, the scaled recipe and the refusals.

``conf=gta2city nodes=4`` must not plan 16 ranks for every stage (the src job would die after its
queue wait: "src.batch_size=8 does not split evenly over 16 ranks"). Each stage
gets the shape its global batch allows, ``train.scale`` makes every rank useful, and every plan
that cannot run is refused before anything is written or queued, naming the fix.
"""

from __future__ import annotations

import pytest
from engine_fixtures import dry_run_plan, fake_shard_sets, run_launcher, run_train, tiny

from sdca_dist.config import compose_config
from sdca_dist.config.run_config import with_values
from sdca_dist.engine.schedule import poly_lr
from sdca_dist.rank_scaling import JobShape, ScaleError, check_world, job_shape, resolve_scale, scaled_schedule


def _gta(**values):
    cfg = compose_config(["conf=gta2city"])
    return with_values(cfg, **values) if values else cfg


def test_gta2city_on_4_nodes_of_4_gpus_plans_each_stage_its_own_shape():
    cfg = _gta()
    shapes = {s: job_shape(cfg, s, 4, 4, 1) for s in ("src", "dist_init", "sdca", "pseudo_label", "ssl", "eval")}
    assert shapes == {
        "src": JobShape(2, 4),
        "dist_init": JobShape(4, 4),
        "sdca": JobShape(1, 4),
        "pseudo_label": JobShape(4, 4),
        "ssl": JobShape(2, 4),
        "eval": JobShape(4, 4),
    }
    # part of one node when the batch is smaller than a node
    assert job_shape(_gta(), "sdca", 1, 8, 1) == JobShape(1, 4)
    assert job_shape(with_values(cfg, sdca__batch_size=2, sdca__target_batch_size=2), "sdca", 4, 4, 1) == JobShape(1, 2)


def test_scale_auto_is_the_smallest_k_that_uses_every_rank():
    cfg = _gta()
    assert resolve_scale(with_values(cfg, train__scale="auto"), 16) == 4
    assert resolve_scale(with_values(cfg, train__scale="auto"), 8) == 2
    assert resolve_scale(with_values(cfg, train__scale="auto"), 4) == 1
    assert resolve_scale(with_values(cfg, train__scale="auto"), 12) == 3
    k4 = with_values(cfg, train__scale=4)
    assert all(job_shape(k4, s, 4, 4, 4).world_size == 16 for s in ("src", "sdca", "ssl"))


def test_scaled_recipe_is_the_linear_scaling_rule_with_warmup():
    base = scaled_schedule(_gta(), "src")
    k4 = scaled_schedule(_gta(train__scale=4), "src")
    assert (base.global_batch, base.lr, base.iters, base.schedule_iters, base.warmup_iters) == (
        8,
        5e-4,
        20000,
        31250,
        0,
    )
    assert (k4.global_batch, k4.lr, k4.iters, k4.schedule_iters) == (32, 2e-3, 5000, 7813)
    assert (k4.checkpoint_every, k4.log_every, k4.image_every) == (500, 13, 250)
    assert k4.warmup_iters == 2500  # the first half of the scaled stage (benchmarks/: measured)
    assert k4.global_batch * k4.iters == base.global_batch * base.iters  # equal images seen
    sd = scaled_schedule(_gta(train__scale=2), "sdca")
    assert (sd.global_batch, sd.global_target_batch, sd.iters) == (8, 8, 20000)
    assert scaled_schedule(_gta(train__scale=2, train__warmup_iters=0), "src").warmup_iters == 0
    # warm-up: linear ramp to the poly value, then the poly value itself
    assert poly_lr(1.0, 0, 100, 0.9, warmup_iters=10) == pytest.approx(0.1)
    assert poly_lr(1.0, 9, 100, 0.9, warmup_iters=10) == pytest.approx(poly_lr(1.0, 9, 100, 0.9))
    assert poly_lr(1.0, 50, 100, 0.9, warmup_iters=10) == poly_lr(1.0, 50, 100, 0.9)


def test_default_warmup_is_half_the_scaled_stage_and_none_at_k1():
    """On the synthetic benchmark (K = 4, src, seed 0) a 5% warm-up scored 16.33 mIoU, none 18.00,
    25% 21.91 and 50% 25.53 (K = 1: 24.27): benchmarks/2026-11-27-scaled-recipe-accuracy.md."""
    syn = compose_config(["conf=synthetic"])
    for stage, k1_iters in (("src", 400), ("sdca", 300), ("ssl", 600)):
        k1 = scaled_schedule(syn, stage)
        assert (k1.iters, k1.warmup_iters) == (k1_iters, 0)  # K = 1: the published recipe, no warm-up
        for k in (2, 4):
            s = scaled_schedule(with_values(syn, train__scale=k), stage)
            assert s.iters == k1_iters // k
            assert s.warmup_iters == round(s.iters / 2)
    # an explicit train.warmup_iters still wins, capped at the stage's length
    assert scaled_schedule(with_values(syn, train__scale=4, train__warmup_iters=5), "src").warmup_iters == 5
    assert scaled_schedule(with_values(syn, train__scale=4, train__warmup_iters=500), "src").warmup_iters == 100
    # K = 1 ignores the rule: the published recipe, bit for bit (an explicit value still applies)
    assert scaled_schedule(with_values(syn, train__warmup_iters=-1), "src").warmup_iters == 0


def test_engine_check_names_the_fix():
    with pytest.raises(ScaleError) as info:
        check_world(_gta(), "src", 16)
    assert str(info.value) == (
        "src.batch_size=8 = global batch 8 does not split evenly over 16 ranks; use train.scale=2 or run it on 8 ranks"
    )
    with pytest.raises(ScaleError) as info:
        check_world(_gta(train__scale=2), "sdca", 16)
    assert (
        "sdca.batch_size=4 x train.scale=2 = global batch 8 does not split evenly over 16 ranks; "
        "use train.scale=4" in str(info.value)
    )
    check_world(_gta(), "dist_init", 16)  # inference stages take any world size


def test_design_card_command_plans_a_runnable_job_per_stage(tmp_path):
    shards = fake_shard_sets(tmp_path / "shards")
    base = ["conf=gta2city", "nodes=4", f"data.shards_root={shards}", f"run_dir={tmp_path / 'run'}", "dry_run=true"]
    proc = run_launcher(base, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = dry_run_plan(proc.stdout)
    assert {s: (r["nodes"], r["ntasks_per_node"], r["world_size"]) for s, r in rows.items()} == {
        "src": (2, 4, 8),
        "dist_init": (4, 4, 16),
        "sdca": (1, 4, 4),
        "pseudo_label": (4, 4, 16),
        "ssl": (2, 4, 8),
    }
    assert rows["sdca"]["global_batch"] == 4 and rows["sdca"]["global_target_batch"] == 4
    assert "train.scale=auto uses them all" in proc.stdout

    scaled = run_launcher(base + ["train.scale=auto"], timeout=120)
    assert scaled.returncode == 0, scaled.stderr
    rows = dry_run_plan(scaled.stdout)
    assert all(r["world_size"] == 16 for r in rows.values())
    assert (rows["src"]["global_batch"], rows["src"]["lr"], rows["src"]["iters"]) == (32, 0.002, 5000)
    assert (rows["sdca"]["global_batch"], rows["sdca"]["global_target_batch"], rows["sdca"]["iters"]) == (16, 16, 10000)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["cluster.tasks_per_node=8"],
            "cluster.tasks_per_node=8 is more than cluster.gpus_per_node=4 (one rank per GPU): "
            "use cluster.tasks_per_node=4",
        ),
        (["cluster.tasks_per_node=0"], "cluster.tasks_per_node=0 must be >= 1"),
        (["nodes=0"], "nodes=0 must be >= 1"),
        (["train.scale=0"], "train.scale=0 must be an integer >= 1 or auto"),
        (["train.scale=2.5"], "train.scale=2.5 must be an integer >= 1 or auto"),
        (["src.batch_size=0"], "src.batch_size=0 must be >= 1"),
    ],
)
def test_plans_that_cannot_run_are_refused_before_anything_is_written(tmp_path, extra, message):
    shards = fake_shard_sets(tmp_path / "shards")
    proc = run_launcher(
        ["conf=gta2city", "nodes=2", f"data.shards_root={shards}", f"run_dir={tmp_path / 'run'}", *extra], timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_torchrun_world_that_the_batch_cannot_split_is_refused(tmp_path):
    """The same check in the engine, for torchrun users (2 real gloo ranks, batch 3)."""
    proc = run_train(
        2, tiny(tmp_path / "shards", "stage=src", f"run_dir={tmp_path / 'run'}", "src.batch_size=3"), timeout=300
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert (
        "error: src.batch_size=3 = global batch 3 does not split evenly over 2 ranks; use train.scale=2 or run "
        "it on 1 rank"
    ) in text
    assert not (tmp_path / "run" / "src" / "checkpoints").exists()
