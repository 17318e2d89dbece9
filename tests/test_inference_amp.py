"""Inference under ``engine.amp`` (eval, dist_init, pseudo_label, predict): bf16 autocast is what
runs on CUDA by default; on the CPU it is shown here, through CPU autocast, to agree with fp32
within stated tolerances. The CPU default (``engine.amp=auto``) runs no autocast at all, so CPU
results are bitwise those of fp32. Statistics are accumulated on the device without host reads
per batch (the confusion matrix's range checks deferred to its one read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_fixtures import run_train, tiny

from sdca_dist.config.schema import EngineConfig
from sdca_dist.engine.model_engine import inference_amp, inference_autocast
from sdca_dist.engine.stages.pseudo_label import _probabilities
from sdca_dist.method import ClassThresholds, ConfusionMatrix, flatten_pixels
from sdca_dist.method.objective import DistributionPair
from sdca_dist.models import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
#: bf16 keeps 8 bits of mantissa: softmax probabilities within 0.02, estimator means within 3%
PROB_TOLERANCE = 0.02
MEAN_TOLERANCE = 0.03


def test_inference_amp_follows_engine_amp_and_is_off_on_the_cpu_by_default():
    assert inference_amp(EngineConfig(), CPU) is None  # auto: the exact fp32 path on the CPU
    assert inference_amp(EngineConfig(), CUDA) is torch.bfloat16
    assert inference_amp(EngineConfig(amp="fp32"), CUDA) is None
    assert inference_amp(EngineConfig(amp="bf16"), CPU) is torch.bfloat16
    assert inference_amp(EngineConfig(name="deepspeed", bf16=True), CUDA) is torch.bfloat16
    with inference_autocast(None, CPU):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast(torch.bfloat16, CPU):
        assert torch.is_autocast_enabled("cpu")


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model("small", 19, freeze_bn=True).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 64, 128, generator=g)
    label = torch.randint(0, 19, (4, 64, 128), generator=g)
    return model, {"image": image, "label": label, "valid": torch.tensor([True, True, True, False])}


@torch.no_grad()
def test_bf16_probabilities_and_estimator_statistics_agree_with_fp32_on_cpu_autocast():
    model, batch = _model_and_batch()
    ((_, p32, _),) = _probabilities(model, batch, CPU, None)
    ((_, p16, _),) = _probabilities(model, batch, CPU, torch.bfloat16)
    assert p16.dtype == torch.float32  # softmax in float32 whatever the forward ran in
    assert float((p16 - p32).abs().max()) < PROB_TOLERANCE
    assert float((p16.argmax(1) == p32.argmax(1)).float().mean()) > 0.95
    # dist_init's path: forward under autocast, statistics from float32 outputs
    means = []
    for amp in (None, torch.bfloat16):
        with inference_autocast(amp, CPU):
            feats, logits = model(batch["image"])
        feats, logits = feats.float(), logits.float()
        f, y = flatten_pixels(feats, batch["label"])
        o, _ = flatten_pixels(logits, batch["label"])
        pair = DistributionPair(19, model.feature_dim, CPU)
        pair.update(f, o, y)
        means.append(pair.feat.mean)
    scale = float(means[0].abs().max())
    assert float((means[1] - means[0]).abs().max()) < MEAN_TOLERANCE * scale


def test_thresholds_count_only_valid_rows_by_mask_as_the_index_did():
    _, batch = _model_and_batch()
    probs = torch.rand(4, 19, 8, 8).softmax(1)
    by_mask, by_index = ClassThresholds(19), ClassThresholds(19)
    by_mask.update(probs, rows=batch["valid"])
    by_index.update(probs[batch["valid"]])
    assert torch.equal(by_mask.counts, by_index.counts)


def test_deferred_confusion_checks_count_on_the_device_and_raise_at_the_read():
    pred = torch.tensor([[[0, 1, 1, 2]]])
    good = torch.tensor([[[0, 1, 255, 2]]])
    cm = ConfusionMatrix(3, defer_checks=True)
    cm.update(pred, good)
    eager = ConfusionMatrix(3)
    eager.update(pred, good)
    assert torch.equal(cm.mat, eager.mat) and cm.miou() == eager.miou()
    cm.update(pred, torch.tensor([[[0, 7, 1, 2]]]))  # no host read here: counted, kept out of the matrix
    assert int(cm.mat.sum()) == 3 + 3
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) .*\(1 pixels outside\)"):
        cm.all_reduce()
    bad_pred = ConfusionMatrix(3, defer_checks=True)
    bad_pred.update(torch.tensor([[[0, 5]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="predictions must lie in"):
        bad_pred.miou()


@pytest.mark.timeout(600)
def test_eval_stage_under_bf16_autocast_agrees_with_fp32(tiny_chain: Path, shards: Path, tmp_path: Path):
    """The real eval stage, CPU autocast bf16 against fp32, on the chain's sdca model."""
    weights = tiny_chain / "sdca" / "model_final.pt"
    got = {}
    for amp in ("fp32", "bf16"):
        run = tmp_path / amp
        overrides = tiny(shards, "stage=eval", f"run_dir={run}", f"eval.model_from={weights}", f"engine.amp={amp}")
        proc = run_train(1, overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[amp] = json.loads((run / "eval" / "metrics.json").read_text())["mIoU"]
    assert abs(got["bf16"] - got["fp32"]) < 1.0, got
