"""Fixtures for data-path tests: a tiny synthetic benchmark and its shards (made once per session)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdca_dist.classes import colorize
from sdca_dist.data.packing import PackOptions, pack
from sdca_dist.data.shard_set import ShardWriter, write_manifest
from sdca_dist.synth import SynthConfig, generate

TINY = SynthConfig(
    seed=3, num_source=14, num_target_train=6, num_target_val=11, source_size=(48, 30), target_size=(48, 24)
)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, TINY)
    return root


@pytest.fixture(scope="session")
def shard_sets(synth_root, tmp_path_factory) -> dict[str, Path]:
    """manifest paths: gta5 (several shards), synthia, cityscapes val."""
    out = tmp_path_factory.mktemp("shards")
    sets = {
        "gta5": ("gta5", "train", 12_000),
        "synthia": ("synthia", "train", 1 << 30),
        "cityscapes_val": ("cityscapes", "val", 8_000),
    }
    res = {}
    for name, (layout, split, size) in sets.items():
        m = pack(
            PackOptions(
                layout=layout,
                root=synth_root / layout,
                out=out / name,
                split=split,
                shard_size=size,
                workers=1,
                progress=False,
            )
        )
        res[name] = m.path
    return res


def write_colour_set(
    out: Path, n: int, size_hw: tuple[int, int], seed: int = 0, shard_size: int = 20_000, cell: int = 16
) -> Path:
    """Lossless shards whose image is the label coloured with the class palette (alignment checks)."""
    rng = np.random.default_rng(seed)
    h, w = size_hw
    w_ = ShardWriter(out, prefix="part", shard_size=shard_size, num_classes=19)
    for i in range(n):
        # blocky labels (cell x cell) incl. ignore cells, so edges are few and flips/crops are visible
        cells = rng.integers(0, 20, size=(h // cell + 1, w // cell + 1)).astype(np.uint8)
        cells[cells == 19] = 255
        label = np.kron(cells, np.ones((cell, cell), np.uint8))[:h, :w]
        buf = io.BytesIO()
        Image.fromarray(colorize(label)).save(buf, format="PNG")
        w_.add(f"s{i:04d}", buf.getvalue(), "img.png", label, {"path": f"s{i:04d}.png"})
    return write_manifest(out, w_.close(), 19).path
