"""Fixtures for the predict tests: a generated Cityscapes-layout val set with its shards and random
weights (``valset``, once per session), and the CLI runner."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from engine_fixtures import REPO, child_env

from sdca_dist.shard import shard_command
from sdca_dist.synth import synth_command

# ssl_crop follows eval_resize: the ssl zoom of the preset starts at the test scale, which must cover the crop
OVERRIDES = [
    "conf=synthetic",
    "model=small",
    "data.eval_resize=[48,96]",
    "data.ssl_crop=[48,96]",
    "train.eval_batch_size=2",
]


def run_predict(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    """``python -m sdca_dist.predict ARGS`` (under torchrun with ``ranks`` > 1)."""
    head = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    return subprocess.run(
        [*head, "-m", "sdca_dist.predict", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def valset(tmp_path_factory) -> SimpleNamespace:
    """5 Cityscapes-layout val images, their lossless shard set, random small weights."""
    root = tmp_path_factory.mktemp("predict")
    raw = root / "raw"
    for cmd in (
        synth_command(raw, (1, 1, 5), (96, 48), (160, 80)),
        shard_command("cityscapes", raw / "cityscapes", "val", root / "val") + ["--lossless", "--quiet"],
    ):
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    from sdca_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("small", 19)
    for conv in model.classifier.branches:  # varied predictions, so that many classes are scored
        torch.nn.init.normal_(conv.weight, std=0.3)
    torch.save(model.state_dict(), root / "weights.pt")
    return SimpleNamespace(
        root=root,
        images=raw / "cityscapes" / "leftImg8bit" / "val",
        gt=raw / "cityscapes" / "gtFine" / "val",
        shards=root / "val",
        weights=root / "weights.pt",
    )
