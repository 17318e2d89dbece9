"""ssl trains at the scale it is tested at, whatever size the target images are stored at.

Real DALI (CPU) on the ssl stage's own loader settings (``supervised.ssl_augmentation`` through
``make_loader``); the configuration check through ``compose_config`` and the launcher's CLI.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdca_dist.classes import colorize
from sdca_dist.config import ConfigError, compose_config
from sdca_dist.data.loader import ShardLoader
from sdca_dist.data.shard_set import ShardWriter, write_manifest
from sdca_dist.engine.data import make_loader
from sdca_dist.engine.distributed import DistContext
from sdca_dist.engine.stages.supervised import ssl_augmentation
from sdca_dist.image_scale import scale_line, ssl_range
from sdca_dist.stage_table import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
EVAL = [32, 64]  # the evaluation size [H, W] of these tests; crops are the whole evaluation image
CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _stored_at(folder: Path, factor: int, n: int = 4) -> Path:
    """The same target images stored at ``factor`` x the evaluation size: labels of 4x4-pixel
    blocks at 1x, each label pixel a factor x factor square at factor x (so a zoom relative to
    the evaluation size samples the same blocks from either)."""
    rng = np.random.default_rng(0)
    w = ShardWriter(folder, prefix="t", shard_size=1 << 20, num_classes=19)
    for i in range(n):
        label = np.kron(rng.integers(0, 19, (EVAL[0] // 4, EVAL[1] // 4)), np.ones((4 * factor, 4 * factor)))
        label = label.astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(colorize(label)).save(buf, format="PNG")
        w.add(f"t{i}", buf.getvalue(), "img.png", label, {"path": f"{i}.png"})
    return write_manifest(folder, w.close(), 19).path


def _cfg(*overrides: str):
    return compose_config(
        ["conf=synthetic", f"data.eval_resize={EVAL}", f"data.ssl_crop={EVAL}", "data.num_threads=1", *overrides]
    )


def _labels(loader, batches: int = 4) -> torch.Tensor:
    it = iter(loader)
    return torch.cat([next(it)["label"] for _ in range(batches)])


def _ssl_labels(cfg, manifest: Path) -> torch.Tensor:
    return _labels(make_loader(cfg, CTX, manifest, 2, train=True, **ssl_augmentation(cfg)))


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("stored")
    return {f: _stored_at(root / f"x{f}", f) for f in (1, 2)}


def test_ssl_zoom_is_the_same_for_data_stored_at_1x_and_2x_the_evaluation_size(stored):
    """The resolved zoom of each sample relative to the evaluation size does not depend on the
    stored size: the ssl batches of the 1x and the 2x copy show the same label blocks at the same
    places (a zoom of the STORED image would show the 2x copy twice as large)."""
    cfg = _cfg("data.ssl_scale=[1.0,3.0]")
    one, two = _ssl_labels(cfg, stored[1]), _ssl_labels(cfg, stored[2])
    assert one.shape[-2:] == two.shape[-2:] == tuple(EVAL)
    assert float((one == two).float().mean()) > 0.99
    # the check can fail: zooming the stored image (resize=None) trains the 2x copy at 2x
    kw = {**ssl_augmentation(cfg), "resize": None}
    stored_zoom = _labels(make_loader(cfg, CTX, stored[2], 2, train=True, **kw))
    assert float((one == stored_zoom).float().mean()) < 0.8
    # for data stored AT the evaluation size the two zooms are one and the same
    assert torch.equal(one, _labels(make_loader(cfg, CTX, stored[1], 2, train=True, **kw)))


def test_published_zoom_equals_the_references_zoom_of_the_stored_image(stored):
    """Cityscapes' case at small size: stored at 2x the evaluation size, [1.0, 3.0] of the
    evaluation size is the reference's [0.5, 1.5] of the stored image, sample for sample."""
    cfg = _cfg("data.ssl_scale=[1.0,3.0]")
    ours = _ssl_labels(cfg, stored[2])
    reference = ShardLoader(
        stored[2],
        2,
        train=True,
        resize=None,
        crop_size=tuple(EVAL),
        scale_range=(0.5, 1.5),
        flip=True,
        photometric=True,
        crop_policy="fit",
        seed=cfg.seed * 1000,
        num_threads=1,
        device="cpu",
    )
    assert float((ours == _labels(reference)).float().mean()) > 0.99


