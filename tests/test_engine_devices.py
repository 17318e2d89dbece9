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


# The variables as SLURM 22.05 sets them (read on the local test cluster, tests/slurm): an sbatch
# script with --ntasks=2 has SLURM_PROCID=0 and SLURM_NTASKS=2 but no SLURM_STEP_ID; an salloc
# shell has SLURM_NTASKS=2 only; each srun task has SLURM_STEP_ID too.
BATCH_SCRIPT = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
SALLOC_SHELL = {"SLURM_JOB_ID": "2", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2"}
SRUN_TASK = {**BATCH_SCRIPT, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("env", [BATCH_SCRIPT, SALLOC_SHELL], ids=["sbatch-script", "salloc-shell"])
def test_a_plain_process_in_an_allocation_shell_is_one_process_and_says_so(env):
    from sdca_dist.engine.distributed import allocation_shell_note, rank_environment

    got = rank_environment(env)
    assert (got["RANK"], got["WORLD_SIZE"]) == ("0", "1")
    note = allocation_shell_note(env)
    assert note and "SLURM_NTASKS=2" in note and "srun" in note and "\n" not in note


def test_an_srun_task_is_a_rank():
    from sdca_dist.engine.distributed import allocation_shell_note, local_world_size, rank_environment

    got = rank_environment(SRUN_TASK)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("1", "2", "1")
    assert allocation_shell_note(SRUN_TASK) is None
    assert local_world_size({**SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, 1) == 2
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}, 0) == 4


def test_devices_refused_in_one_line():
    from sdca_dist.engine.distributed import DeviceSetupError, pick_device

    assert pick_device(1, 2, 2, require_cuda=True, backend="auto") == torch.device("cuda", 1)
    assert pick_device(0, 1, 0, require_cuda=False, backend="auto") == torch.device("cpu")
    with pytest.raises(DeviceSetupError, match="3 ranks on this node but 2 visible GPU"):
        pick_device(0, 3, 2, require_cuda=True, backend="auto")
    with pytest.raises(DeviceSetupError, match="cluster.gpus_per_node > 0 but torch .* sees no GPU"):
        pick_device(0, 1, 0, require_cuda=True, backend="auto")
    with pytest.raises(DeviceSetupError, match="engine.backend=nccl"):
        pick_device(0, 1, 0, require_cuda=False, backend="nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_refuses_gpus_per_node_without_cuda(tmp_path):
    """``cluster.gpus_per_node=1`` on a machine where torch sees no GPU: exit 2, one line, no
    silent CPU run."""
    from engine_fixtures import run_train, tiny

    r = run_train(1, tiny(tmp_path / "shards", "stage=src", f"run_dir={tmp_path / 'run'}", "cluster.gpus_per_node=1"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: cluster.gpus_per_node > 0 but torch"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_speed_defaults_fast_on_cuda_and_no_change_on_the_cpu():
    from sdca_dist.config.schema import EngineConfig, TrainConfig
    from sdca_dist.engine.model_engine import SpeedSettings, speed_settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert speed_settings(EngineConfig(), TrainConfig(), cpu) == SpeedSettings()
    fast = speed_settings(EngineConfig(), TrainConfig(), cuda)
    assert fast == SpeedSettings(amp=torch.bfloat16, channels_last=True, cudnn_benchmark=True)
    exact = speed_settings(EngineConfig(cudnn_benchmark=True), TrainConfig(deterministic=True), cuda)
    assert not exact.cudnn_benchmark and exact.deterministic
    assert speed_settings(EngineConfig(amp="fp32"), TrainConfig(), cuda).amp is None
    # engine.bf16 is not ignored by DDP: it is bf16 autocast
    assert speed_settings(EngineConfig(bf16=True), TrainConfig(), cpu).amp == torch.bfloat16
    # DeepSpeed does its own precision and keeps the default memory format
    ds = speed_settings(EngineConfig(name="deepspeed"), TrainConfig(), cuda)
    assert ds.amp is None and not ds.channels_last


def _amp_worker(rank: int, world: int) -> dict:
    from sdca_dist.engine.model_engine import SpeedSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    class TwoHeads(nn.Module):  # the engine's contract: forward returns (features, logits)
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            f = self.body[:2](x)
            return f, self.body[2](f)

    net = TwoHeads()
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    speed = SpeedSettings(amp=torch.bfloat16, channels_last=True)
    engine = DDPEngine(net, ctx, torch.optim.SGD(net.parameters(), lr=0.1), micro_steps=1, freeze_bn=True, speed=speed)
    with engine.micro_step(0):
        feats, logits = engine(torch.randn(2, 3, 8, 8))
        engine.backward(logits.square().mean())
    engine.step(0.1)
    return {
        "out": (feats.dtype, logits.dtype),
        "params": {p.dtype for p in net.parameters()},
        "channels_last": net.body[0].weight.is_contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.timeout(120)
def test_bf16_autocast_keeps_fp32_weights_and_hands_fp32_outputs_to_the_loss():
    (r,) = run_distributed(_amp_worker, 1)
    assert r["out"] == (torch.float32, torch.float32)
    assert r["params"] == {torch.float32}
    assert r["channels_last"]


def test_the_suite_hides_the_gpus_from_itself_and_every_process_it_starts(monkeypatch):
    """The CPU suite passes on a GPU node: this process (in-process gloo groups, ``mp.spawn``
    children) and every child started through ``child_env`` see no GPU, and every ``env=`` a test
    hands a subprocess is derived from one of those two (a hand-built environment would show the
    node's GPUs to a child that the test then expects on gloo and the CPU)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine_fixtures import child_env

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert child_env()["CUDA_VISIBLE_DEVICES"] == "" and child_env(X="1")["CUDA_VISIBLE_DEVICES"] == ""
    with monkeypatch.context() as m:  # child_env hides them itself, whatever this process was given
        m.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        assert child_env()["CUDA_VISIBLE_DEVICES"] == ""
    seen = subprocess.run(
        [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert seen.stdout.strip() == "''", seen.stdout + seen.stderr
    tests = Path(__file__).resolve().parent
    unsafe = []
    for path in sorted(tests.rglob("*.py")):
        if "gpu" in path.relative_to(tests).parts:  # the GPU check runs by hand on a GPU node
            continue
        source = path.read_text()
        tree = ast.parse(source)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.Module)):
                continue
            assigned = {
                t.id: ast.get_source_segment(source, node.value) or ""
                for node in ast.walk(fn)
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            }
            for call in ast.walk(fn):
                for kw in getattr(call, "keywords", []) if isinstance(call, ast.Call) else []:
                    if kw.arg != "env":
                        continue
                    text = ast.get_source_segment(source, kw.value) or ""
                    if isinstance(kw.value, ast.Name):
                        text = assigned.get(kw.value.id, text)
                    if "child_env(" not in text and "os.environ" not in text:
                        unsafe.append(f"{path.relative_to(tests)}:{kw.value.lineno}: env={text}")
    # tests/slurm/conftest.py builds the cluster daemons' and client commands' environments from
    # os.environ (``SlurmCluster.run``) or for the cluster script alone (``_script``)
    allowed = {"slurm/conftest.py"}
    assert not [u for u in unsafe if u.split(":")[0] not in allowed], unsafe
