"""Process-group setup: the ONE place that reads the rank environment.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` exports
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST. Both are read the same way so a
stage behaves identically under either launcher; without either, the run is one process.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

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


def rank_environment() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun's or SLURM's variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
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


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Initialise the process group (if not yet) and pick the device.

    ``backend="auto"``: NCCL when CUDA is available, gloo otherwise. A single process still gets
    a (world size 1) process group so DeepSpeed and the collectives behave the same everywhere.
    """
    env = rank_environment()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if not env["MASTER_PORT"]:
        env["MASTER_PORT"] = str(_free_port())
    os.environ.update(env)  # DeepSpeed and torch read these
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        # srun does not bind threads: use what the job asked for (also keeps CPU results
        # bitwise reproducible across launches, as torchrun's OMP_NUM_THREADS does)
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
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

    Single process: the request itself, at once. Call :meth:`close` before leaving the loop
    (it waits for the vote in flight, which every rank has launched).
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self._in_flight: tuple[Any, torch.Tensor] | None = None

    def vote(self, requested: bool) -> bool:
        """Cast this step's vote; True on every rank at the same step once any rank has asked."""
        if not self.ctx.distributed or self.ctx.world_size == 1:
            return requested
        agreed = self._result()
        t = torch.tensor([1.0 if requested else 0.0], device=self.ctx.device)
        self._in_flight = (dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True), t)
        return agreed

    def _result(self) -> bool:
        if self._in_flight is None:
            return False
        work, t = self._in_flight
        self._in_flight = None
        work.wait()
        return bool(t.item() > 0)

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
