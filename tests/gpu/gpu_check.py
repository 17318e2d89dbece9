"""GPU check (the GPU-only paths, tests/gpu/README.md): one program, one table. CI never runs it (no GPU there).

    python tests/gpu/gpu_check.py --out DIR            # on a GPU machine (writes DIR/gpu_check.md/.json)
    python tests/gpu/gpu_check.py --out DIR --smoke    # tiny sizes: checks the script itself on a CPU

Measures, each item independent (a failing item is reported, the others still run):
1. DALI decode+augment images/s with GPU ("mixed") vs CPU decoding, synthetic JPEG shards at real
   resolution (1914x1052 source, 2048x1024 target); labels byte-exact between the two.
2. DDP/NCCL at world size 1 and the estimator all-reduce on CUDA tensors.
3. One DeepLabV2-R101 sdca step (1280x720 source + 1024x512 target, batch 1+1), fp32 and bf16
   autocast: step time, peak memory, time in the estimator update and in its all-reduce.
4. DeepSpeed ZeRO-1/2 with bf16 and frozen BatchNorm: a few sdca steps.
5. The estimator benchmark on CUDA (ours vs the N x C x A reference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def item_dali(tmp: Path, smoke: bool) -> dict:
    from sdca_dist.data.loader import ShardLoader
    from sdca_dist.shard import shard_command
    from sdca_dist.synth import synth_command

    src_size, tgt_size, n = ((192, 104), (256, 128), 8) if smoke else ((1914, 1052), (2048, 1024), 64)
    raw, shards = tmp / "raw", tmp / "shards"
    subprocess.run(
        synth_command(raw, (n, n, 2), src_size, tgt_size, workers=8),
        check=True,
        capture_output=True,
    )
    for layout, split, name in (("gta5", "train", "src"), ("cityscapes", "train", "tgt")):
        subprocess.run(
            shard_command(layout, raw / layout, split, shards / name, workers=8) + ["--quiet"],
            check=True,
            capture_output=True,
        )
    out = {}
    for name, resize in (("src", (720, 1280)), ("tgt", (512, 1024))):
        rates, labels = {}, {}
        for device in ["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"]:
            loader = ShardLoader(
                shards / name / "manifest.json", 4, train=False, resize=resize, device=device, num_threads=8
            )
            t0, images, got = time.time(), 0, []
            for batch in loader:
                images += int(batch["valid"].sum())
                got.append(batch["label"].cpu())
            rates[device] = images / (time.time() - t0)
            labels[device] = torch.cat(got)
        out[name] = {
            "images_per_s": rates,
            "labels_byte_exact": bool(torch.equal(labels["cpu"], labels.get("gpu", labels["cpu"]))),
        }
    return out


def item_nccl() -> dict:
    import torch.distributed as dist

    from sdca_dist.engine.distributed import init_distributed
    from sdca_dist.method import SemanticDistribution

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29641")
    ctx = init_distributed("auto")  # one process group for every item (DeepSpeed caches it)
    d = SemanticDistribution(19, 2048).to(ctx.device)
    feats = torch.randn(14400, 2048, device=ctx.device)
    labels = torch.randint(0, 19, (14400,), device=ctx.device)
    d.update(feats, labels)
    _sync()
    t0 = time.time()
    for _ in range(10):
        d.update(feats, labels)
    _sync()
    res = {
        "backend": dist.get_backend(),
        "device": str(ctx.device),
        "update_ms": 100 * (time.time() - t0),
        "count_ok": int(d.count.sum()) == 11 * 14400,
    }
    return res


def _sdca_step(engine_name: str, precision: str, smoke: bool, zero: int = 0, steps: int = 3) -> dict:
    import torch.distributed as dist

    from sdca_dist.engine.distributed import init_distributed
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.engine.stages.distributions import DistributionPair
    from sdca_dist.engine.stages.sdca import SDCAStep
    from sdca_dist.models import build_model

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29641")
    ctx = init_distributed("auto")  # one process group for every item (DeepSpeed caches it)
    (sh, sw), (th, tw) = ((96, 160), (64, 128)) if smoke else ((720, 1280), (512, 1024))
    model = build_model("small" if smoke else "deeplabv2_r101", 19, freeze_bn=True)
    from sdca_dist.config.schema import EngineConfig, TrainConfig

    engine = build_engine(
        model,
        ctx,
        EngineConfig(name=engine_name, zero_stage=zero, bf16=(precision == "bf16" and engine_name == "deepspeed")),
        TrainConfig(),
        micro_steps=2,
        micro_batch=1,
    )
    timing = {"allreduce": 0.0}

    def timed_all_reduce(t):
        _sync()
        t0 = time.time()
        if dist.is_initialized():
            dist.all_reduce(t)
        _sync()
        timing["allreduce"] += time.time() - t0

    dists = DistributionPair(19, model.feature_dim, ctx.device, all_reduce=timed_all_reduce)
    step = SDCAStep(dists)
    batch = {
        "source": {
            "image": torch.randn(1, 3, sh, sw, device=ctx.device),
            "label": torch.randint(0, 19, (1, sh, sw), device=ctx.device),
        },
        "target": {"image": torch.randn(1, 3, th, tw, device=ctx.device)},
    }
    autocast = (
        torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
        if precision == "bf16" and engine_name == "ddp"
        else torch.autocast(ctx.device.type, enabled=False)
    )
    orig_update = dists.update

    def timed_update(*a):
        _sync()
        t0 = time.time()
        orig_update(*a)
        _sync()
        timing["estimator"] = timing.get("estimator", 0.0) + time.time() - t0

    dists.update = timed_update
    with autocast:
        step(engine, batch, 0)
        engine.step(1e-4)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timing.update(allreduce=0.0, estimator=0.0)
    t0 = time.time()
    for i in range(steps):
        with autocast:
            step(engine, batch, i)
            engine.step(1e-4)
    _sync()
    wall = (time.time() - t0) / steps
    res = {
        "step_s": wall,
        "estimator_share": timing["estimator"] / steps / wall,
        "allreduce_share": timing["allreduce"] / steps / wall,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: dict = {"device": device, "torch": torch.__version__}
    items = {
        "1_dali_decode": lambda tmp: item_dali(tmp, a.smoke),
        "2_ddp_nccl_estimator": lambda tmp: item_nccl(),
        "3_r101_step_fp32": lambda tmp: _sdca_step("ddp", "fp32", a.smoke),
        "3_r101_step_bf16_autocast": lambda tmp: _sdca_step("ddp", "bf16", a.smoke),
        "4_deepspeed_zero1_bf16": lambda tmp: _sdca_step("deepspeed", "bf16", a.smoke, zero=1),
        "4_deepspeed_zero2_bf16": lambda tmp: _sdca_step("deepspeed", "bf16", a.smoke, zero=2),
    }
    for name, fn in items.items():
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[name] = fn(Path(tmp))
            except Exception as exc:  # report and go on: one broken item must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "trace"}), flush=True)
    est = subprocess.run(
        [sys.executable, "-m", "sdca_dist.bench", "estimator", "--reps", "3", "--ref-reps", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    results["5_estimator_bench"] = {"rc": est.returncode, "tail": est.stdout.strip().splitlines()[-6:]}
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    lines = [f"# GPU check on {device} (torch {torch.__version__})", ""]
    for k, v in results.items():
        if isinstance(v, dict):
            lines.append(f"- **{k}**: `{json.dumps({kk: vv for kk, vv in v.items() if kk != 'trace'})}`")
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
