"""The submitit job of one stage (DINOv2's run/train/train.py pattern).

A job carries only (run folder, stage): it reads the frozen run configuration there, so every
rank and every requeue runs exactly the settings the run started with. ``checkpoint()`` hands
submitit a FRESH instance to requeue; the stage itself resumes from the last checkpoint that
all ranks wrote together at a step boundary (the engine's stop-signal handling), so no
collective ever runs inside the signal handler.

After that checkpoint only rank 0 acts on the stop (SIGUSR2: submitit's checkpoint, then
``scontrol requeue``, then exit); every other rank ends its task with success at once. srun runs
the ranks with ``--kill-on-bad-exit=1``, so a rank ending with an error would end the step, and
could kill rank 0 before its requeue went through: the job would end FAILED and its ``afterok``
dependants would be cancelled, exactly when the chain was meant to survive preemption.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _rank() -> int:
    """This task's rank (the engine exported RANK; srun's SLURM_PROCID before that)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


class StageJob:
    def __init__(self, run_dir: str, stage: str, model_from: str = "ssl") -> None:
        self.run_dir = str(run_dir)
        self.stage = stage
        self.model_from = model_from  # eval only: which model it scores (a job key, not a setting)

    def __call__(self) -> dict:
        from sdca_dist.config.run_config import load_frozen, with_values
        from sdca_dist.engine.preemption import Preempted
        from sdca_dist.engine.runner import run_stage

        cfg = with_values(load_frozen(self.run_dir, self.stage), eval__model_from=self.model_from)
        try:
            return run_stage(cfg)
        except Preempted as exc:
            # the checkpoint is on disk (all ranks wrote it together)
            if _rank() != 0:
                # srun runs the ranks with --kill-on-bad-exit=1: an error exit here would end the
                # step while rank 0 may still be in submitit's checkpoint + ``scontrol requeue``,
                # and the job would end FAILED instead of requeued. This task ends with success;
                # rank 0 decides what happens to the job.
                print(f"[{self.stage}] rank {_rank()}: {exc}; rank 0 requeues the job", file=sys.stderr, flush=True)
                return {"stage": self.stage, "stopped": signal.Signals(exc.signum).name, "iteration": exc.iteration}
            if exc.signum == signal.SIGUSR2:
                exc.forward_to_previous_handler()  # rank 0: checkpoint() + requeue + exit
            raise

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.run_dir, self.stage, self.model_from))
