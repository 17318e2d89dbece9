"""Preemption signals: SIGUSR2 (SLURM/submitit) and SIGTERM (scontrol requeue, torchrun).

The handler only sets a flag: saving needs all ranks together (a collective), which is never
safe inside a signal handler. The training loop polls ``StopSignal.requested`` at each step
boundary, the ranks agree, write one checkpoint together and raise ``Preempted``. Whoever
launched the stage decides what that means (the SLURM launcher requeues; the CLI exits 3).

A worker never outlives its supervisor: ``sdca_dist.processes.die_with_parent`` asks the kernel
(Linux ``PR_SET_PDEATHSIG``) to send the process a signal when its parent exits. Under torchrun each
rank asks for SIGTERM: if the agent itself dies (SIGUSR2 or SIGKILL to the ``torchrun``
process; torchrun forwards SIGTERM/SIGINT to its workers itself but dies of SIGUSR2), every rank
gets SIGTERM, the ranks stop together at the next step boundary with a checkpoint, and exit; no
rank keeps training unsupervised. The shard builder's pool workers ask for SIGKILL (they hold
no state worth saving).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, Optional

#: exit code of ``python -m sdca_dist.train`` after a checkpoint on a stop signal
PREEMPTED_EXIT_CODE = 3

Handler = Any


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun's agent started (its environment says so)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


class Preempted(RuntimeError):
    """Raised after the all-rank checkpoint when a stop signal arrived."""

    def __init__(self, signum: int, iteration: int, previous_handler: Handler = None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; checkpoint written")
        self.signum = signum
        self.iteration = iteration
        self.previous_handler = previous_handler

    def forward_to_previous_handler(self) -> None:
        """Call the handler that was installed before ours (e.g. submitit's requeue)."""
        prev = self.previous_handler
        if callable(prev):
            prev(self.signum, None)


class StopSignal:
    """Context manager that records SIGUSR2/SIGTERM instead of dying on them."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def previous_handler(self, signum: int) -> Handler:
        return self._previous.get(signum)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopSignal":
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread: cannot install, stay a no-op
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except ValueError:
                pass

    def raise_preempted(self, iteration: int) -> None:
        signum = self.signum if self.signum is not None else signal.SIGTERM
        raise Preempted(signum, iteration, self.previous_handler(signum))
