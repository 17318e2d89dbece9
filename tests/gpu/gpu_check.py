"""GPU check: the checklist of a 5-minute run on ONE GPU. CI never runs it on a GPU.

    python tests/gpu/gpu_check.py                 # on a GPU machine, with its own torch
    python tests/gpu/gpu_check.py --smoke         # the same items on the CPU at tiny sizes
    python tests/gpu/gpu_check.py --wheels DIR    # the pure-Python wheels a locked-down GPU box lacks

Each item prints one line ``G<n> PASS|FAIL|SKIP <figures>``; the exit status is 1 if any item
FAILs. An item that needs a package the machine lacks (DALI, DeepSpeed, Hydra, ...) SKIPs and
names it; the others still run. Every item asserts what it names; its verdict is a small function
of the measured facts (``judge_*``, ``check_arch``), so ``tests/test_gpu_check.py`` shows each item
FAIL on the CPU when the thing it checks is broken on purpose. Items:

G0 environment: torch, CUDA, cuDNN, NCCL, driver, GPU; the GPU's compute capability must be in
   ``torch.cuda.get_arch_list()`` (a CUDA 13 torch on a V100 FAILs; FAIL on a CPU build of torch)
G1 the DDP engine on NCCL (world size 1): builds with the installed torch's keywords and steps
G2 the process group of this run (NCCL on a GPU, world size 1) through the real collectives: the
   estimator update with its asynchronous all-reduce vs a CPU float64 reference (counts equal, max
   diff < 1e-9) and the stop vote through its collective path (pinned copy + CUDA event), which
   must agree one step after the request
G3 the real ``run_training`` (src-style step, train.deterministic=true) stopped by SIGUSR2 at a
   step boundary, checkpointed and resumed from the checkpoint loaded onto the device, against an
   uninterrupted run: bitwise on the CPU; on a GPU bitwise, or the difference is printed with the
   ops that have no deterministic CUDA kernel (captured warnings) and must stay within 1e-3 of the
   weights' scale; an unexplained difference FAILs
G4 DeepLabV2-R101 sdca step at full resolution (1280x720 + 1024x512, batch 1+1): ms/step and peak
   GiB for fp32, bf16 autocast, channels_last, cudnn.benchmark on/off; DeepSpeed ZeRO-1 bf16.
   Asserts on a GPU that bf16 autocast is faster than fp32, and everywhere that the first step's
   bf16 loss is within 2% of the fp32 loss from the same weights and data
G5 DALI GPU graph vs the CPU graph, JPEG and PNG shards, training and evaluation mode: labels equal
   (>= 99.9% of pixels), image difference within the stated bounds (SKIP without DALI; on the CPU
   the CPU graph against itself, a check of the comparison)
G6 the synthetic chain through the CLI (src -> dist_init -> sdca on CUDA; src alone at tiny size
   on the CPU), each child with this process's rank variables removed (SKIP without DALI/Hydra)
G7 two ranks on two GPUs, each on its own device (SKIP with one GPU)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

#: pure-Python packages the GPU box lacks (it has torch, numpy, pillow, tensorboard, matplotlib):
#: written by ``--wheels``. DALI (~420 MB) and DeepSpeed (needs compiled pydantic-core, msgpack) do not fit.
WHEELS = [
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "submitit",
    "cloudpickle",
    "webdataset",
    "braceexpand",
    "cityscapesscripts",
    "coloredlogs",
    "humanfriendly",
    "pyquaternion",
    "appdirs",
    "tqdm",
]
#: compiled packages the box may lack, fetched as wheels for ITS Python (``--box-python``, 3.12)
BOX_BINARY = ["pyyaml"]
WHEELS_LIMIT_MIB = 64


class Skip(Exception):
    """The item cannot run here; the message says why."""


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"needs {', '.join(missing)} (carry with --wheels, see tests/gpu/README.md)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------- G0
def gpu_facts() -> dict:
    """What torch reports about GPU 0 (None where torch sees no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version()) if hasattr(torch.cuda, "nccl") else "?"
    return {
        "capability": (props.major, props.minor),
        "arch_list": list(torch.cuda.get_arch_list()),
        "name": props.name,
        "mem_gib": props.total_memory / 2**30,
        "gpus": torch.cuda.device_count(),
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl,
    }


