"""Stage keys: a stage's key covers what it reads, and only that (no training here).

Specifications:
* every setting a stage declares it reads exists in the configuration (a misspelt entry would
  hash "(absent)" for every run: a silently wrong reuse) and changing it changes the key;
* ``method.tau`` (read by sdca) leaves the keys of src and dist_init unchanged, and the later
  stages' recipe keys change through their inputs;
* the stage key also changes with the inputs' hashes, the world size and the device type;
* ``Lineage.fresh`` compares the settings a stage reads: a src DONE stays fresh when only
  ``method.tau`` differs, an sdca DONE does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from sdca_dist.config import compose_config
from sdca_dist.config.run_config import with_values
from sdca_dist.lineage import Lineage
from sdca_dist.stage_keys import (
    COMMON_READS,
    code_version,
    reads_of,
    recipe_keys,
    settings_key,
    stage_key,
    stage_settings,
)
from sdca_dist.stage_table import STAGE_NAMES, TABLE


@pytest.fixture(scope="module")
def cfg():
    return compose_config(["conf=synthetic"])


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    if isinstance(value, str):
        return value + "_x"
    if value is None:
        return "/elsewhere/weights.pt"
    if isinstance(value, dict):
        return {**value, "gap": 0.5}
    raise AssertionError(f"no change rule for {value!r}")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_declared_setting_exists_and_changes_the_key(cfg, stage):
    settings = stage_settings(cfg, stage)
    absent = [k for k, v in settings.items() if v == "(absent)"]
    assert not absent, f"{stage} declares settings the configuration does not have: {absent}"
    base = settings_key(cfg, stage)
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in reads_of(stage):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig) and len(value):  # a section: change one of its leaves
            leaf = next(k for k, v in value.items() if not OmegaConf.is_config(v))
            key, value = f"{key}.{leaf}", OmegaConf.select(cfg, f"{key}.{leaf}")
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        other = OmegaConf.create(data)
        OmegaConf.update(other, key, _changed(value), merge=False)
        assert settings_key(other, stage) != base, f"{stage}: changing {key} left its key unchanged"


def test_an_sdca_setting_leaves_the_upstream_keys_alone(cfg):
    tau = with_values(cfg, method__tau=10.0)
    for stage in ("src", "dist_init", "oracle"):
        assert settings_key(tau, stage) == settings_key(cfg, stage), stage
    for stage in ("sdca", "sdca_no_align"):
        assert settings_key(tau, stage) != settings_key(cfg, stage), stage
    for stage in ("pseudo_label", "ssl"):  # they do not read tau: their inputs change with it
        assert settings_key(tau, stage) == settings_key(cfg, stage), stage
    later = ["src", "dist_init", "sdca", "pseudo_label", "ssl"]
    plan, plan_tau = recipe_keys(cfg, later, {}), recipe_keys(tau, later, {})
    assert plan["src"] == plan_tau["src"] and plan["dist_init"] == plan_tau["dist_init"]
    assert all(plan[s] != plan_tau[s] for s in ("sdca", "pseudo_label", "ssl"))
    # a src setting changes every stage after src through the inputs
    lr = recipe_keys(with_values(cfg, src__lr=0.02), ["src", "dist_init", "sdca"], {})
    assert all(lr[s] != plan[s] for s in ("src", "dist_init", "sdca"))


def test_the_seed_the_training_section_and_the_generator_are_read_by_every_stage(cfg):
    for key in ("seed", "train", "model", "engine", "data.synthetic_seed", "data.synthetic_counts"):
        assert key in COMMON_READS
    for stage in STAGE_NAMES:
        assert settings_key(with_values(cfg, seed=1), stage) != settings_key(cfg, stage)


def test_the_stage_key_covers_inputs_world_size_device_and_code(cfg):
    inputs = {"src/model_final.pt": "a" * 64, "shards:source": "b" * 64}
    key = stage_key(cfg, "dist_init", inputs, world_size=1, device="cpu")
    assert key == stage_key(cfg, "dist_init", dict(inputs), world_size=1, device="cpu")
    assert key != stage_key(cfg, "dist_init", {**inputs, "src/model_final.pt": "c" * 64}, world_size=1, device="cpu")
    assert key != stage_key(cfg, "dist_init", inputs, world_size=2, device="cpu")
    assert key != stage_key(cfg, "dist_init", inputs, world_size=1, device="cuda:0")
    assert key != stage_key(cfg, "sdca", inputs, world_size=1, device="cpu")
    assert "sdca_dist 0.1.0 src " in code_version() and "torch " in code_version()


def test_every_stage_of_the_table_declares_its_schedule_section(cfg):
    for s in TABLE:
        if s.schedule is not None:
            assert s.schedule in reads_of(s.name), f"{s.name} does not read its schedule {s.schedule}"


def test_fresh_compares_the_settings_the_stage_reads(cfg, tmp_path):
    """A src DONE made under tau=100 is fresh for tau=10; an sdca DONE is not."""
    from sdca_dist.data.sets import SYNTHETIC_RECORD, generator_settings
    from sdca_dist.data.shard_set import write_manifest

    shards = tmp_path / "shards"
    for name in ("gta5_train", "cityscapes_train", "cityscapes_val"):
        (shards / name).mkdir(parents=True)
        write_manifest(shards / name, [], 19)  # empty shard sets: only their records are hashed
    base = with_values(cfg, data__shards_root=str(shards))
    # the synthetic benchmark's generator record: these sets belong to the preset's settings
    (shards / SYNTHETIC_RECORD).write_text(json.dumps(generator_settings(base)))
    run = Lineage(tmp_path / "run")
    for stage in ("src", "dist_init", "sdca"):
        folder = run.folder(stage)
        folder.mkdir(parents=True)
        out = folder / ("distributions.pt" if stage == "dist_init" else "model_final.pt")
        out.write_bytes(stage.encode())
        record = run.current(base, stage)
        run.finish(stage, record, {})
    tau = with_values(base, method__tau=10.0)
    assert run.fresh(base, "src") == (True, "done") and run.fresh(base, "sdca") == (True, "done")
    assert run.fresh(tau, "src") == (True, "done")
    assert run.fresh(tau, "dist_init") == (True, "done")
    assert run.fresh(tau, "sdca") == (False, "done with other settings")
    assert run.fresh(with_values(base, src__lr=0.5), "src") == (False, "done with other settings")
    done = json.loads((Path(run.folder("sdca")) / "DONE").read_text())
    assert done["lineage"]["stage_settings"] == settings_key(base, "sdca")
