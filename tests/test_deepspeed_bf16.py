"""DeepSpeed bf16 (``engine=deepspeed engine.bf16=true``) keeps the frozen BatchNorms' statistics
and affine parameters in fp32, exactly as loaded, while it trains and in what it saves; the
trainable parameters come from DeepSpeed's fp32 master. Real DeepSpeed, one gloo rank on the CPU
(in a child process: the process group must not leak into the test process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from engine_fixtures import REPO, child_env

SCRIPT = r"""
import json, torch
from sdca_dist.config.schema import EngineConfig, TrainConfig
from sdca_dist.engine.distributed import init_distributed, shutdown_distributed
from sdca_dist.engine.model_engine import build_engine
from sdca_dist.method.segmentation_loss import segmentation_loss
from sdca_dist.models import build_model

ctx = init_distributed("auto")
torch.manual_seed(0)
model = build_model("small", 19, freeze_bn=True)
bn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
with torch.no_grad():  # statistics that bf16 cannot hold exactly
    for n in bn:
        m = model.get_submodule(n)
        m.running_mean.add_(torch.rand_like(m.running_mean) * 1e-3 + 0.1)
        m.running_var.add_(torch.rand_like(m.running_var) * 1e-3)
frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if n.rsplit(".", 1)[0] in bn}
engine = build_engine(model, ctx, EngineConfig(name="deepspeed", bf16=True, zero_stage=1), TrainConfig(),
                      micro_steps=1, micro_batch=2)
g = torch.Generator().manual_seed(1)
for _ in range(2):
    x, y = torch.randn(2, 3, 32, 64, generator=g), torch.randint(0, 19, (2, 32, 64), generator=g)
    engine.train(True)
    with engine.micro_step(0):
        _, logits = engine(x)
        loss = segmentation_loss(logits, y, 0.75)
        engine.backward(loss)
    engine.step(1e-3)
live = engine.module.state_dict()
final = engine.final_state()
float_frozen = [n for n in frozen if frozen[n].is_floating_point()]
print(json.dumps({
    "bn_entries": len(float_frozen),
    "live_dtypes": sorted({str(live[n].dtype) for n in float_frozen}),
    "live_exact": all(torch.equal(live[n], frozen[n]) for n in float_frozen),
    "final_dtypes": sorted({str(final[n].dtype) for n in float_frozen}),
    "final_exact": all(torch.equal(final[n], frozen[n]) for n in float_frozen),
    "conv_dtype": str(next(p for n, p in engine.module.named_parameters() if p.requires_grad).dtype),
    "trainable_final_dtype": sorted(
        {str(final[n].dtype) for n, p in engine.module.named_parameters() if p.requires_grad}
    ),
    "loss_finite": bool(torch.isfinite(loss)),
}))
shutdown_distributed()
"""


@pytest.mark.timeout(600)
def test_deepspeed_bf16_keeps_frozen_batchnorm_in_fp32_and_saves_it_so():
    pytest.importorskip("deepspeed")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["bn_entries"] > 0 and got["loss_finite"], got
    assert got["conv_dtype"] == "torch.bfloat16"  # the trained weights do run in bf16
    assert got["live_dtypes"] == ["torch.float32"] and got["live_exact"], got  # while training
    assert got["final_dtypes"] == ["torch.float32"] and got["final_exact"], got  # in model_final.pt
    assert got["trainable_final_dtype"] == ["torch.float32"], got  # from the fp32 master
