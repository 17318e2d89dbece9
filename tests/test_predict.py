"""python -m sdca_dist.predict: Cityscapes-format predictions scored by the official evaluator.

Real components: a generated Cityscapes-layout val set, real shards, DALI, torchrun with gloo,
and cityscapesscripts' own ``evalPixelLevelSemanticLabeling.evaluateImgLists``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from predict_fixtures import OVERRIDES, run_predict

from sdca_dist.predict import PredictError, parse_args, stem_of


def _project_miou(valset) -> dict:
    """The engine's own evaluation (sdca_dist.engine.evaluation.evaluate) on the val shards."""
    from sdca_dist.config import compose_config
    from sdca_dist.engine.distributed import DistContext
    from sdca_dist.engine.evaluation import evaluate
    from sdca_dist.engine.observe import StageObserver
    from sdca_dist.models.convert import load_converted

    cfg = compose_config([*OVERRIDES, f"data.target_val={valset.shards}"])
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    sc = SimpleNamespace(cfg=cfg, ctx=ctx, observer=StageObserver("eval", valset.root, is_main=False))
    return evaluate(sc, load_converted(valset.weights, "small", 19))


def _official_miou(pred_dir: Path, gt_dir: Path) -> float:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    gts = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    preds = []
    for gt in gts:
        stem = gt.name[: -len("_gtFine_labelIds.png")]
        found = list(pred_dir.rglob(f"{stem}_labelIds.png"))
        assert len(found) == 1, (stem, found)
        preds.append(str(found[0]))
    args = official.args
    args.evalInstLevelScore, args.quiet, args.JSONOutput = False, True, False
    result = official.evaluateImgLists(preds, [str(g) for g in gts], args)
    return 100.0 * result["averageScoreClasses"]


@pytest.fixture(scope="module")
def shard_predictions(valset) -> Path:
    """predict on the val shard set, one process."""
    out = valset.root / "pred"
    proc = run_predict([*OVERRIDES, f"model={valset.weights}", f"input={valset.shards}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr
    assert "ETA" in proc.stdout and "wrote 5 predictions" in proc.stdout
    return out


def test_official_evaluator_agrees_with_the_project_miou(valset, shard_predictions: Path):
    out = shard_predictions
    report = _project_miou(valset)
    official = _official_miou(out / "labelIds", valset.gt)
    assert abs(report["mIoU"] - official) < 0.01, (report["mIoU"], official)
    assert sum(v is not None for v in report["per_class"].values()) >= 5  # a meaningful comparison
    # each output has the image's own size; colours are the Cityscapes palette of the label ids
    from sdca_dist.classes import CITYSCAPES_ID_PALETTE

    for lbl_path in (out / "labelIds").glob("*_labelIds.png"):
        ids = np.array(Image.open(lbl_path))
        color = np.array(Image.open(out / "color" / lbl_path.name.replace("_labelIds", "_color")))
        assert ids.shape == (80, 160) and color.shape == (80, 160, 3)
        assert np.array_equal(CITYSCAPES_ID_PALETTE[ids], color)
    assert not list(out.rglob(".tmp*"))


def test_folder_input_under_torchrun_matches_the_shard_set(valset, shard_predictions: Path, tmp_path: Path):
    """Two ranks over the raw PNGs (same pixels as the lossless shards): every image once, same bytes."""
    ref = shard_predictions
    out = tmp_path / "pred"
    proc = run_predict([*OVERRIDES, f"model={valset.weights}", f"input={valset.images}", f"out={out}"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 predictions" in proc.stdout
    written = sorted((out / "labelIds").rglob("*_labelIds.png"))
    assert len(written) == 5 and {p.parent.name for p in written} == {"frankfurt", "lindau", "munster"}
    for p in written:
        assert p.read_bytes() == (ref / "labelIds" / p.name).read_bytes(), p.name


def test_test_time_augmentation_and_unreadable_images(valset, tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(valset.images.rglob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (70, 30), (90, 120, 30)).save(folder / "odd size.jpg")
    out = tmp_path / "tta"
    proc = run_predict(
        [*OVERRIDES, f"model={valset.weights}", f"input={folder}", f"out={out}", "flip=true", "scales=[0.75,1.25]"]
    )
    assert proc.returncode == 0, proc.stderr
    odd = np.array(Image.open(out / "labelIds" / "odd size_labelIds.png"))
    assert odd.shape == (30, 70)
    from sdca_dist.classes import CITYSCAPES_TRAINID_TO_ID

    assert set(np.unique(odd)) <= set(CITYSCAPES_TRAINID_TO_ID.values())
    # a truncated PNG (valid header): one line naming the file, exit 2, no temporary file left
    good = sorted(folder.glob("*.png"))[0].read_bytes()
    (folder / "broken_leftImg8bit.png").write_bytes(good[: len(good) // 2])
    proc = run_predict([*OVERRIDES, f"model={valset.weights}", f"input={folder}", f"out={tmp_path / 'x'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "broken_leftImg8bit.png" in proc.stderr, proc.stderr
    assert not list((tmp_path / "x").rglob(".tmp*"))


def test_arguments():
    a = parse_args(
        ["conf=synthetic", "model=small", "model=w.pt", "input=in", "out=o", "flip=yes", "scales=[0.5,1.0]", "seed=3"]
    )
    assert str(a.weights) == "w.pt" and a.flip and a.scales == (0.5, 1.0)
    assert a.overrides == ["conf=synthetic", "model=small", "seed=3"]
    assert stem_of("a/b/x_000001_000019_leftImg8bit.png") == "x_000001_000019" and stem_of("img.JPG") == "img"
    for bad, msg in (
        (["model=w.pt", "input=i"], "missing out="),
        (["model=w.pt", "input=i", "out=o", "scales=[a]"], "scales="),
        (["model=w.pt", "input=i", "out=o", "flip=maybe"], "flip="),
    ):
        with pytest.raises(PredictError, match=msg):
            parse_args(bad)
