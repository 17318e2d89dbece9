"""Data sets whose images differ in size (GTA5 has some; custom sets often do).

Evaluation-mode batches resize every image to one size but keep each label at its own size,
padded with 255 to the largest in the batch. Resizing the predictions to the PADDED batch size in
evaluation, pseudo_label or dist_init would stretch a smaller image's prediction over the padding,
score or write it against misaligned labels, write its pseudo label at the padded size, and make
the results depend on which images share a batch. Every prediction is resized to its own label's
size (``own_size_rows``): batch size 3 and batch size 1 give the same mIoU, distributions and
pseudo labels.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import run_launcher, tiny
from PIL import Image

from sdca_dist.data.loader import own_size_rows
from sdca_dist.data.webdataset_reader import iter_samples
from sdca_dist.shard import shard_command
from sdca_dist.synth import synth_command

SMALL_WH = (96, 48)  # every second image and its label; the others stay 128x64 (source 144x72)


def _shrink(image: Path, label: Path) -> None:
    Image.open(image).convert("RGB").resize(SMALL_WH, Image.BICUBIC).save(image)
    Image.open(label).resize(SMALL_WH, Image.NEAREST).save(label)


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    raw = root / "raw"
    subprocess.run(synth_command(raw, (12, 12, 9), (144, 72), (128, 64), seed=5), check=True, capture_output=True)
    for n, image in enumerate(sorted((raw / "gta5" / "images").glob("*.png"))):
        if n % 2:
            _shrink(image, raw / "gta5" / "labels" / image.name)
    for split in ("train", "val"):
        images = sorted((raw / "cityscapes" / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        for n, image in enumerate(images):
            if n % 2:
                city = image.parent.name
                stem = image.name.replace("_leftImg8bit.png", "")
                _shrink(image, raw / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    shards = root / "shards"
    for layout, split, name in (
        ("gta5", "train", "gta5_train"),
        ("cityscapes", "train", "cityscapes_train"),
        ("cityscapes", "val", "cityscapes_val"),
    ):
        subprocess.run(shard_command(layout, raw / layout, split, shards / name), check=True, capture_output=True)
    return shards


def test_own_size_rows_is_the_whole_batch_when_uniform_else_one_row_each():
    label = torch.full((3, 4, 6), 255)
    uniform = list(own_size_rows(label, torch.tensor([[4, 6]] * 3)))
    assert len(uniform) == 1 and uniform[0][0] == slice(0, 3) and uniform[0][1] is label
    mixed = list(own_size_rows(label, torch.tensor([[4, 6], [2, 3], [4, 5]])))
    assert [rows for rows, _ in mixed] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert [tuple(own.shape) for _, own in mixed] == [(1, 4, 6), (1, 2, 3), (1, 4, 5)]


def _chain(shards: Path, run_dir: Path, eval_batch: int) -> Path:
    proc = run_launcher(
        tiny(
            shards,
            "data.synthetic=false",
            "cluster=local",
            "wait=true",
            f"run_dir={run_dir}",
            "stages=[src,dist_init,sdca,pseudo_label]",
            "train.iters=2",
            f"train.eval_batch_size={eval_batch}",
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.mark.timeout(900)
def test_batches_of_mixed_sizes_give_what_one_image_at_a_time_gives(mixed_shards: Path, tmp_path: Path):
    batched = _chain(mixed_shards, tmp_path / "batch3", 3)
    single = _chain(mixed_shards, tmp_path / "batch1", 1)

    # evaluation (src's final val score): the same whatever images share a batch
    a = json.loads((batched / "src" / "metrics.json").read_text())
    b = json.loads((single / "src" / "metrics.json").read_text())
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-9) and a["per_class"] == pytest.approx(b["per_class"])

    # dist_init: each label resized to the features from its own size (the per-class pixel counts
    # are exact; the stretched labels of a padded batch counted other pixels)
    da = torch.load(batched / "dist_init" / "distributions.pt", weights_only=True)
    db = torch.load(single / "dist_init" / "distributions.pt", weights_only=True)
    for level in ("feat", "out"):
        assert torch.equal(da[level]["count"], db[level]["count"]), level
        # float32 convolutions round differently for another batch size: features agree to ~1e-7
        torch.testing.assert_close(da[level]["mean"], db[level]["mean"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(da[level]["var"], db[level]["var"], rtol=1e-4, atol=1e-5)

    # pseudo labels: written at each image's own size, identical for both batch sizes
    manifests = [r / "pseudo_label" / "shards" / "manifest.json" for r in (batched, single)]
    labels = []
    for manifest in manifests:
        found = {}
        for sample in iter_samples(manifest):
            image_size = _png_size(sample.image)
            assert _png_size(sample.label) == image_size, sample.key
            found[sample.key] = np.asarray(Image.open(io.BytesIO(sample.label)))
        labels.append(found)
    assert labels[0].keys() == labels[1].keys() and len(labels[0]) == 12
    assert {v.shape for v in labels[0].values()} == {(64, 128), (48, 96)}
    for key in labels[0]:
        assert np.array_equal(labels[0][key], labels[1][key]), key
