"""Strict settings: nothing the schema does not know, no value that cannot run.

Each case (a typo that would add a new key, a zero-iteration stage that would be marked DONE with
an untrained model, an empty run_dir that would write into the current folder, an empty stage
list) is one line naming the key, exit 2, before anything is written.
"""

from __future__ import annotations

import pytest
from engine_fixtures import run_launcher, run_train

from sdca_dist.config import ConfigError, compose_config
from sdca_dist.config.run_config import parse_launch


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+train.itres=20",
            "+train.itres: adding or deleting settings is only allowed under cluster.extra.*, "
            "data.synthetic_gap.*; settings are fixed by the schema",
        ),
        ("+foo=1", "+foo: adding or deleting settings is only allowed under"),
        ("~train.iters", "not of the form key=value"),
        ("~train.iters=3", "~train.iters: adding or deleting settings"),
        ("foo=1", "unknown setting 'foo'"),
        ("train.itres=20", "unknown setting 'train.itres' (did you mean train.iters?)"),
        ("train.iters=0", "train.iters=0 must be >= 1"),
        ("train.iters=-5", "train.iters=-5 must be >= 1"),
        ("src.iters=0", "src.iters=0 must be >= 1"),
        ("sdca.schedule_iters=10", "sdca.schedule_iters=10 must be >= sdca.iters=300"),
        ("src.lr=0", "src.lr=0.0 must be > 0"),
        ("ssl.batch_size=0", "ssl.batch_size=0 must be >= 1"),
        ("sdca.target_batch_size=0", "sdca.target_batch_size=0 must be >= 1"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("run_dir=", "run_dir is empty"),
        ("method.delta=1.5", "method.delta=1.5 must be in (0, 1)"),
        ("method.tau=0", "method.tau=0.0 must be > 0"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
        ("train.scale=0", "train.scale=0 must be an integer >= 1 or auto"),
        ("train.scale=1.5", "train.scale=1.5 must be an integer >= 1 or auto"),
        ("train.scale=big", "train.scale='big' must be an integer >= 1 or auto"),
        ("cluster.tasks_per_node=0", "cluster.tasks_per_node=0 must be >= 1"),
        ("data.ssl_scale=[1.5,0.5]", "data.ssl_scale=[1.5, 0.5] must be [low, high]"),
        ("eval.model_from=dist_init", "eval.model_from='dist_init': a stage with a model"),
        ("run_dir=/tmp/x/engine=ddp_y", "invalid configuration: "),
    ],
)
def test_bad_setting_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        compose_config(["conf=synthetic", override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_free_form_groups_still_take_new_keys():
    cfg = compose_config(["conf=synthetic", "+cluster.extra.reservation=r1", "+data.synthetic_gap.noise=0.1"])
    assert cfg.cluster.extra.reservation == "r1" and cfg.data.synthetic_gap.noise == 0.1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[]"], "stages=[] names no stage"),
        (["stages=[src,bogus]"], "unknown stage(s) ['bogus'] in stages="),
        (["redo=[srcc]"], "unknown stage(s) ['srcc'] in redo="),
        (["nodes=0"], "nodes=0 must be >= 1"),
        (["seeds=0"], "seeds=0 must be >= 1"),
        (["nodes=four"], "nodes"),
    ],
)
def test_bad_launcher_setting_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        parse_launch(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_bad_settings_before_writing_anything(tmp_path):
    run = tmp_path / "run"
    for argv in (
        ["conf=synthetic", "stage=src", f"run_dir={run}", "train.iters=0"],
        ["conf=synthetic", "stage=src", f"run_dir={run}", "+train.itres=20"],
        ["conf=synthetic", "stage=src", "run_dir="],
    ):
        proc = run_train(1, argv, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not run.exists()
    launched = run_launcher(["conf=synthetic", "cluster=local", f"run_dir={run}", "stages=[]"], timeout=120)
    assert launched.returncode == 2 and "stages=[] names no stage" in launched.stderr
    assert not run.exists()