def check_arch(capability: tuple[int, int], arch_list: list[str]) -> str:
    """Raise unless torch carries kernels for ``capability``: ``sm_XY`` in its arch list, or PTX
    (``compute_N``, N <= XY) that the driver can compile for it at first use (slow start, named)."""
    sm = capability[0] * 10 + capability[1]
    if f"sm_{sm}" in arch_list:
        return f"sm_{sm} in arch list"
    ptx = [a for a in arch_list if a.startswith("compute_") and a[8:].isdigit() and int(a[8:]) <= sm]
    if ptx:
        return f"sm_{sm} by PTX JIT from {ptx[-1]}"
    raise AssertionError(
        f"GPU compute capability {capability[0]}.{capability[1]} (sm_{sm}) is not in torch.cuda.get_arch_list() "
        f"{arch_list}: this torch build has no kernels for this GPU (install --cuda 12 for GPUs below sm_75)"
    )


def g0_environment(cfg) -> str:
    import torch

    figures = [f"torch={torch.__version__}", f"cuda={torch.version.cuda}"]
    facts = gpu_facts()
    if facts is None:
        if cfg.smoke:
            raise Skip(" ".join(figures + ["(smoke: CPU run)"]))
        raise AssertionError(" ".join(figures + ["torch.cuda.is_available() is False (CPU build or old driver)"]))
    driver = "?"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split()[0]
    except (OSError, IndexError):
        pass
    cap = facts["capability"]
    figures += [
        f"cudnn={facts['cudnn']}",
        f"nccl={facts['nccl']}",
        f"driver={driver}",
        f"gpus={facts['gpus']}",
        f"gpu={facts['name'].replace(' ', '_')}",
        f"capability={cap[0]}.{cap[1]}",
        f"mem_gib={facts['mem_gib']:.0f}",
    ]
    figures.append(check_arch(cap, facts["arch_list"]).replace(" ", "_"))
    return " ".join(figures)


# --------------------------------------------------------------------------------------- G1
def g1_ddp_engine(cfg) -> str:
    import torch

    from sdca_dist.config.schema import EngineConfig, TrainConfig
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.method.segmentation_loss import segmentation_loss
    from sdca_dist.models import build_model

    ctx = cfg.ctx
    model = build_model("small", 19, freeze_bn=True).to(ctx.device)
    engine = build_engine(model, ctx, EngineConfig(), TrainConfig(), micro_steps=1, micro_batch=2)
    x = torch.randn(2, 3, 32, 64, device=ctx.device)
    y = torch.randint(0, 19, (2, 32, 64), device=ctx.device)
    with engine.micro_step(0):
        _, logits = engine(x)
        loss = segmentation_loss(logits, y, 0.75)
        engine.backward(loss)
    engine.step(1e-3)
    value = float(loss.detach())
    assert math.isfinite(value), "loss not finite"
    return f"backend={ctx.backend} device={ctx.device} amp={engine.speed.amp} loss={value:.4f}"


