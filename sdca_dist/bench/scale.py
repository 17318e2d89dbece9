"""``python -m sdca_dist.bench scale``: data-parallel scaling of the sdca step, 1 rank vs 2 ranks.

The same GLOBAL batch (default 4 source + 4 target, as ``conf=synthetic``) is trained on 1 rank
and on 2 ranks (real gloo process groups spawned here, one torch thread per rank:
``OMP_NUM_THREADS=1``), and the throughput in images/s of the sdca step is compared:

    scaling efficiency = images/s on 2 ranks / (2 x images/s on 1 rank)

Each timed step is the sdca stage's loop body (``engine.training.run_training``): the next source
and target batches from DALI ``ShardLoader``s over synthetic shards (class-balanced, photometric
source; uniform target), the real ``SDCAStep`` (two micro-steps on the DDP engine, gradients
all-reduced once after the second; the estimators updated with the GLOBAL batch through ONE
all-reduce, launched before the segmentation loss and awaited after it), the SGD step with the
poly LR, and the loop's stop vote (asynchronous, read one step later: ``StopVote``). Warm-up steps
(pipeline build, first allocations) are excluded. The step is split into phases per rank (data,
forward+backward, optimiser, collectives) so a miss of the goal can be attributed; ``--profile``
also times the DDP gradient all-reduce through a comm hook that does what DDP's built-in hook
does (average over ranks), with a stopwatch.

Resources per rank: each rank (its main thread and its DALI and gloo threads) is bound to one core
of its own (``--no-pin`` leaves them unbound), as ``srun --cpu-bind=cores`` binds the tasks of a
CPU job. Unbound, the 1-rank run also uses the idle second core for its DALI threads, so its
baseline has more than one core's worth of CPU (about 1.07) and the ratio understates scaling.

Attribution: per rank, the main thread's wall time per step is split (Linux schedstat) into time
on a CPU, time runnable but waiting for a CPU, and time blocked (collectives, data); the CPU used
by OTHER programs during each run is reported, because on a 2-core machine a 2-rank run has no
spare core to absorb it while a 1-rank run has one: such load lowers the efficiency shown.

A second, larger global batch (``--batches 4 8``: 8 + 8) shows how efficiency grows with the
per-rank batch, i.e. what part of the step is a fixed per-step cost.

Robustness: a rank that dies makes the benchmark fail at once with one line (the survivor would
otherwise wait in a collective forever). Last line: ``scaling efficiency: NN%`` for the FIRST
batch of ``--batches`` (goal >= 85% on a 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdca_dist import arguments
from sdca_dist.bench.step import TimedAllReduce
from sdca_dist.shard import shard_command
from sdca_dist.synth import synth_command

#: per-rank phase names, in step order (seconds summed over the timed steps)
PHASES = ("data", "step", "optimizer", "flag")


class _GradHookTimer:
    """DDP comm hook = DDP's default (sum, then divide by the world size) plus a stopwatch from
    the bucket's launch to its completion (the wait a rank sees at the end of backward)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.buckets = 0

    def hook(self, state, bucket):  # no annotations: DDP checks them, and they are strings here
        t0 = time.perf_counter()
        world = dist.get_world_size()
        buf = bucket.buffer().div_(world)
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f):
            self.seconds += time.perf_counter() - t0
            self.buckets += 1
            return f.value()[0]

        return fut.then(done)


def _main_thread_sched() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread, from
    /proc/thread-self/schedstat (zeros where unavailable). Wall time minus both is time the thread
    was blocked: in a collective, waiting for data, or sleeping."""
    try:
        on_cpu, waiting, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name of this process (Linux /proc; empty elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in tasks:
        try:
            stat = Path(f"/proc/self/task/{t}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _print_thread_cpu(rank: int, world: int, start: dict[str, float], iters: int) -> None:
    end = _thread_cpu()
    per = {k: 1e3 * (v - start.get(k, 0.0)) / iters for k, v in end.items()}
    busy = ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.5)
    print(f"  [profile] {world} rank(s), rank {rank}: CPU ms per step by thread: {busy}", flush=True)


def _latency_ms(model: torch.nn.Module, feature_dim: int, repeats: int = 20) -> list[float]:
    """Pure transfer time of the step's collectives, ranks in lock step (barrier before each):
    [gradient all-reduce (one flat buffer of every trainable parameter), estimator all-reduce
    (counts, sums, second moments of both levels), stop flag]. What a rank waits beyond these
    in the timed steps is imbalance: the other rank was still computing."""
    grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    # update_distributions packs [count, sum, sum of squares] of both levels into one float64 buffer
    estimator = torch.zeros(2 * 19 + 2 * 19 * feature_dim + 2 * 19 * 19, dtype=torch.float64)
    flag = torch.zeros(1)
    out = []
    for t in (grads, estimator, flag):
        total = 0.0
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            total += time.perf_counter() - t0
        out.append(1e3 * total / repeats)
    return out


def _worker(rank: int, world: int, init_file: str, args: dict, results) -> None:
    """One rank. An exception is reported to the parent as one line (``("error", rank, text)``)
    and ends the process with code 1; the parent decides which rank's failure is the cause."""
    try:
        _run_rank(rank, world, init_file, args, results)
    except BaseException as e:  # noqa: BLE001 - reported, never swallowed: the process exits 1
        text = str(e).strip().splitlines()
        results.put(("error", rank, f"{type(e).__name__}: {text[0] if text else ''}"))
        results.close()
        results.join_thread()  # the queue's feeder thread must deliver it before the hard exit
        os._exit(1)  # no interpreter teardown: DALI / gloo threads may still be blocked


