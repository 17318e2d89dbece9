"""The benchmark presets (city2acdc, city2darkzurich) and the example folder preset: composed with
the published protocol's sizes, planned on nodes=4, and an unlabelled target refused where labels
are needed; the grid's picture of paired differences read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_fixtures import dry_run_plan, last_error, run_launcher
from PIL import Image

from sdca_dist.config import compose_config

SETS = {
    "city2acdc": {"cityscapes_train": True, "acdc_train": True, "acdc_val": True},
    "city2darkzurich": {"cityscapes_train": True, "dark_zurich_train_night": False, "dark_zurich_val": True},
    "folder": {"source_train": True, "target_train": False, "target_val": True},
}


def _manifests(root, sets: dict[str, bool]):
    for name, labelled in sets.items():
        (root / name).mkdir(parents=True)
        info = {} if labelled else {"info": {"labelled": False}}
        (root / name / "manifest.json").write_text(json.dumps(info))
    return root


def test_benchmark_presets_follow_the_published_protocol():
    for conf, target, val in (
        ("city2acdc", "acdc_train", "acdc_val"),
        ("city2darkzurich", "dark_zurich_train_night", "dark_zurich_val"),
    ):
        cfg = compose_config([f"conf={conf}"])
        d = cfg.data
        assert (d.source, d.target_train, d.target_val) == ("cityscapes_train", target, val)
        assert list(d.source_resize) == [512, 1024]  # Cityscapes at 1024x512
        assert list(d.target_resize) == list(d.eval_resize) == [540, 960]  # 1920x1080 halved
        assert list(d.ssl_crop) == [512, 512] and d.num_classes == 19 and d.classes is None
    folder = compose_config(["conf=folder"])
    assert folder.data.num_classes == 5 and folder.data.classes.endswith("examples/folder/classes.yaml")


@pytest.mark.parametrize("conf", sorted(SETS))
def test_presets_plan_on_four_nodes(tmp_path, conf):
    shards = _manifests(tmp_path / "shards", SETS[conf])
    base = [f"conf={conf}", "nodes=4", f"data.shards_root={shards}", f"run_dir={tmp_path / 'run'}", "dry_run=true"]
    proc = run_launcher(base, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = dry_run_plan(proc.stdout)
    assert set(rows) == {"src", "dist_init", "sdca", "pseudo_label", "ssl"}
    assert all(r["nodes"] <= 4 for r in rows.values()) and rows["dist_init"]["world_size"] == 16
    target = [n for n in SETS[conf] if n.startswith(("acdc_t", "dark_zurich_t", "target_t"))][0]
    state = "labelled" if SETS[conf][target] else "unlabelled"
    assert f"-> target {target} ({state}); scored on " in proc.stdout
    assert not (tmp_path / "run").exists()


def test_an_unlabelled_target_refuses_the_oracle_and_an_unlabelled_val(tmp_path):
    shards = _manifests(tmp_path / "shards", SETS["city2darkzurich"])
    base = ["conf=city2darkzurich", "nodes=4", f"data.shards_root={shards}", f"run_dir={tmp_path / 'r'}"]
    base.append("dry_run=true")
    proc = run_launcher(base + ["with_oracle=true"], timeout=120)
    assert proc.returncode == 2
    assert last_error(proc) == (
        f"error: data.target_train=dark_zurich_train_night: {shards / 'dark_zurich_train_night'} was packed from "
        "an unlabelled split and oracle trains on its labels (leave with_oracle off); name a labelled "
        "shard set (docs/datasets.md, 'Targets without labels')"
    )
    proc = run_launcher(base + ["data.target_val=dark_zurich_train_night"], timeout=120)
    assert proc.returncode == 2 and "every stage is scored on it" in last_error(proc)
    # the stage table says which stages train on which set's labels: an unlabelled source is refused too
    proc = run_launcher(base + ["data.source=dark_zurich_train_night"], timeout=120)
    assert proc.returncode == 2 and "data.source=dark_zurich_train_night" in last_error(proc)
    assert "src trains on its labels;" in last_error(proc)


def test_grid_figure_draws_every_paired_difference(tmp_path):
    from sdca_dist.launch.figures import GRID_FIGURE, grid_figure

    assert grid_figure(tmp_path) is None  # no summary: no picture
    diffs = {
        "sdca": {
            "method.tau=10": {"per_seed": {"0": 1.0, "1": 2.0}, "n": 2, "mean": 1.5, "std": 0.7, "ci95": [-4.9, 7.9]},
            "method.tau=1": {"per_seed": {"0": -1.0}, "n": 1, "mean": -1.0, "std": 0.0, "ci95": [None, None]},
        }
    }
    (tmp_path / "summary.json").write_text(json.dumps({"baseline": "method.tau=100", "paired_differences": diffs}))
    path = grid_figure(tmp_path)
    assert path == tmp_path / GRID_FIGURE
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 300
    blue = np.array([31, 119, 180])  # matplotlib's tab:blue: the means and intervals
    assert (np.abs(image.astype(int) - blue).sum(-1) < 30).sum() > 50
