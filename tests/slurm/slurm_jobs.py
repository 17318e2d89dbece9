"""Callables that the SLURM tests submit with submitit.

They live in their own module (not in the test file) because the job unpickles them by module
name: the `slurm_cluster` fixture puts this folder on the jobs' PYTHONPATH, exactly as a real
launcher relies on the project package being importable on the compute nodes.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import submitit


def allreduce_rank_sum() -> dict:
    """All-reduce (rank + 1) over the whole job with gloo; every task returns what it saw.

    Uses submitit's TorchDistributedEnvironment, i.e. MASTER_ADDR is the first node's NAME (n1),
    which proves node names resolve inside jobs.
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group(backend="gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
        return {
            "rank": env.rank,
            "world_size": env.world_size,
            "master_addr": env.master_addr,
            "node": os.environ.get("SLURMD_NODENAME", ""),
            "host": socket.gethostname(),
            "sum": float(value.item()),
        }
    finally:
        dist.destroy_process_group()


def fail_on_purpose(message: str) -> None:
    """A job that fails, to break an afterok chain."""
    raise RuntimeError(message)


def touch(path: str) -> str:
    """A job whose only effect is a marker file: if the marker exists, the job ran."""
    Path(path).write_text(os.environ.get("SLURM_JOB_ID", "?"))
    return path


class StepCounter:
    """Checkpointable counter: counts `total` steps of `step_s` seconds, saving after each step.

    The safe submitit pattern: progress is saved by the job itself at step boundaries (temp file +
    rename, so a kill mid-write leaves the previous state), and checkpoint() — which runs inside
    the SIGUSR2 handler — saves nothing; it only returns a fresh instance that resumes from the
    saved state. Every start appends one JSON line to `<state>.starts` so tests can see the requeue.
    """

    def __init__(self, state_path: str, total: int, step_s: float) -> None:
        self.state_path = state_path
        self.total = total
        self.step_s = step_s

    def _load(self) -> int:
        path = Path(self.state_path)
        return json.loads(path.read_text())["step"] if path.exists() else 0

    def _save(self, step: int) -> None:
        tmp = Path(self.state_path + ".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, self.state_path)

    def __call__(self) -> int:
        step = self._load()
        with open(self.state_path + ".starts", "a") as log:
            log.write(
                json.dumps(
                    {
                        "from_step": step,
                        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                        "job_id": os.environ.get("SLURM_JOB_ID", ""),
                        "node": os.environ.get("SLURMD_NODENAME", ""),
                        "time": time.time(),
                    }
                )
                + "\n"
            )
        while step < self.total:
            time.sleep(self.step_s)
            step += 1
            self._save(step)
        return step

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(StepCounter(self.state_path, self.total, self.step_s))