def _ddp_engine(build_engine, model, ctx, per_rank: int):
    """The sdca stage's DDP engine: SGD momentum 0.9, weight decay 5e-4, classifier LR x10, two
    micro-steps (one source, one target) with frozen BN, as the sdca stage builds it."""
    from sdca_dist.config.schema import EngineConfig, TrainConfig

    return build_engine(
        model,
        ctx,
        EngineConfig(name="ddp"),
        TrainConfig(momentum=0.9, weight_decay=5e-4, classifier_lr_mult=10.0),
        micro_steps=2,
        micro_batch=per_rank,
        freeze_bn=True,
    )


def _run_rank(rank: int, world: int, init_file: str, args: dict, results) -> None:
    # one compute thread per rank; OMP_NUM_THREADS=1 is already in the environment (set by the
    # parent before spawning, so it holds from the moment torch is imported here)
    torch.set_num_threads(1)
    if args["pin"]:  # before gloo and DALI start their threads: they inherit the rank's one core
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from sdca_dist.data.loader import ShardLoader
    from sdca_dist.engine.distributed import DistContext, StopVote
    from sdca_dist.engine.model_engine import build_engine
    from sdca_dist.engine.schedule import poly_lr
    from sdca_dist.engine.stages.sdca import SDCAStep
    from sdca_dist.engine.training import _to_device
    from sdca_dist.method.objective import DistributionPair
    from sdca_dist.models import build_model

    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    torch.manual_seed(0)
    model = build_model("small", 19, freeze_bn=True)
    per_rank = args["batch"] // world
    engine = _ddp_engine(build_engine, model, ctx, per_rank)
    grad_timer = None
    if args["profile"] and world > 1:
        grad_timer = _GradHookTimer()
        engine.wrapped.register_comm_hook(None, grad_timer.hook)
    est_timer = TimedAllReduce()
    vote = StopVote(ctx)
    # the method's defaults (tau 100, delta 0.9, ...) are conf=synthetic's settings
    step = SDCAStep(DistributionPair(19, model.feature_dim, ctx.device, all_reduce=est_timer))
    shards, size = Path(args["shards"]), tuple(args["size"])
    common = dict(rank=rank, world_size=world, train=True, resize=size, num_threads=args["dali_threads"], device="cpu")
    loaders = {
        "source": ShardLoader(
            shards / "gta5_train" / "manifest.json", per_rank, photometric=True, class_balanced=True, seed=1, **common
        ),
        "target": ShardLoader(shards / "cityscapes_train" / "manifest.json", per_rank, seed=2, **common),
    }
    iterators = {n: iter(ld) for n, ld in loaders.items()}
    warmup, iters = args["warmup"], args["iters"]
    spent = dict.fromkeys(PHASES, 0.0)
    images = 0
    fixed = None  # --data fixed: the first batches again and again (no loading in the timed steps)
    for it in range(warmup + iters):
        if it == warmup:
            dist.barrier()
            spent = dict.fromkeys(PHASES, 0.0)
            est_timer.seconds = est_timer.calls = 0
            if grad_timer is not None:
                grad_timer.seconds = grad_timer.buckets = 0
            images = 0
            cpu_start = _thread_cpu()
            proc_cpu = time.process_time()
            sched = _main_thread_sched()
            t_start = time.perf_counter()
        if it == warmup and rank == args["kill_rank"]:
            os._exit(3)  # fault injection (--kill-rank): the others are about to wait in a collective
        t0 = time.perf_counter()
        if fixed is None:
            batches = {n: _to_device(next(iterators[n]), ctx.device) for n in loaders}
            if args["data"] == "fixed":
                fixed = batches
        else:
            batches = fixed
        t1 = time.perf_counter()
        engine.train(True)
        step(engine, batches, it)
        t2 = time.perf_counter()
        engine.step(poly_lr(0.005, it, 300))
        t3 = time.perf_counter()
        vote.vote(False)
        t4 = time.perf_counter()
        for name, a, b in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            spent[name] += b - a
        images += sum(int(b["image"].shape[0]) for b in batches.values())
    wall = time.perf_counter() - t_start
    vote.close()
    proc_cpu = time.process_time() - proc_cpu
    sched = [b - a for a, b in zip(sched, _main_thread_sched())]
    if args["profile"]:
        _print_thread_cpu(rank, world, cpu_start, iters)
    mine = [
        images,
        wall,
        proc_cpu,
        *sched,
        *(spent[p] for p in PHASES),
        est_timer.seconds,
        grad_timer.seconds if grad_timer is not None else 0.0,
    ]
    if args["profile"] and world > 1:
        mine.extend(_latency_ms(engine.module, model.feature_dim))
    rows = [None] * world
    dist.all_gather_object(rows, mine)
    if rank == 0:
        results.put({"world": world, "batch": args["batch"], "iters": iters, "ranks": rows})
    dist.destroy_process_group()


