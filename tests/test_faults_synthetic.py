"""The embedded benchmark is keyed by its generator settings: a shards root that holds one set
never serves it for other settings (count, seed, sizes, gap); those get their own folder."""

from __future__ import annotations

import json
from pathlib import Path

from sdca_dist.config import compose_config
from sdca_dist.data.sets import SYNTHETIC_RECORD, ensure_synthetic_shards, manifest_path, shard_set


def _cfg(root: Path, *extra: str):
    return compose_config(
        [
            "conf=synthetic",
            f"data.shards_root={root}",
            "data.synthetic_counts=[4,4,2]",
            "data.synthetic_source_size=[36,72]",
            "data.synthetic_target_size=[32,64]",
            *extra,
        ]
    )


def _count(cfg, name: str = "gta5_train") -> int:
    return json.loads(manifest_path(shard_set(cfg, name)).read_text())["num_samples"]


def _first_image(cfg) -> str:
    m = json.loads(manifest_path(shard_set(cfg, "gta5_train")).read_text())
    return m["shards"][0]["sha256"]


def test_other_generator_settings_never_reuse_the_generated_sets(tmp_path):
    base = _cfg(tmp_path)
    ensure_synthetic_shards(base, log=lambda m: None)
    assert shard_set(base, "gta5_train") == tmp_path / "gta5_train"  # the first settings keep the plain layout
    assert json.loads((tmp_path / SYNTHETIC_RECORD).read_text())["counts"] == [4, 4, 2]
    assert _count(base) == 4

    fewer = _cfg(tmp_path, "data.synthetic_counts=[3,3,2]")
    ensure_synthetic_shards(fewer, log=lambda m: None)
    assert shard_set(fewer, "gta5_train").parent != tmp_path
    assert _count(fewer) == 3 and _count(fewer, "cityscapes_train") == 3

    seeded = _cfg(tmp_path, "data.synthetic_seed=1")
    ensure_synthetic_shards(seeded, log=lambda m: None)
    assert _count(seeded) == 4 and _first_image(seeded) != _first_image(base)

    assert shard_set(base, "gta5_train") == tmp_path / "gta5_train" and _count(base) == 4


def test_a_root_without_a_generator_record_is_not_reused(tmp_path):
    base = _cfg(tmp_path)
    ensure_synthetic_shards(base, log=lambda m: None)
    (tmp_path / SYNTHETIC_RECORD).unlink()  # sets generated without a record: their settings are unknown
    other = _cfg(tmp_path, "data.synthetic_counts=[3,3,2]")
    ensure_synthetic_shards(other, log=lambda m: None)
    assert _count(other) == 3