# --------------------------------------------------------------------------------------- G2
class _ProcessGroupSum:
    """The estimator's all-reduce seam on this run's process group, also at world size 1 (the
    default seam skips the collective there): the NCCL all-reduce itself runs on one GPU."""

    def __call__(self, tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def start(self, tensor):
        import torch.distributed as dist

        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


def expect_backend(device_type: str, backend: str) -> None:
    """A GPU run's collectives must be NCCL's (gloo on a GPU run never exercises them)."""
    want = "nccl" if device_type == "cuda" else "gloo"
    if backend != want:
        raise AssertionError(f"collectives ran on {backend}, not {want}, for a {device_type} run")


def judge_estimator(counts_equal: bool, max_diff: float, line: str) -> None:
    if not (counts_equal and max_diff < 1e-9):
        raise AssertionError(f"estimator differs from the float64 CPU reference: {line}")


def judge_stop_vote(agreed_at: int | None, requested_at: int, collective: bool, line: str) -> None:
    """The collective vote is read one step late: agreement exactly one step after the request."""
    if not collective:
        raise AssertionError(f"the stop vote never launched its collective: {line}")
    if agreed_at != requested_at + 1:
        raise AssertionError(f"stop vote agreed at step {agreed_at}, expected {requested_at + 1}: {line}")


def g2_collectives(cfg) -> str:
    import torch

    from sdca_dist.engine.distributed import StopVote
    from sdca_dist.method.distribution import SemanticDistribution
    from sdca_dist.method.objective import DistributionPair

    ctx = cfg.ctx
    expect_backend(ctx.device.type, ctx.backend)
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(600, 16, generator=g) * 3 + 5
    logits = torch.randn(600, 19, generator=g)
    labels = torch.randint(0, 20, (600,), generator=g)
    labels[labels == 19] = 255
    pair = DistributionPair(19, 16, ctx.device, all_reduce=_ProcessGroupSum())
    pending = pair.start_update(feats.to(ctx.device), logits.to(ctx.device), labels.to(ctx.device))
    pending.finish()
    ref = SemanticDistribution(19, 16)
    ref.update(feats.double(), labels)
    got = {k: v.cpu() for k, v in pair.feat.state_dict().items()}
    counts_equal = torch.equal(got["count"], ref.count)
    diff = max(float((got["mean"] - ref.mean).abs().max()), float((got["var"] - ref.var).abs().max()))
    vote = StopVote(ctx, collective=True)
    requested_at, agreed, launched, pinned = 2, None, False, None
    for step in range(6):
        answer = vote.vote(step >= requested_at)
        in_flight = vote._in_flight
        launched = launched or in_flight is not None
        if in_flight is not None and ctx.device.type == "cuda":
            pinned = bool(in_flight[1].is_pinned()) and in_flight[2] is not None
        if answer:
            agreed = step
            break
    vote.close()
    line = (
        f"device={ctx.device.type} backend={ctx.backend} world={ctx.world_size} counts_equal={counts_equal} "
        f"max_diff={diff:.2e} stop_requested_at={requested_at} stop_agreed_at={agreed} "
        f"vote_collective={launched} vote_pinned_event={pinned}"
    )
    judge_estimator(counts_equal, diff, line)
    judge_stop_vote(agreed, requested_at, launched, line)
    if ctx.device.type == "cuda" and not pinned:
        raise AssertionError(f"the CUDA stop vote did not copy to pinned memory behind an event: {line}")
    return line


# --------------------------------------------------------------------------------------- G3
class _Batches:
    """A resumable in-memory loader (the loaders' ``state_dict`` contract): batch ``n`` is a pure
    function of ``n``, so the resumed run sees what the uninterrupted one saw."""

    def __init__(self, batch: int, hw: tuple[int, int]) -> None:
        self.batch, self.hw, self.pos = batch, hw, 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(1000 + self.pos)
            image = torch.randn(self.batch, 3, *self.hw, generator=g)
            label = torch.randint(0, 19, (self.batch, *self.hw), generator=g)
            self.pos += 1
            yield {"image": image, "label": label}


#: how far a GPU resume may drift from the uninterrupted run where an op without a deterministic
#: CUDA kernel ran (relative to the largest weight): a few steps of atomics' rounding, not a bug
RESUME_TOLERANCE = 1e-3
NONDETERMINISTIC = "does not have a deterministic implementation"


def judge_resume(device_type: str, max_diff: float, scale: float, nondeterministic_ops: list[str], line: str) -> str:
    """Bitwise passes everywhere; on the CPU nothing else does. On a GPU a difference passes only
    when explained (ops without a deterministic kernel ran) and small; the explanation is printed."""
    if max_diff == 0.0:
        return "bitwise"
    if device_type != "cuda":
        raise AssertionError(f"CPU resume is not bitwise: {line}")
    if not nondeterministic_ops:
        raise AssertionError(f"resume differs with no nondeterministic op reported (unexplained): {line}")
    if max_diff > RESUME_TOLERANCE * max(scale, 1e-12):
        raise AssertionError(f"resume differs by more than {RESUME_TOLERANCE:g} of the weights' scale: {line}")
    return f"not bitwise, explained by ops without deterministic CUDA kernels: {'; '.join(nondeterministic_ops)}"


def _g3_train(cfg, folder: Path, steps: int, stop_after: int | None):
    """The src-style step through the real ``run_training`` (resume, checkpoints, stop vote): None
    once SIGUSR2 after step ``stop_after`` made it checkpoint and stop, else the final weights."""
    import torch
    from omegaconf import OmegaConf

    from sdca_dist.config.compose import compose_config
    from sdca_dist.engine.observe import StageObserver
    from sdca_dist.engine.preemption import Preempted
    from sdca_dist.engine.stage_context import StageContext
    from sdca_dist.engine.stages.common import make_engine
    from sdca_dist.engine.training import TrainingPlan, run_training
    from sdca_dist.method.segmentation_loss import segmentation_loss
    from sdca_dist.run_folder import RunDir

    ctx = cfg.ctx
    conf = compose_config(
        ["conf=synthetic", "stage=src", f"run_dir={folder}", f"train.iters={steps}", "train.checkpoint_every=1000"]
        + ["train.deterministic=true", "train.log_every=1000"]
    )
    OmegaConf.set_readonly(conf, False)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    observer = StageObserver("src", folder / "src", True, total_iters=steps, stream=open(os.devnull, "w"))
    sc = StageContext(cfg=conf, ctx=ctx, run=RunDir(folder), name="src", observer=observer)
    batch, hw = (2, (32, 64)) if cfg.small else (2, (256, 512))
    model = sc.build_model()
    engine = make_engine(sc, model, micro_steps=1, micro_batch=batch, freeze_bn=True)

    def step(engine, batches, it):
        b = batches["train"]
        flip = torch.rand((), device=ctx.device) < 0.5  # draws from the device RNG the checkpoint restores
        x, y = torch.where(flip, b["image"].flip(-1), b["image"]), torch.where(flip, b["label"].flip(-1), b["label"])
        with engine.micro_step(0):
            _, logits = engine(x)
            loss = segmentation_loss(logits, y, 0.75)
            engine.backward(loss)
        if stop_after is not None and it + 1 == stop_after:
            os.kill(os.getpid(), signal.SIGUSR2)
        return {"loss": loss.detach()}

    plan = TrainingPlan(schedule=sc.schedule(), engine=engine, loaders={"train": _Batches(batch, hw)}, step=step)
    try:
        run_training(sc, plan)
    except Preempted:
        return None
    finally:
        observer.close()
    return {k: v.detach().cpu() for k, v in engine.final_state().items()}


def g3_resume(cfg) -> str:
    import warnings

    import torch

    _need("hydra", "omegaconf")
    steps, stop_after = (4, 2) if cfg.small else (8, 4)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                straight = _g3_train(cfg, Path(a), steps, None)
                assert _g3_train(cfg, Path(b), steps, stop_after) is None, "the stop signal did not stop training"
                assert (Path(b) / "src" / "checkpoints").is_dir(), "no checkpoint written at the stop"
                resumed = _g3_train(cfg, Path(b), steps, None)
        finally:
            torch.use_deterministic_algorithms(False)
            torch.backends.cudnn.deterministic = False
    ops = sorted({" ".join(str(w.message).split())[:160] for w in caught if NONDETERMINISTIC in str(w.message)})
    finite = all(torch.isfinite(v).all() for v in resumed.values() if v.is_floating_point())
    floats = [k for k in straight if straight[k].is_floating_point()]
    diff = max(float((straight[k].double() - resumed[k].double()).abs().max()) for k in floats)
    scale = max(float(straight[k].double().abs().max()) for k in floats)
    line = (
        f"device={cfg.ctx.device.type} steps={steps} stopped_at={stop_after} finite={finite} "
        f"bitwise={diff == 0.0} max_diff={diff:.3e} weight_scale={scale:.3e} nondeterministic_ops={len(ops)} "
        f"s={time.time() - t0:.1f}"
    )
    assert finite, line
    return f"{line} -> {judge_resume(cfg.ctx.device.type, diff, scale, ops, line)}"


# --------------------------------------------------------------------------------------- G4
#: the first step's bf16-autocast loss may differ from the fp32 loss of the same weights and data by
#: this share (bf16 keeps 8 bits of mantissa in the autocast regions; the loss itself is fp32)
AMP_LOSS_TOLERANCE = 0.02


def judge_amp(fp32: tuple[float, float], bf16: tuple[float, float], assert_speed: bool) -> str:
    """``fp32``/``bf16``: (ms per step, first step's loss). bf16 must be faster (on a GPU) and its
    loss within :data:`AMP_LOSS_TOLERANCE` of fp32's."""
    (ms32, loss32), (ms16, loss16) = fp32, bf16
    rel = abs(loss16 - loss32) / max(abs(loss32), 1e-12)
    line = f"bf16/fp32 time={ms16 / ms32:.2f}x loss fp32={loss32:.5f} bf16={loss16:.5f} rel_diff={rel:.2e}"
    if not (rel <= AMP_LOSS_TOLERANCE):
        raise AssertionError(f"bf16 loss differs from fp32 by more than {AMP_LOSS_TOLERANCE:g}: {line}")
    if assert_speed and not ms16 < ms32:
        raise AssertionError(f"bf16 autocast is not faster than fp32: {line}")
    return line + ("" if assert_speed else " (speed not asserted on the CPU)")


def _g4_variant(cfg, amp: str, channels_last: bool, benchmark: bool, engine_name: str = "ddp") -> tuple:
    """(figure text, ms per step, the first step's source loss)."""
    import torch

    from sdca_dist.config.schema import EngineConfig, TrainConfig
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.method.objective import DistributionPair, SDCAObjective
    from sdca_dist.models import build_model

    ctx = cfg.ctx
    name, src, tgt, warm, timed = (
        ("small", (32, 64), (32, 64), 1, 1) if cfg.small else ("deeplabv2_r101", (720, 1280), (512, 1024), 3, 10)
    )
    torch.manual_seed(0)
    model = build_model(name, 19, freeze_bn=True).to(ctx.device)
    econf = EngineConfig(
        name=engine_name,
        amp=amp,
        channels_last=channels_last,
        cudnn_benchmark=benchmark,
        zero_stage=1,
        bf16=engine_name == "deepspeed",
    )
    engine = build_engine(model, ctx, econf, TrainConfig(), micro_steps=2, micro_batch=1)
    objective = SDCAObjective(DistributionPair(19, model.feature_dim, ctx.device))
    g = torch.Generator().manual_seed(0)
    s_img, t_img = (
        torch.randn(1, 3, *src, generator=g).to(ctx.device),
        torch.randn(1, 3, *tgt, generator=g).to(ctx.device),
    )
    s_lbl = torch.randint(0, 19, (1, *src), generator=g).to(ctx.device)

    losses = []

    def step() -> None:
        engine.train(True)
        with engine.micro_step(0):
            f, l = engine(s_img)
            loss = objective.source(f, l, s_lbl).loss
            engine.backward(loss)
            if not losses:
                losses.append(float(loss.detach()))
        with engine.micro_step(1):
            f, l = engine(t_img)
            engine.backward(objective.target(f, l).loss)
        engine.step(1e-4)

    for _ in range(warm):
        step()
    _sync(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(ctx.device)
    ms = (time.perf_counter() - t0) / timed * 1000
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else float("nan")
    engine.module = model = None  # free the GPU memory before the next variant
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return f"{ms:.0f}ms/{peak:.1f}GiB", ms, losses[0]


def g4_step(cfg) -> str:
    variants = [
        ("fp32", "fp32", False, False),
        ("fp32+bench", "fp32", False, True),
        ("bf16", "bf16", False, False),
        ("bf16+cl", "bf16", True, False),
        ("bf16+cl+bench", "bf16", True, True),
    ]
    if cfg.smoke:  # the code paths, not the figures: fp32 and every switch at once
        variants = [variants[0], variants[-1]]
    out = [f"{'small@32x64' if cfg.small else 'R101@1280x720+1024x512'}"]
    measured = {}
    for label, amp, cl, bench in variants:
        text, ms, loss = _g4_variant(cfg, amp, cl, bench)
        measured[label] = (ms, loss)
        out.append(f"{label}={text}")
    bf16 = "bf16" if "bf16" in measured else variants[-1][0]  # smoke: fp32 against every switch at once
    if importlib.util.find_spec("deepspeed") is None:
        out.append("deepspeed_zero1=absent")
    elif cfg.smoke:
        out.append("deepspeed_zero1=skipped(smoke)")
    else:
        out.append(f"deepspeed_zero1_bf16={_g4_variant(cfg, 'auto', False, True, engine_name='deepspeed')[0]}")
    out.append(judge_amp(measured["fp32"], measured[bf16], assert_speed=cfg.ctx.device.type == "cuda"))
    return " ".join(out)


# --------------------------------------------------------------------------------------- G5
#: how far the GPU graph's images may differ from the CPU graph's, in 8-bit levels (one level is
#: 1/255 of the range before normalisation): PNG decodes identically, so only resize/crop kernels
#: differ; nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
IMAGE_LEVELS = {"png": {"mean": 0.5, "max": 4}, "jpeg": {"mean": 2.0, "max": 32}}
LABELS_EQUAL = 0.999


def judge_images(fmt: str, mode: str, labels_equal: float, mean_levels: float, max_levels: float) -> str:
    bound = IMAGE_LEVELS[fmt]
    line = (
        f"{fmt}/{mode}: labels_equal={labels_equal:.4f} image_diff_levels mean={mean_levels:.2f} "
        f"max={max_levels:.1f} (bounds {LABELS_EQUAL}, {bound['mean']}, {bound['max']})"
    )
    if labels_equal < LABELS_EQUAL or mean_levels > bound["mean"] or max_levels > bound["max"]:
        raise AssertionError(f"the two graphs disagree: {line}")
    return line


def _synthetic_shards(root: Path, n: int, wh: tuple[int, int], fmt: str) -> Path:
    from sdca_dist.shard import shard_command
    from sdca_dist.synth import synth_command

    raw, shards = root / "raw", root / f"shards-{fmt}"
    if not raw.is_dir():
        subprocess.run(synth_command(raw, (n, n, 2), wh, wh, workers=4), check=True, capture_output=True)
    cmd = shard_command("gta5", raw / "gta5", "train", shards / "src", workers=4)
    subprocess.run(cmd + ["--quiet", "--image-format", fmt], check=True, capture_output=True)
    return shards / "src" / "manifest.json"


def _g5_loader(manifest: Path, device: str, train: bool, cfg, second: bool = False, seed: int = 3):
    """One graph of the comparison (``second``: the graph compared against the CPU one)."""
    from sdca_dist.data.loader import ShardLoader

    resize, crop = ((64, 128), (32, 64)) if cfg.small else ((720, 1280), (512, 1024))
    kw = dict(resize=resize, crop_size=crop, scale_range=(0.5, 1.5)) if train else dict(resize=resize)
    return ShardLoader(
        manifest, 4, device=device, cuda_device=cfg.ctx.device, train=train, flip=train, seed=seed, num_threads=2, **kw
    )


def g5_dali(cfg) -> str:
    _need("nvidia.dali", "webdataset")
    import torch

    cuda = cfg.ctx.device.type == "cuda"
    if not cuda and not cfg.smoke:
        raise Skip("needs a GPU (DALI's GPU graph)")
    other = "gpu" if cuda else "cpu"  # on the CPU: the comparison itself, CPU graph against CPU graph
    n, wh = (8, (128, 64)) if cfg.small else (16, (1914, 1052))
    level = 1.0 / (255 * min(0.229, 0.224, 0.225))  # one 8-bit level in normalised units (smallest std)
    out, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpeg", "png"):
            manifest = _synthetic_shards(Path(tmp), n, wh, fmt)
            for train in (True, False):
                got = {}
                for key, device in (("cpu", "cpu"), ("other", other)):
                    loader = _g5_loader(manifest, device, train, cfg, second=key == "other")
                    it = iter(loader)
                    t0 = time.perf_counter()
                    got[key] = [{k: v.cpu() for k, v in next(it).items() if k in ("image", "label")} for _ in range(2)]
                    _sync(cfg.ctx.device)
                    rates[f"{fmt}_{device}"] = 8 / (time.perf_counter() - t0)
                pairs = list(zip(got["cpu"], got["other"]))
                labels = sum(float((a["label"] == b["label"]).float().mean()) for a, b in pairs) / len(pairs)
                d = [(a["image"].float() - b["image"].float()).abs() for a, b in pairs]
                mean = float(torch.stack([x.mean() for x in d]).mean()) / level
                peak = max(float(x.max()) for x in d) / level
                out.append(judge_images(fmt, "train" if train else "eval", labels, mean, peak))
    speed = " ".join(f"img_per_s_{k}={v:.0f}" for k, v in rates.items())
    return f"graphs=cpu-vs-{other} " + "; ".join(out) + f"; {speed}"


# --------------------------------------------------------------------------------------- G6
#: variables that make ``python -m sdca_dist.train`` join a process group instead of starting its
#: own: this process's group (``init_distributed`` exports them) or a SLURM step's
RANK_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_JOB_ID",
)


def clean_child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the rank variables (and torchrun's TORCHELASTIC_*): a child started from
    here is a fresh single process, not a second rank 0 on this process's store port."""
    return {k: v for k, v in env.items() if k not in RANK_VARIABLES and not k.startswith("TORCHELASTIC_")}


def g6_chain(cfg) -> str:
    _need("nvidia.dali", "hydra", "omegaconf", "webdataset", "cityscapesscripts")
    import torch

    cuda = cfg.ctx.device.type == "cuda"
    if not cuda and not cfg.smoke:
        raise Skip("needs a GPU")
    stages = ("src", "dist_init", "sdca") if cuda else ("src",)
    counts = "[48,48,24]" if cuda else "[8,8,4]"
    iters = "20" if cuda else "2"
    env = clean_child_env(dict(os.environ))
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            "conf=synthetic",
            "cluster=local",
            f"run_dir={tmp}/run",
            f"data.shards_root={tmp}/shards",
            f"data.synthetic_counts={counts}",
            f"src.iters={iters}",
            f"sdca.iters={iters}",
        ]
        if not cuda:  # tiny: the code path, not the figures
            common += [
                "data.synthetic_source_size=[72,144]",
                "data.synthetic_target_size=[64,128]",
                "data.source_resize=[64,128]",
                "data.target_resize=[64,128]",
                "data.eval_resize=[64,128]",
                "src.batch_size=4",
                "train.eval_batch_size=4",
            ]
        t0 = time.time()
        for stage in stages:
            r = subprocess.run(
                [sys.executable, "-m", "sdca_dist.train", f"stage={stage}", *common],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, f"stage {stage} exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        last = stages[-1]
        state = torch.load(f"{tmp}/run/{last}/model_final.pt", weights_only=True)
        finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert finite, f"{last} model_final.pt has non-finite weights"
        return f"{'+'.join(stages)} exit 0 on {cfg.ctx.device.type}, weights finite, s={time.time() - t0:.0f}"


# --------------------------------------------------------------------------------------- G7
def _g7_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    from sdca_dist.data.loader import pipeline_device_id
    from sdca_dist.engine.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("auto", require_cuda=True)
    t = torch.full((1,), float(rank + 1), device=ctx.device)
    dist.all_reduce(t)
    with open(f"{out}/{rank}.txt", "w") as f:
        f.write(f"{ctx.device} {ctx.backend} {float(t)} {pipeline_device_id('gpu', ctx.device)}")
    shutdown_distributed()


def g7_two_gpus(cfg) -> str:
    import torch
    import torch.multiprocessing as mp

    if cfg.ctx.device.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_g7_rank, args=(2, _free_port(), out), nprocs=2, join=True)
        rows = [Path(f"{out}/{r}.txt").read_text().split() for r in range(2)]
    line = " ".join(f"rank{r}:{row[0]}/{row[1]}/sum={row[2]}/dali_device={row[3]}" for r, row in enumerate(rows))
    assert rows[0][0] != rows[1][0] and all(row[2] == "3.0" for row in rows) and [r[3] for r in rows] == ["0", "1"], (
        line
    )
    return line


ITEMS = [g0_environment, g1_ddp_engine, g2_collectives, g3_resume, g4_step, g5_dali, g6_chain, g7_two_gpus]


# --------------------------------------------------------------------------------------- wheels
def write_wheels(folder: Path, box_python: str = "3.12") -> int:
    """``pip wheel --no-deps`` of :data:`WHEELS` at this machine's installed versions, plus
    :data:`BOX_BINARY` built for the box's Python (manylinux x86_64); refuses a total over the
    carry limit or a compiled wheel for another Python."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name in WHEELS:
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            specs.append(name)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), *specs],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"wheels: pip wheel failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    abi = "cp" + box_python.replace(".", "")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary=:all:", "-d", str(folder)]
        + ["--python-version", box_python, "--implementation", "cp", "--abi", abi]
        + ["--platform", "manylinux_2_17_x86_64", *BOX_BINARY],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"wheels: pip download failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    wheels = sorted(folder.glob("*.whl"))
    impure = [w.name for w in wheels if not (w.name.endswith("-none-any.whl") or f"-{abi}-" in w.name)]
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"wheels: {len(wheels)} in {folder}, {total:.1f} MiB (limit {WHEELS_LIMIT_MIB} MiB)")
    if impure or total > WHEELS_LIMIT_MIB:
        print(f"wheels: not carriable: {', '.join(impure) or f'{total:.1f} MiB'}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------- main
class _Run:
    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.small = smoke
        self.ctx = None


def run_item(item, run: _Run) -> tuple[str, str]:
    """(PASS|FAIL|SKIP, figures) of one item: an item's failure is its line, the next item still runs."""
    try:
        return "PASS", item(run)
    except Skip as exc:
        return "SKIP", str(exc)
    except Exception as exc:  # noqa: BLE001
        return "FAIL", " ".join(f"{type(exc).__name__}: {exc}".split())[:900]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="run the items on the CPU at tiny sizes; GPU items SKIP")
    p.add_argument("--wheels", type=Path, metavar="DIR", help="write the pure-Python wheels a GPU box lacks, then exit")
    p.add_argument("--box-python", default="3.12", help="--wheels: the GPU box's Python version")
    p.add_argument("--only", default="", help="comma-separated item numbers, e.g. 0,1,3")
    args = p.parse_args(argv)
    if args.wheels:
        return write_wheels(args.wheels, args.box_python)
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is initialised: a CPU run even on a GPU box
    import torch

    from sdca_dist.engine.distributed import init_distributed, shutdown_distributed

    for k in RANK_VARIABLES:  # the check is one fresh process, whatever shell it was started from
        os.environ.pop(k, None)
    torch.set_num_threads(min(4, os.cpu_count() or 1) if args.smoke else (os.cpu_count() or 1))
    run = _Run(args.smoke)
    run.ctx = init_distributed("auto")
    only = {int(x) for x in args.only.split(",") if x.strip()}
    failed = False
    try:
        for n, item in enumerate(ITEMS):
            if only and n not in only:
                continue
            t0 = time.time()
            status, figures = run_item(item, run)
            failed = failed or status == "FAIL"
            print(f"G{n} {status} {figures} ({time.time() - t0:.0f}s)", flush=True)
    finally:
        shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
