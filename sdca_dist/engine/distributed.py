"""Process-group setup: the ONE place that reads the rank environment.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` exports
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST. Both are read the same way so a
stage behaves identically under either launcher; without either, the run is one process.

A shell of an allocation (an ``sbatch`` script, an ``salloc`` shell) carries SLURM_NTASKS (and in a
batch script SLURM_PROCID=0) but is no srun task: a plain ``python`` started there is ONE process.
Only an srun step (SLURM_STEP_ID set) is read as a rank; otherwise rank 0 of SLURM_NTASKS would
wait for ranks that never start (30 minutes, the process-group timeout).
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``n[1-2],m3`` (scontrol when available)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


class DeviceSetupError(RuntimeError):
    """The ranks cannot be placed on this node's devices as asked (one line: what and which key)."""


def _srun_task(env: Mapping[str, str]) -> bool:
    return "SLURM_STEP_ID" in env or "SLURM_STEPID" in env


def allocation_shell_note(env: Mapping[str, str] | None = None) -> str | None:
    """The one-line note for a plain process in an allocation's shell that asked for several tasks
    (it runs as one process), else None."""
    env = os.environ if env is None else env
    if "RANK" in env or _srun_task(env) or "SLURM_JOB_ID" not in env:
        return None
    tasks = env.get("SLURM_NTASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        return (
            f"note: SLURM_NTASKS={tasks} but this process is not an srun task (no SLURM_STEP_ID): "
            "running as ONE process; start the ranks with srun (or torchrun) to use them all"
        )
    return None


