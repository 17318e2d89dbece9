"""The submitit job of one stage (DINOv2's run/train/train.py pattern).

A job carries only (run folder, stage): it reads the frozen run configuration there, so every
rank and every requeue runs exactly the settings the run started with. ``checkpoint()`` hands
submitit a FRESH instance to requeue; the stage itself resumes from the last checkpoint that
all ranks wrote together at a step boundary (the engine's stop-signal handling), so no
collective ever runs inside the signal handler.
"""

from __future__ import annotations

import signal
from typing import Any


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
            # the checkpoint is on disk (all ranks wrote it); now let submitit requeue us
            if exc.signum == signal.SIGUSR2:
                exc.forward_to_previous_handler()  # rank 0: checkpoint() + requeue + exit
            raise

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.run_dir, self.stage, self.model_from))
