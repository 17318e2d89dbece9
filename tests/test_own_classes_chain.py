"""A user's own data end to end: folders with a 5-class classes file, an unlabelled target, the whole
chain on CPU through the launcher, and the summary's table and pictures read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engine_fixtures import run_launcher
from layout_trees import FIVE_CLASSES, folder_tree
from PIL import Image

from sdca_dist.classes import load_classes
from sdca_dist.data.packing import PackOptions, pack

NAMES = ["road", "sidewalk", "building", "nature", "vehicle"]


def _own_data(base):
    classes = base / "classes.yaml"
    classes.write_text(FIVE_CLASSES)
    raw = base / "raw"
    folder_tree(raw, "source", 16, seed=1, size=(48, 96))
    folder_tree(raw, "target", 8, seed=2, size=(48, 96), labelled=False)
    folder_tree(raw, "val", 6, seed=3, size=(48, 96))
    shards = base / "shards"
    for split, name in (("source", "source_train"), ("target", "target_train"), ("val", "target_val")):
        pack(
            PackOptions(
                layout="folder", root=raw, out=shards / name, split=split, classes=classes, workers=1, progress=False
            )
        )
    return classes, shards


def own_overrides(classes, shards, run) -> list[str]:
    return [
        "conf=folder",
        "model=small",
        "cluster=local",
        f"data.shards_root={shards}",
        f"data.classes={classes}",
        f"run_dir={run}",
        "train.iters=2",
        "train.log_every=1",
        "train.image_every=2",
        "train.eval_batch_size=4",
        "data.source_resize=[48,96]",
        "data.target_resize=[48,96]",
        "data.eval_resize=[48,96]",
        "data.ssl_scale=[1.0,1.0]",
        "data.ssl_crop=[32,64]",
        "data.num_threads=1",
        "src.batch_size=4",
        "sdca.batch_size=2",
        "sdca.target_batch_size=2",
        "ssl.batch_size=4",
        "ssl.init=sdca",
    ]


@pytest.fixture(scope="module")
def own_chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("own_classes")
    classes, shards = _own_data(base)
    run = base / "run"
    proc = run_launcher(own_overrides(classes, shards, run))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return classes, shards, run, proc


def test_five_classes_through_the_whole_chain(own_chain):
    classes, shards, run, proc = own_chain
    line = (
        "[launch] data: source source_train -> target target_train (unlabelled); scored on target_val "
        f"(labelled); classes from {classes}"
    )
    assert line in proc.stdout
    for stage in ("src", "sdca", "ssl"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert list(metrics["per_class"]) == NAMES, stage
        assert metrics["scored_on"] == "target_val" and "mIoU13" not in metrics
        assert metrics["table"].splitlines()[1].startswith("road ")
    head = torch.load(run / "ssl" / "model_final.pt", map_location="cpu", weights_only=True)
    out_channels = {k: v.shape[0] for k, v in head.items() if k.endswith("weight") and v.dim() == 4}
    assert min(out_channels.values()) == 5  # the classifier has one output per class of the file
    quality = json.loads((run / "pseudo_label" / "pseudo_label_quality.json").read_text())
    assert quality["pseudo_label_mIoU_vs_gt"] is None  # no ground truth behind an unlabelled target
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scored_on"] == "target_val"
    assert list(summary["stages"]["ssl"]["per_class_mean"]) == NAMES
    assert line[len("[launch] ") :] in (run / "summary.md").read_text().splitlines()


def test_summary_pictures_read_back(own_chain):
    classes, _, run, _ = own_chain
    iou = Image.open(run / "summary_iou.png")
    assert iou.format == "PNG" and iou.size[0] > 300 and iou.size[1] > 200
    panel = np.asarray(Image.open(run / "summary_examples.png").convert("RGB"))
    stages = [s for s in ("src", "sdca", "ssl") if (run / s / "val_examples").is_dir()]
    assert stages == ["src", "sdca", "ssl"]
    example = np.asarray(Image.open(run / "src" / "val_examples" / "00_label.png"))
    h, w = example.shape
    assert panel.shape[1] == (2 + len(stages)) * (w + 2)
    palette = {tuple(c) for c in load_classes(classes).palette().tolist()} | {(0, 0, 0)}
    head = 16
    truth = panel[head : head + h, w + 2 : 2 * w + 2].reshape(-1, 3)
    assert {tuple(c) for c in truth.tolist()} <= palette  # ground truth in the file's colours
    want = load_classes(classes).palette()[example[example < 255]]
    got = panel[head : head + h, w + 2 : 2 * w + 2][example < 255]
    assert np.array_equal(got, want)
    for k in range(len(stages)):
        tile = panel[head : head + h, (2 + k) * (w + 2) : (2 + k) * (w + 2) + w].reshape(-1, 3)
        assert {tuple(c) for c in tile.tolist()} <= palette