def rank_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun's or SLURM's variables
    (``os.environ`` unless ``env`` is given)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env and _srun_task(env):
        job = int(env["SLURM_JOB_ID"])
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # a port derived from the job id: every rank computes the same one without talking
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
        }
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size(env: Mapping[str, str], local_rank: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, srun's tasks on this node, else at least
    ``local_rank + 1``."""
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    m = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE", "") if _srun_task(env) else "")
    return max(int(m.group(1)) if m else 0, local_rank + 1)


def _gpu_list(text: str | None) -> list[str]:
    return [g for g in (text or "").split(",") if g.strip()]


def per_task_binding(env: Mapping[str, str], gpus: int, local_world: int) -> str | None:
    """Why this rank's visible GPUs are its own (SLURM bound GPUs per task), or None when the
    environment does not say so. Evidence, any of: ``--gpus-per-task`` (SLURM_GPUS_PER_TASK),
    ``--gpu-bind`` to single GPUs (SLURM_GPU_BIND / SLURM_CPU_BIND-style ``single:``, ``map_gpu:``,
    ``mask_gpu:``), or the step's GPUs on this node (SLURM_STEP_GPUS, else SLURM_JOB_GPUS) being
    at least one per local rank while this task sees fewer (CUDA_VISIBLE_DEVICES was cut to the
    task's share). Without it, ranks that see the same GPUs would share them."""
    if not _srun_task(env):
        return None
    per_task = env.get("SLURM_GPUS_PER_TASK", "").split(":")[-1]
    if per_task.isdigit() and int(per_task) >= 1 and gpus >= 1:
        return f"SLURM_GPUS_PER_TASK={env['SLURM_GPUS_PER_TASK']}"
    bind = env.get("SLURM_GPU_BIND", "")
    if any(k in bind for k in ("single:", "map_gpu:", "mask_gpu:")):
        return f"SLURM_GPU_BIND={bind}"
    step = _gpu_list(env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if step and visible is not None and len(_gpu_list(visible)) == gpus and len(step) >= local_world > gpus:
        return f"SLURM_STEP_GPUS={','.join(step)} with CUDA_VISIBLE_DEVICES={visible} for this task"
    return None


def pick_device(
    local_rank: int,
    local_world: int,
    gpus: int,
    require_cuda: bool,
    backend: str,
    env: Mapping[str, str] | None = None,
) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` where the ranks of a node share its GPUs,
    ``cuda:0`` where SLURM bound GPUs per task (``per_task_binding``: each rank sees only its
    own), the CPU without GPUs. Refuses (one line) what cannot work: GPUs asked for
    (``cluster.gpus_per_node > 0`` or NCCL) where torch sees none (a CPU torch, or a driver older
    than the torch build), and more ranks on a node than GPUs without per-task binding (two ranks
    on one GPU: NCCL fails with "Duplicate GPU detected")."""
    env = os.environ if env is None else env
    if gpus == 0:
        if require_cuda or backend == "nccl":
            asked = "cluster.gpus_per_node > 0" if require_cuda else "engine.backend=nccl"
            raise DeviceSetupError(
                f"{asked} but torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False: "
                "a CPU build of torch, or a driver older than its CUDA); run launch/install.sh on a GPU node"
            )
        return torch.device("cpu")
    if local_world > gpus:
        if per_task_binding(env, gpus, local_world):
            return torch.device("cuda", 0)
        raise DeviceSetupError(
            f"{local_world} ranks on this node but {gpus} visible GPU(s) and no per-task GPU binding in the "
            "environment (SLURM_GPUS_PER_TASK, --gpu-bind, SLURM_STEP_GPUS); start at most "
            f"{gpus} ranks per node (cluster.tasks_per_node, torchrun --nproc_per_node) or make more GPUs visible"
        )
    return torch.device("cuda", local_rank)


def _bind_keywords(device: torch.device) -> dict[str, Any]:
    """``init_process_group(device_id=...)`` where torch has it (binds NCCL to the rank's GPU)."""
    if device.type != "cuda" or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return {}
    return {"device_id": device}


def init_distributed(backend: str = "auto", timeout_s: int = 1800, require_cuda: bool = False) -> DistContext:
    """Initialise the process group (if not yet) and pick and bind this rank's device.

    ``timeout_s``: the process-group timeout (a collective that waits longer fails);
    ``SDCA_PG_TIMEOUT_S`` in the environment overrides it (a site that wants failures sooner).

    ``backend="auto"``: NCCL when CUDA is available, gloo otherwise. A single process still gets
    a (world size 1) process group so DeepSpeed and the collectives behave the same everywhere.
    ``require_cuda`` (``cluster.gpus_per_node > 0``): refuse to fall back to the CPU.
    """
    if os.environ.get("SDCA_PG_TIMEOUT_S", "").isdigit():
        timeout_s = int(os.environ["SDCA_PG_TIMEOUT_S"])
    note = allocation_shell_note()
    if note:
        print(note, file=sys.stderr)
    env = rank_environment()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if not env["MASTER_PORT"]:
        env["MASTER_PORT"] = str(_free_port())
    os.environ.update(env)  # DeepSpeed and torch read these
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        # srun does not bind threads: use what the job asked for (also keeps CPU results
        # bitwise reproducible across launches, as torchrun's OMP_NUM_THREADS does)
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = pick_device(local, local_world_size(os.environ, local), gpus, require_cuda, backend)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **_bind_keywords(device),
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopVote:
    """Step-boundary agreement on stopping, with the collective off the step's critical path.

    Each rank casts its vote (a stop signal arrived?) at the end of every step with an
    asynchronous MAX all-reduce and reads the result of the PREVIOUS step's vote, which arrived
    long ago (the next step's gradient all-reduce has synchronised the ranks since). Every rank
    therefore learns the same answer at the same step boundary and all stop together, one step
    after the first request. A blocking vote cost every step a round trip plus the wait for the
    slowest rank (2 ms of a 66 ms sdca step on 2 CPU ranks, ``python -m sdca_dist.bench scale``).
    One step of delay is nothing against SLURM's warning time (``cluster.signal_delay_s``).

    Single process: the request itself, at once, unless ``collective`` (the GPU check runs the
    NCCL path, pinned copy and event included, on one GPU). Call :meth:`close` before leaving the
    loop (it waits for the vote in flight, which every rank has launched).
    """

    def __init__(self, ctx: DistContext, collective: bool = False) -> None:
        self.ctx = ctx
        self.collective = collective
        #: (work to wait for or None, the vote's CPU tensor, CUDA event of its copy or None)
        self._in_flight: tuple[Any, torch.Tensor, Any] | None = None

    def vote(self, requested: bool) -> bool:
        """Cast this step's vote; True on every rank at the same step once any rank has asked.

        On CUDA nothing here waits for the GPU: the vote is made on the device (a fill, not a copy
        from the host), its all-reduce is ordered on the stream, and the result is copied to
        pinned host memory behind an event; reading it one step later waits for that event only."""
        if not self.ctx.distributed or (self.ctx.world_size == 1 and not self.collective):
            return requested
        agreed = self._result()
        t = torch.full((1,), 1.0 if requested else 0.0, device=self.ctx.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        if self.ctx.device.type == "cuda":
            work.wait()  # NCCL: orders the stream after the collective, does not block the host
            host = torch.empty(1, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._in_flight = (None, host, event)
        else:
            self._in_flight = (work, t, None)
        return agreed

    def _result(self) -> bool:
        if self._in_flight is None:
            return False
        work, t, event = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return bool(t[0] > 0)

    def close(self) -> None:
        """Wait for the vote in flight (every rank launched it; nothing may stay in flight)."""
        self._result()


def broadcast_tensors(tensors: list[torch.Tensor], ctx: DistContext, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values: one broadcast per dtype (a
    DeepLabV2 has hundreds of BN buffers; one collective each would be hundreds of round trips)."""
    if not ctx.distributed or ctx.world_size == 1 or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(v)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> None:
    """SUM ``tensor`` over all ranks, in place (identity on one process)."""
    if ctx.distributed and ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
