"""What a GPU node changes, checked without one: DDP's keywords across the supported torch range,
device binding and the checks that refuse a launch which cannot work (one line each)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from method_fixtures import run_distributed

from sdca_dist.engine.distributed import DistContext
from sdca_dist.engine.model_engine import DDPEngine, ddp_buffer_keywords

#: keyword names of ``DistributedDataParallel.__init__`` in torch 2.3-2.12 (no forward_sync_buffers)
DDP_KEYWORDS_BEFORE_2_13 = (
    "self",
    "module",
    "device_ids",
    "output_device",
    "dim",
    "broadcast_buffers",
    "init_sync",
    "process_group",
    "bucket_cap_mb",
    "find_unused_parameters",
    "check_reduction",
    "gradient_as_bucket_view",
    "static_graph",
    "delay_all_reduce_named_params",
    "param_to_hook_all_reduce",
    "mixed_precision",
    "device_mesh",
)


def test_buffer_keyword_in_each_torchs_spelling():
    assert ddp_buffer_keywords(False, DDP_KEYWORDS_BEFORE_2_13) == {"broadcast_buffers": False}
    assert ddp_buffer_keywords(True, DDP_KEYWORDS_BEFORE_2_13 + ("forward_sync_buffers",)) == {
        "forward_sync_buffers": True
    }


def _ddp_worker(rank: int, world: int, accepted) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].eval()  # frozen BN: its running statistics stay what the start-up broadcast made them
    model[1].running_mean.fill_(float(rank))  # ranks disagree until that broadcast
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    engine = DDPEngine(
        model, ctx, torch.optim.SGD(model.parameters(), lr=0.1), micro_steps=1, freeze_bn=True, accepted=accepted
    )
    with engine.micro_step(0):
        engine.backward(engine(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(rank))).square().mean())
    engine.step(0.1)
    return {"running_mean": model[1].running_mean.clone(), "weight": model[0].weight.detach().clone()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("accepted", [DDP_KEYWORDS_BEFORE_2_13, None], ids=["torch<2.13", "installed"])
def test_ddp_engine_builds_and_steps_with_each_torchs_keywords(accepted):
    """The DDP engine built as torch 2.3-2.12 would take it (``broadcast_buffers``) and as the
    installed torch takes it: both start from rank 0's buffers and keep the ranks identical."""
    a, b = run_distributed(_ddp_worker, 2, accepted)
    assert torch.equal(a["running_mean"], torch.zeros(4)) and torch.equal(b["running_mean"], torch.zeros(4))
    assert torch.equal(a["weight"], b["weight"])
