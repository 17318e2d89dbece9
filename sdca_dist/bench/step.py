"""``python -m sdca_dist.bench step``: sdca-stage training throughput, 1 vs 2 ranks, and the
share of step time spent in the estimator all-reduce.

Two measurements, each in real gloo process groups spawned here (same machine, same inputs):

1. the synthetic benchmark: the real sdca step (``SDCAStep``: two micro-steps, estimator update,
   four contrastive losses) on the small model with DALI batches from synthetic shards, with 1 and
   2 ranks: images/s and the all-reduce share;
2. ResNet-101 feature size: DeepLabV2-R101 (A = 2048 features) with 2 ranks on random images
   (``--r101-size``, default 256x512: a SMALLER image than the real 1280x720, so a SHORTER step and
   a conservative, i.e. larger, share): step time and all-reduce time.

The all-reduce is timed through the estimator's injected collective seam, so it is exactly the
one all-reduce per step that carries the per-class counts, sums and second moments of both levels.
Last line: ``allreduce share: X%`` at ResNet-101 feature size (goal <= 1%).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdca_dist.arguments import int_at_least, parser


class TimedAllReduce:
    """The estimator's all-reduce seam with a stopwatch (sum over the calls).

    Synchronous as a call; ``start(tensor)`` (what the sdca step uses: the all-reduce in flight
    during the segmentation loss) times what the rank actually waits: the launch plus the
    ``wait()``, not the time the collective travels behind other work.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0

    def __call__(self, tensor: torch.Tensor) -> None:
        self.start(tensor).wait()

    def start(self, tensor: torch.Tensor):
        t0 = time.perf_counter()
        work = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(tensor, async_op=True)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes = tensor.numel() * tensor.element_size()
        timer = self

        class _Waiting:
            def wait(self) -> None:
                t1 = time.perf_counter()
                if work is not None:
                    work.wait()
                timer.seconds += time.perf_counter() - t1

        return _Waiting()


def _worker(rank: int, world: int, init_file: str, mode: str, args: dict, results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from sdca_dist.engine.distributed import DistContext
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.engine.stages.distributions import DistributionPair
    from sdca_dist.engine.stages.sdca import SDCAStep
    from sdca_dist.models import build_model

    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    torch.manual_seed(0)
    name = "small" if mode == "synthetic" else "deeplabv2_r101"
    model = build_model(name, 19, freeze_bn=True)
    from sdca_dist.config.schema import EngineConfig, TrainConfig

    engine = build_engine(model, ctx, EngineConfig(name="ddp"), TrainConfig(), micro_steps=2, micro_batch=1)
    timer = TimedAllReduce()
    dists = DistributionPair(19, model.feature_dim, ctx.device, all_reduce=timer)
    step = SDCAStep(dists)
    if mode == "synthetic":
        from sdca_dist.data.loader import ShardLoader

        shards = Path(args["shards"])
        per_rank = args["batch"] // world
        size = tuple(args["size"])
        src = iter(
            ShardLoader(
                shards / "gta5_train" / "manifest.json",
                per_rank,
                rank=rank,
                world_size=world,
                train=True,
                resize=size,
                photometric=True,
                class_balanced=True,
                seed=1,
                num_threads=1,
            )
        )
        tgt = iter(
            ShardLoader(
                shards / "cityscapes_train" / "manifest.json",
                per_rank,
                rank=rank,
                world_size=world,
                train=True,
                resize=size,
                seed=2,
                num_threads=1,
            )
        )
        batches = lambda: {"source": next(src), "target": next(tgt)}  # noqa: E731
        images_per_step = 2 * per_rank * world
    else:
        h, w = args["r101_size"]
        g = torch.Generator().manual_seed(rank)
        fixed = {
            "source": {
                "image": torch.randn(1, 3, h, w, generator=g),
                "label": torch.randint(0, 19, (1, h, w), generator=g),
            },
            "target": {"image": torch.randn(1, 3, h, w, generator=g)},
        }
        batches = lambda: fixed  # noqa: E731
        images_per_step = 2 * world
    warmup, iters = args["warmup"], args["iters"]
    for i in range(warmup + iters):
        if i == warmup:
            dist.barrier()
            timer.seconds, timer.calls = 0.0, 0
            data_s = 0.0
            t0 = time.perf_counter()
        td = time.perf_counter()
        b = batches()
        if i >= warmup:
            data_s += time.perf_counter() - td
        engine.train(True)
        step(engine, b, i)
        engine.step(1e-4)
    dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        results.put(
            {
                "mode": mode,
                "world": world,
                "step_s": wall / iters,
                "images_per_s": images_per_step * iters / wall,
                "allreduce_s": timer.seconds / iters,
                "allreduce_calls": timer.calls / iters,
                "allreduce_bytes": timer.bytes,
                "data_share": data_s / wall,
            }
        )
    dist.destroy_process_group()


def _measure(world: int, mode: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init, mode, args, q)) for r in range(world)]
        for p in procs:
            p.start()
        result = None
        while result is None:
            try:
                result = q.get(timeout=5)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a rank crashed: the others would wait in a collective forever
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a benchmark rank exited with code {dead[0]} ({mode}, {world} ranks)")
        for p in procs:
            p.join()
    return result