def test_published_presets_train_ssl_at_1_to_3x_the_test_scale():
    for conf in ("gta2city", "synthia2city"):
        cfg = compose_config([f"conf={conf}"])
        r = ssl_range(cfg.data)
        assert (r.low, r.high) == (1.0, 3.0), conf
        assert "target 1.00-3.00x" in scale_line(cfg, "ssl")
    assert "target 1.00x" in scale_line(compose_config(["conf=gta2city"]), "sdca")


def test_each_stage_scale_line_names_the_sides_it_trains_or_labels_on():
    """The sides come from the settings each stage reads (the stage table): the source at
    source_resize, the target at target_resize or ssl's zoom; dist_init reads only the source,
    pseudo_label only the target, and eval none (it reads the test scale itself)."""
    from sdca_dist.image_scale import stage_scales

    cfg = compose_config(["conf=gta2city"])
    sides = {stage: [r.side for r in stage_scales(cfg, stage)] for stage in STAGE_NAMES}
    assert sides == {
        "oracle": ["target"],
        "src": ["source"],
        "dist_init": ["source"],
        "sdca": ["source", "target"],
        "sdca_no_align": ["source", "target"],
        "pseudo_label": ["target"],
        "ssl": ["target"],
        "eval": [],
    }
    assert "data.ssl_scale" in stage_scales(cfg, "ssl")[0].settings
    assert stage_scales(cfg, "pseudo_label")[0].settings == "data.target_resize=[512, 1024]"


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["data.ssl_scale=[2.5,3.0]"], "data.ssl_scale=[2.5, 3.0]"),
        (["data.ssl_scale=[0.3,0.4]", "data.ssl_crop=[16,32]"], "data.ssl_scale=[0.3, 0.4]"),
        (["data.ssl_scale=[0.3,0.3]", "data.ssl_crop=[16,32]", "data.target_resize=[16,32]"], "target_resize"),
        (["data.target_resize=[160,320]"], "data.target_resize=[160, 320]"),
    ],
)
def test_a_training_scale_far_from_the_test_scale_is_refused_unless_on_purpose(overrides, named):
    with pytest.raises(ConfigError) as err:
        compose_config(["conf=synthetic", *overrides])
    assert named in str(err.value) and "data.allow_scale_mismatch=true" in str(err.value)
    compose_config(["conf=synthetic", *overrides, "data.allow_scale_mismatch=true"])
    # within 2x of the test scale on at least part of the range: accepted
    compose_config(["conf=synthetic", "data.ssl_scale=[1.0,3.0]"])


def test_a_zoom_below_what_covers_the_crop_is_refused():
    """A stored-image value (the reference's [0.5, 1.5]) used as an evaluation-size zoom: its
    lower part would be raised to the crop's floor, so the range is refused with its equivalent."""
    with pytest.raises(ConfigError, match=r"data.ssl_scale=\[0.5, 1.5\].*\[1.0, 3.0\]"):
        compose_config(["conf=gta2city", "data.ssl_scale=[0.5,1.5]"])
    compose_config(["conf=gta2city", "data.ssl_scale=[1.0,1.5]"])
    compose_config(["conf=gta2city", "data.ssl_scale=[0.5,1.5]", "data.ssl_crop=[256,512]"])


def test_the_launcher_refuses_a_scale_mismatch_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "slurm.py"),
            "conf=synthetic",
            "cluster=local",
            "dry_run=true",
            f"run_dir={tmp_path / 'run'}",
            "data.ssl_scale=[2.5,3.0]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.ssl_scale=[2.5, 3.0]" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_frozen_run_configuration_with_a_stored_image_zoom_is_refused_on_load(tmp_path):
    """A run folder frozen with the reference's stored-image zoom ([0.5, 1.5] on a 1024x512 crop)
    would silently train at 1-1.5x of the test scale now that the zoom is of the evaluation size:
    loading it is refused in one line naming the file and the key."""
    from omegaconf import OmegaConf

    from sdca_dist.config.run_config import CONFIG_FILE, load_frozen

    data = OmegaConf.to_container(compose_config(["conf=gta2city"]), resolve=True)
    data["data"]["ssl_scale"] = [0.5, 1.5]
    (tmp_path / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    with pytest.raises(ConfigError) as err:
        load_frozen(tmp_path, "ssl")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / CONFIG_FILE) in message and "data.ssl_scale=[0.5, 1.5]" in message
    data["data"]["ssl_scale"] = [1.0, 3.0]
    (tmp_path / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(data)))
    assert list(load_frozen(tmp_path, "ssl").data.ssl_scale) == [1.0, 3.0]