def _cpu_seconds() -> tuple[float, float, float]:
    """(CPU seconds the whole machine has spent busy, CPU seconds of this process and its reaped
    children, monotonic time): the difference of two readings is the load of OTHER programs."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()


def _other_load(before: tuple[float, float, float]) -> float:
    """Mean number of cores used by other programs since ``before`` (clock-tick resolution)."""
    after = _cpu_seconds()
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / max(after[2] - before[2], 1e-9))


def _measure(world: int, args: dict, timeout_s: float) -> dict:
    """Run ``world`` ranks; the first rank that dies (or a hang past ``timeout_s``) ends all."""
    before = _cpu_seconds()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init, args, q), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        result = None
        errors: dict[int, str] = {}
        try:
            while result is None:
                try:
                    item = q.get(timeout=0.5)
                except queue.Empty:
                    item = None
                if isinstance(item, tuple):  # ("error", rank, one line)
                    errors[item[1]] = item[2]
                    continue
                result = item
                if result is not None:
                    break
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:  # a rank died: the others would wait in a collective forever
                    time.sleep(0.5)  # let a reported exception arrive
                    while not q.empty():
                        item = q.get()
                        if isinstance(item, tuple):
                            errors[item[1]] = item[2]
                    # the cause: a rank that died without a Python exception (killed, os._exit,
                    # crash), else the first exception (the others then fail in a collective)
                    hard = [(i, c) for i, c in dead if i not in errors]
                    if hard:
                        msg = f"rank {hard[0][0]} of {world} exited with code {hard[0][1]}"
                    else:
                        first = next(iter(errors))  # in order of arrival
                        msg = f"rank {first} of {world} failed: {errors[first]}"
                    raise RuntimeError(f"{msg} (global batch {args['batch']}+{args['batch']})")
                if all(p.exitcode == 0 for p in procs):
                    raise RuntimeError(f"{world} ranks exited without a result")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{world} ranks still running after {timeout_s:.0f} s (--timeout)")
            for p in procs:
                p.join(timeout=60)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    result["other_load"] = _other_load(before)
    return result


def _synthetic_shards(root: Path, count: int) -> None:
    """Generate and shard a small synthetic benchmark (conf=synthetic's image sizes) under ``root``.

    Through the two command-line tools rather than the config: the benchmark measures the step, and
    must not depend on how presets are composed."""
    raw = root / "raw"
    cmds = [synth_command(raw, (count, count, 4), (144, 72), (128, 64), seed=0)]
    for layout, split, name in (("gta5", "train", "gta5_train"), ("cityscapes", "train", "cityscapes_train")):
        cmds.append(shard_command(layout, raw / layout, split, root / name, workers=1))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for cmd in cmds:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"python -m {cmd[2]} failed: {tail[0]}")


def _summary(r: dict) -> dict:
    """Throughput over the slowest rank's wall time (a step ends when every rank has finished it);
    per-step phase times are the maximum over ranks."""
    ranks = r["ranks"]
    images = sum(x[0] for x in ranks)
    wall = max(x[1] for x in ranks)
    per = [
        dict(
            zip(
                (
                    "images",
                    "wall",
                    "cpu",
                    "main_cpu",
                    "main_runq",
                    *PHASES,
                    "estimator",
                    "grad",
                    "lat_grad",
                    "lat_est",
                    "lat_flag",
                ),
                x,
            )
        )
        for x in ranks
    ]
    n = r["iters"]
    return {
        "world": r["world"],
        "batch": r["batch"],
        "images": images,
        "wall": wall,
        "images_per_s": images / wall,
        "step_ms": 1e3 * wall / n,
        "other_load": r["other_load"],
        "cpu_share": sum(p["cpu"] / p["wall"] for p in per) / len(per),
        # main thread, per step, mean over ranks: computing, runnable but not running, blocked
        "main_ms": {k: 1e3 * sum(v[k] for v in per) / len(per) / n for k in ("main_cpu", "main_runq")}
        | {"blocked": 1e3 * sum(v["wall"] - v["main_cpu"] - v["main_runq"] for v in per) / len(per) / n},
        "phases_ms": {k: 1e3 * max(p[k] for p in per) / n for k in (*PHASES, "estimator", "grad")},
        "latency_ms": {k: max(p[k] for p in per) for k in ("lat_grad", "lat_est", "lat_flag") if k in per[0]},
    }


def _machine_header(a) -> list[str]:
    import nvidia.dali

    cores = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip() + f", {cores} cores "
        f"({affinity} usable), python {platform.python_version()}, torch {torch.__version__}, "
        f"DALI {nvidia.dali.__version__}, gloo",
        f"threads per rank: torch 1 (OMP_NUM_THREADS=1), DALI {a.dali_threads} per loader x 2 loaders, "
        + ("each rank bound to one core; " if a.pin else "ranks not bound to cores; ")
        + f"{a.warmup} warm-up + {a.iters} timed steps; small model, {a.size[0]}x{a.size[1]} inputs",
    ]


def main(argv: list[str]) -> int:
    ap = arguments.parser("python -m sdca_dist.bench scale", __doc__.splitlines()[0])
    ap.add_argument("--iters", type=arguments.int_between(1, 100000), default=60, help="timed steps per run")
    ap.add_argument(
        "--warmup",
        type=arguments.int_between(1, 100000),
        default=5,
        help="untimed steps first (pipeline build, allocations)",
    )
    ap.add_argument(
        "--batches",
        type=arguments.int_between(2, 4096),
        nargs="+",
        default=[4, 8],
        metavar="B",
        help="GLOBAL source (= target) batches to measure; the first one gives the last line",
    )
    ap.add_argument("--size", type=arguments.int_between(8, 4096), nargs=2, default=[64, 128], metavar=("H", "W"))
    ap.add_argument(
        "--dali-threads",
        type=arguments.int_between(1, 256),
        default=1,
        help="DALI worker threads per loader (conf=synthetic: 1)",
    )
    ap.add_argument(
        "--repeats",
        type=arguments.int_between(1, 1000),
        default=3,
        help="pairs of a 2-rank and a 1-rank run; the median pair's efficiency counts (machine noise)",
    )
    ap.add_argument(
        "--data",
        choices=("dali", "fixed"),
        default="dali",
        help="fixed: reuse the first batches (isolates the step from data loading)",
    )
    ap.add_argument("--profile", action="store_true", help="also time the DDP gradient all-reduce (comm hook)")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bind each rank (and its DALI and gloo threads) to one core of its own (default; --no-pin: unbound)",
    )
    ap.add_argument(
        "--timeout", type=arguments.float_above(0), default=600.0, help="seconds before a hung run is ended"
    )
    ap.add_argument("--kill-rank", type=int, default=-1, help=argparse.SUPPRESS)  # fault injection for the tests
    a = ap.parse_args(argv)
    bad = [b for b in a.batches if b % 2]
    if bad:
        ap.error(f"argument --batches: must be even (split over 1 and 2 ranks), got {bad}")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before they import torch
    print("\n".join(_machine_header(a)), flush=True)
    runs: dict[int, list[dict[int, dict]]] = {b: [] for b in a.batches}  # per batch: one {world: summary} per repeat
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # enough samples for every rank, and several epochs' worth never needed: readers loop
            _synthetic_shards(Path(tmp), max(32, 2 * max(a.batches)))
            for batch in a.batches:
                for _ in range(a.repeats):
                    pair: dict[int, dict] = {}
                    runs[batch].append(pair)
                    for world in (2, 1):  # 2 first: a failing rank is reported before a long 1-rank run
                        args = {
                            "shards": tmp,
                            "batch": batch,
                            "size": a.size,
                            "warmup": a.warmup,
                            "iters": a.iters,
                            "dali_threads": a.dali_threads,
                            "data": a.data,
                            "profile": a.profile,
                            "pin": a.pin,
                            "kill_rank": a.kill_rank if world == 2 else -1,
                        }
                        pair[world] = _summary(_measure(world, args, a.timeout))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows: dict[tuple[int, int], dict] = {}
    eff: dict[int, float] = {}
    spread: dict[int, list[float]] = {}
    for batch, pairs in runs.items():
        # each repeat pairs a 2-rank run with the 1-rank run right after it (same machine state);
        # the tables show the MEDIAN pair (the lower middle one for an even count)
        ratios = [p[2]["images_per_s"] / (2 * p[1]["images_per_s"]) for p in pairs]
        order = sorted(range(len(ratios)), key=ratios.__getitem__)
        median = order[(len(order) - 1) // 2]
        rows[(batch, 1)], rows[(batch, 2)] = pairs[median][1], pairs[median][2]
        eff[batch], spread[batch] = ratios[median], ratios
    print(
        f"\n{'global batch':>12} {'ranks':>5} {'images':>7} {'step ms':>8} {'images/s':>9} {'efficiency':>10} "
        f"{'rank CPU':>8} {'other load':>10}"
    )
    for batch in a.batches:
        for world in (1, 2):
            r = rows[(batch, world)]
            e = f"{100 * eff[batch]:.0f}%" if world == 2 else "-"
            print(
                f"{f'{batch}+{batch}':>12} {world:>5} {r['images']:>7} {r['step_ms']:>8.1f} {r['images_per_s']:>9.1f} "
                f"{e:>10} {100 * r['cpu_share']:>7.0f}% {r['other_load']:>6.2f} cpu"
            )
    print(
        "\nmain thread of a rank, ms per step (mean over ranks): on a CPU / runnable but waiting for a CPU "
        "(other programs, the rank's own DALI and gloo threads) / blocked (collectives, data)"
    )
    for batch in a.batches:
        for world in (1, 2):
            m = rows[(batch, world)]["main_ms"]
            print(
                f"{f'{batch}+{batch}':>12} {world:>5} {m['main_cpu']:>9.1f} {m['main_runq']:>9.1f} {m['blocked']:>9.1f}"
            )
    cols = ("data", "step", "estimator", "grad", "optimizer", "flag")
    print(
        "\nper-step ms, maximum over ranks (step = both micro-steps, forward + backward, including the "
        "estimator all-reduce and the gradient all-reduce" + ("" if a.profile else "; grad: --profile") + ")"
    )
    print(f"{'global batch':>12} {'ranks':>5} " + " ".join(f"{c:>9}" for c in cols))
    for batch in a.batches:
        for world in (1, 2):
            ph = rows[(batch, world)]["phases_ms"]
            print(f"{f'{batch}+{batch}':>12} {world:>5} " + " ".join(f"{ph[c]:>9.2f}" for c in cols))
    for batch in a.batches:
        lat = rows[(batch, 2)]["latency_ms"]
        if lat:
            print(
                f"{batch}+{batch}, 2 ranks in lock step, ms per all-reduce: gradients {lat['lat_grad']:.2f}, "
                f"estimator {lat['lat_est']:.2f}, stop flag {lat['lat_flag']:.2f} (the rest of a wait is imbalance)"
            )
    print(
        "(rank CPU: CPU time of a rank process / its wall time, mean over ranks; other load: cores used by "
        "other programs during the run, which a 2-rank run cannot escape on 2 cores)"
    )
    busy = max(rows[(b, 2)]["other_load"] for b in a.batches)
    if busy > 0.1:
        print(f"warning: other programs used {busy:.2f} cores during a 2-rank run: efficiency understated here")
    if a.repeats > 1:
        for batch in a.batches:
            each = " ".join(f"{100 * r:.0f}%" for r in spread[batch])
            print(
                f"{batch}+{batch}, efficiency of each repeat: {each}; median {100 * eff[batch]:.0f}% "
                f"(range {100 * min(spread[batch]):.0f}-{100 * max(spread[batch]):.0f}%)"
            )
    for batch in a.batches[1:]:
        print(f"scaling efficiency at {batch}+{batch}: {100 * eff[batch]:.0f}%")
    print(f"scaling efficiency: {100 * eff[a.batches[0]]:.0f}%")
    return 0