def _synthetic_shards(root: Path) -> None:
    from sdca_dist.config import compose_config
    from sdca_dist.data.sets import ensure_synthetic_shards

    cfg = compose_config(["conf=synthetic", f"data.shards_root={root}", "data.synthetic_counts=[32,32,4]"])
    ensure_synthetic_shards(cfg, log=lambda m: print(f"  {m}", flush=True))


def main(argv: list[str]) -> int:
    ap = parser("python -m sdca_dist.bench step", __doc__.splitlines()[0])
    ap.add_argument("--iters", type=int_at_least(1), default=10, help="timed steps on the synthetic benchmark")
    ap.add_argument(
        "--batch", type=int_at_least(2), default=4, help="GLOBAL source (= target) batch, synthetic benchmark (even)"
    )
    # sizes: the small model's output stride is 8, so at least one feature row and column
    ap.add_argument("--size", type=int_at_least(8), nargs=2, default=[128, 256], metavar=("H", "W"))
    ap.add_argument("--r101-iters", type=int_at_least(1), default=2)
    ap.add_argument("--r101-size", type=int_at_least(8), nargs=2, default=[256, 512], metavar=("H", "W"))
    a = ap.parse_args(argv)
    if a.batch % 2:
        ap.error(f"argument --batch: must split over 1 and 2 ranks (even), got {a.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        print("preparing synthetic shards ...", flush=True)
        _synthetic_shards(Path(tmp))
        args = {"shards": tmp, "batch": a.batch, "size": a.size, "warmup": 2, "iters": a.iters}
        rows = [_measure(w, "synthetic", args) for w in (1, 2)]
    r101 = _measure(2, "r101", {"r101_size": a.r101_size, "warmup": 1, "iters": a.r101_iters})
    print(
        f"\nsdca step, synthetic benchmark (small model, {a.size[0]}x{a.size[1]}, "
        f"global batch {a.batch}+{a.batch}, gloo, CPU)"
    )
    print(f"{'ranks':>5} {'step s':>8} {'images/s':>9} {'all-reduce ms':>14} {'share':>7} {'data share':>10}")
    for r in rows:
        print(
            f"{r['world']:>5} {r['step_s']:>8.3f} {r['images_per_s']:>9.1f} {1e3 * r['allreduce_s']:>14.2f} "
            f"{100 * r['allreduce_s'] / r['step_s']:>6.2f}% {100 * r['data_share']:>9.1f}%"
        )
    print(
        f"2-rank / 1-rank throughput: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x "
        f"(2 ranks share the same {os.cpu_count()} cores here)"
    )
    share = r101["allreduce_s"] / r101["step_s"]
    print(
        f"\nResNet-101 feature size (A=2048 + output level, C=19), DeepLabV2-R101, 2 ranks, "
        f"{a.r101_size[0]}x{a.r101_size[1]} source+target, batch 1+1 per rank:"
    )
    print(
        f"  step {r101['step_s']:.2f} s, estimator all-reduce {1e3 * r101['allreduce_s']:.2f} ms "
        f"({r101['allreduce_calls']:.0f} call/step, {r101['allreduce_bytes'] / 2**20:.2f} MiB)"
    )
    print(f"allreduce share: {100 * share:.3f}%")
    return 0
