"""GPU check: the checklist of a 5-minute run on ONE GPU. CI never runs it on a GPU.

    python tests/gpu/gpu_check.py                 # on a GPU machine, with its own torch
    python tests/gpu/gpu_check.py --smoke         # the same items on the CPU (GPU items SKIP)
    python tests/gpu/gpu_check.py --wheels DIR    # the pure-Python wheels a locked-down GPU box lacks

Each item prints one line ``G<n> PASS|FAIL|SKIP <figures>``; the exit status is 1 if any item
FAILs. An item that needs a package the machine lacks (DALI, DeepSpeed, Hydra, ...) SKIPs and
names it; the others still run. Items:

G0 environment: torch, CUDA, cuDNN, NCCL, driver, GPU (FAIL on a CPU build of torch)
G1 the DDP engine on NCCL (world size 1): builds with the installed torch's keywords and steps
G2 estimator update on the device vs a CPU float64 reference (counts equal, max diff < 1e-9), and
   the async estimator all-reduce + wait and the stop vote through real collectives (2 ranks)
G3 a short src-style training on the device stopped by SIGUSR2, checkpointed, resumed from the
   checkpoint loaded onto the device: completes, weights finite; with train.deterministic
   bitwise equal to an uninterrupted run, else the difference printed
G4 DeepLabV2-R101 sdca step at full resolution (1280x720 + 1024x512, batch 1+1): ms/step and peak
   GiB for fp32, bf16 autocast, channels_last, cudnn.benchmark on/off; DeepSpeed ZeRO-1 bf16
G5 DALI GPU training graph vs CPU decoding: labels equal, image difference (SKIP without DALI)
G6 the synthetic chain src -> dist_init -> sdca through the CLI on CUDA (SKIP without DALI/Hydra)
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
def g0_environment(cfg) -> str:
    import torch

    figures = [f"torch={torch.__version__}", f"cuda={torch.version.cuda}"]
    if not torch.cuda.is_available():
        if cfg.smoke:
            raise Skip(" ".join(figures + ["(smoke: CPU run)"]))
        raise AssertionError(" ".join(figures + ["torch.cuda.is_available() is False (CPU build or old driver)"]))
    props = torch.cuda.get_device_properties(0)
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version()) if hasattr(torch.cuda, "nccl") else "?"
    driver = "?"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split()[0]
    except (OSError, IndexError):
        pass
    figures += [
        f"cudnn={torch.backends.cudnn.version()}",
        f"nccl={nccl}",
        f"driver={driver}",
        f"gpus={torch.cuda.device_count()}",
        f"gpu={props.name.replace(' ', '_')}",
        f"mem_gib={props.total_memory / 2**30:.0f}",
    ]
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
def _g2_rank(rank: int, world: int, port: int, device_type: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from sdca_dist.engine.distributed import DistContext, StopVote
    from sdca_dist.method.objective import DistributionPair

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(world, 300, 16, generator=g) * 3 + 5
    logits = torch.randn(world, 300, 19, generator=g)
    labels = torch.randint(0, 20, (world, 300), generator=g)
    labels[labels == 19] = 255
    pair = DistributionPair(19, 16, device)
    pending = pair.start_update(feats[rank].to(device), logits[rank].to(device), labels[rank].to(device))
    pending.finish()
    vote = StopVote(DistContext(rank, world, rank, device, "gloo"))
    agreed = None
    for step in range(6):
        if vote.vote(rank == 1 and step >= 2):
            agreed = step
            break
    vote.close()
    torch.save({"state": {k: v.cpu() for k, v in pair.feat.state_dict().items()}, "agreed": agreed}, f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def g2_estimator(cfg) -> str:
    import torch
    import torch.multiprocessing as mp

    from sdca_dist.method.distribution import SemanticDistribution

    world = 2
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_g2_rank, args=(world, _free_port(), cfg.ctx.device.type, out), nprocs=world, join=True)
        results = [torch.load(f"{out}/{r}.pt", weights_only=True) for r in range(world)]
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(world, 300, 16, generator=g) * 3 + 5
    torch.randn(world, 300, 19, generator=g)
    labels = torch.randint(0, 20, (world, 300), generator=g)
    labels[labels == 19] = 255
    ref = SemanticDistribution(19, 16)
    ref.update(feats.reshape(-1, 16).double(), labels.reshape(-1))
    got = results[0]["state"]
    same_ranks = all(torch.equal(results[1]["state"][k], got[k]) for k in got)
    counts_equal = torch.equal(got["count"], ref.count)
    diff = max(float((got["mean"] - ref.mean).abs().max()), float((got["var"] - ref.var).abs().max()))
    agreed = [r["agreed"] for r in results]
    ok = counts_equal and diff < 1e-9 and same_ranks and agreed == [3, 3]
    line = (
        f"device={cfg.ctx.device.type} ranks=2 counts_equal={counts_equal} max_diff={diff:.2e} "
        f"ranks_identical={same_ranks} stop_vote_steps={agreed}"
    )
    assert ok, line
    return line


# --------------------------------------------------------------------------------------- G3
def _g3_train(cfg, folder: Path, steps: int, stop_after: int | None):
    """Train ``steps`` steps (resuming from ``folder`` if it holds a checkpoint); with
    ``stop_after``, SIGUSR2 arrives after that step, a checkpoint is written and None returned."""
    import torch

    from sdca_dist.config.schema import EngineConfig, TrainConfig
    from sdca_dist.engine.checkpoint import Checkpointer, rng_state, set_rng_state
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.engine.preemption import StopSignal
    from sdca_dist.method.segmentation_loss import segmentation_loss
    from sdca_dist.models import build_model

    ctx = cfg.ctx
    name, (h, w), batch = ("small", (32, 64), 2) if cfg.small else ("deeplabv2_r101", (256, 512), 2)
    torch.manual_seed(0)
    model = build_model(name, 19, freeze_bn=True).to(ctx.device)
    engine = build_engine(model, ctx, EngineConfig(), TrainConfig(deterministic=True), micro_steps=1, micro_batch=batch)
    ck = Checkpointer(folder, ctx, log=lambda m: None)
    start = 0
    latest = ck.latest_valid()
    if latest is not None:
        common, mine = ck.load(latest, map_location=ctx.device)
        engine.load(common["model"], common.get("optimizer"), mine.get("optimizer"))
        set_rng_state(mine["rng"])
        start = int(common["iteration"])
    with StopSignal() as stop:
        for it in range(start, steps):
            g = torch.Generator().manual_seed(1000 + it)
            x = torch.randn(batch, 3, h, w, generator=g).to(ctx.device)
            y = torch.randint(0, 19, (batch, h, w), generator=g).to(ctx.device)
            flip = torch.rand((), device=ctx.device) < 0.5  # draws from the device RNG the checkpoint restores
            x, y = torch.where(flip, x.flip(-1), x), torch.where(flip, y.flip(-1), y)
            with engine.micro_step(0):
                _, logits = engine(x)
                engine.backward(segmentation_loss(logits, y, 0.75))
            engine.step(1e-3 * (1 - it / steps) ** 0.9)
            if stop_after is not None and it + 1 == stop_after:
                os.kill(os.getpid(), signal.SIGUSR2)
            if stop.requested:
                common_opt, rank_opt = engine.optimizer_state()
                ck.save(
                    it + 1,
                    {"iteration": it + 1, "model": engine.model_state(), "optimizer": common_opt},
                    {"optimizer": rank_opt, "rng": rng_state()},
                )
                return None
    return {k: v.detach().cpu() for k, v in engine.final_state().items()}


def g3_resume(cfg) -> str:
    import torch

    steps, stop_after = (4, 2) if cfg.small else (8, 4)
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            straight = _g3_train(cfg, Path(a), steps, None)
            assert _g3_train(cfg, Path(b), steps, stop_after) is None, "the stop signal did not stop training"
            resumed = _g3_train(cfg, Path(b), steps, None)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    finite = all(torch.isfinite(v).all() for v in resumed.values() if v.is_floating_point())
    diff = max(
        float((straight[k].double() - resumed[k].double()).abs().max())
        for k in straight
        if straight[k].is_floating_point()
    )
    line = (
        f"device={cfg.ctx.device.type} steps={steps} stopped_at={stop_after} finite={finite} "
        f"bitwise={diff == 0.0} max_diff={diff:.3e} s={time.time() - t0:.1f}"
    )
    assert finite, line
    if cfg.ctx.device.type == "cpu":
        assert diff == 0.0, line  # the CPU promise: bitwise resume
    return line


# --------------------------------------------------------------------------------------- G4
def _g4_variant(cfg, amp: str, channels_last: bool, benchmark: bool, engine_name: str = "ddp") -> str:
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

    def step() -> None:
        engine.train(True)
        with engine.micro_step(0):
            f, l = engine(s_img)
            engine.backward(objective.source(f, l, s_lbl).loss)
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
    return f"{ms:.0f}ms/{peak:.1f}GiB"


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
    for label, amp, cl, bench in variants:
        out.append(f"{label}={_g4_variant(cfg, amp, cl, bench)}")
    if importlib.util.find_spec("deepspeed") is None:
        out.append("deepspeed_zero1=absent")
    elif cfg.smoke:
        out.append("deepspeed_zero1=skipped(smoke)")
    else:
        out.append(f"deepspeed_zero1_bf16={_g4_variant(cfg, 'auto', False, True, engine_name='deepspeed')}")
    return " ".join(out)


# --------------------------------------------------------------------------------------- G5
def _synthetic_shards(root: Path, n: int, size: tuple[int, int]) -> Path:
    from sdca_dist.shard import shard_command
    from sdca_dist.synth import synth_command

    raw, shards = root / "raw", root / "shards"
    subprocess.run(synth_command(raw, (n, n, 2), size, size, workers=4), check=True, capture_output=True)
    subprocess.run(
        shard_command("gta5", raw / "gta5", "train", shards / "src", workers=4) + ["--quiet"],
        check=True,
        capture_output=True,
    )
    return shards / "src" / "manifest.json"


def g5_dali(cfg) -> str:
    if cfg.ctx.device.type != "cuda":
        raise Skip("needs a GPU (DALI's GPU graph)")
    _need("nvidia.dali", "webdataset")
    from sdca_dist.data.loader import ShardLoader

    with tempfile.TemporaryDirectory() as tmp:
        manifest = _synthetic_shards(Path(tmp), 16, (1052, 1914))
        kw = dict(train=True, resize=(720, 1280), crop_size=(512, 1024), scale_range=(0.5, 1.5), flip=True, seed=3)
        out = {}
        for device in ("cpu", "gpu"):
            loader = ShardLoader(manifest, 4, device=device, cuda_device=cfg.ctx.device, **kw)
            it = iter(loader)
            batches = [next(it) for _ in range(3)]
            t0 = time.perf_counter()
            for _ in range(4):
                next(it)
            _sync(cfg.ctx.device)
            out[device] = (batches, 16 / (time.perf_counter() - t0))
    (cpu, rate_cpu), (gpu, rate_gpu) = out["cpu"], out["gpu"]
    labels_equal = sum(float((a["label"].cpu() == b["label"].cpu()).float().mean()) for a, b in zip(cpu, gpu)) / 3
    img_diff = max(float((a["image"].cpu() - b["image"].cpu()).abs().max()) for a, b in zip(cpu, gpu))
    line = (
        f"labels_equal={labels_equal:.4f} image_max_diff={img_diff:.3f} "
        f"img_per_s_cpu={rate_cpu:.0f} img_per_s_gpu={rate_gpu:.0f}"
    )
    assert labels_equal > 0.99, line
    return line


# --------------------------------------------------------------------------------------- G6
def g6_chain(cfg) -> str:
    if cfg.ctx.device.type != "cuda":
        raise Skip("needs a GPU")
    _need("nvidia.dali", "hydra", "omegaconf", "webdataset", "cityscapesscripts")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        common = [
            "conf=synthetic",
            "cluster=local",
            f"run_dir={tmp}/run",
            f"data.shards_root={tmp}/shards",
            "data.synthetic_counts=[48,48,24]",
            "src.iters=20",
            "sdca.iters=20",
        ]
        t0 = time.time()
        for stage in ("src", "dist_init", "sdca"):
            r = subprocess.run(
                [sys.executable, "-m", "sdca_dist.train", f"stage={stage}", *common],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, f"stage {stage} exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        state = torch.load(f"{tmp}/run/sdca/model_final.pt", weights_only=True)
        finite = all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert finite, "sdca model_final.pt has non-finite weights"
        return f"src+dist_init+sdca exit 0, weights finite, s={time.time() - t0:.0f}"


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


ITEMS = [g0_environment, g1_ddp_engine, g2_estimator, g3_resume, g4_step, g5_dali, g6_chain, g7_two_gpus]


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

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
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
            try:
                status, figures = "PASS", item(run)
            except Skip as exc:
                status, figures = "SKIP", str(exc)
            except Exception as exc:  # noqa: BLE001 - an item's failure is its line, the next item still runs
                status, figures = "FAIL", " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
                failed = True
            print(f"G{n} {status} {figures} ({time.time() - t0:.0f}s)", flush=True)
    finally:
        shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
