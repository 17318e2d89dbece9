"""The face of a cluster backend: what the launcher, a grid and the status view ask of the place
where stages run, and the types they hand it.

The launcher (``sdca_dist.launch.cli``) makes and checks the plan, freezes the run folders and
works out which stages are stale; a backend only

1. refuses, before anything is written, a job shape it cannot give (``check_shape``);
2. adds its own job parameters to each stage's printed plan (``job_parameters``);
3. runs or submits the stale stages, each with its planned shape, a stage after the one it
   depends on (``run``): it returns one record per finished job ({"stage", "state", ...},
   ``state`` "COMPLETED" when it completed) when it waited for them, or None when it only
   submitted them;
4. waits for jobs it queued for a grid's points (``wait``), and tells the status view the state
   of jobs it recorded in a run folder (``states``);
5. says, after the summary is written, what failed, if the launch must exit 2 for it
   (``failure``).

A stage whose ``StageSpec.gates_chain`` is false (a reference) never stops the stages after it.
Nothing outside ``sdca_dist/launch/backends/`` talks to a scheduler: a grid and the launcher
call these methods on the backend ``cluster.name`` names, the status view on the backend that
recorded the job (``jobs.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig

from sdca_dist.config.schema import LaunchConfig


class LaunchError(RuntimeError):
    """A problem found before or while running the chain; one line, names what is at fault."""


#: (seed, run folder, [(stage, why it runs)]) per seed: what a backend runs
Todo = list[tuple[int, Path, list[tuple[str, str]]]]


@dataclass(frozen=True)
class QueuedJob:
    """A job a backend queued for one stage (an array over ``seeds``): its id, for jobs that must
    wait for it, and ``handle``, the backend's own object that ``Backend.wait`` follows."""

    backend: str
    stage: str
    job_id: str
    seeds: tuple[int, ...]
    handle: Any = None


@dataclass(frozen=True)
class LaunchHooks:
    """How a grid launches one of its points through the single-run launcher.

    ``after``: {stage: the jobs, queued for earlier points, that compute that stage for this
    point}; a backend that queues jobs makes the stage's job wait for them. ``submitted`` is
    called with each job the backend queued, and a backend given hooks leaves the waiting to the
    grid. A point launched with hooks is one run: its command line is never read as a grid."""

    after: Mapping[str, Sequence[QueuedJob]] = field(default_factory=dict)
    submitted: Callable[[QueuedJob], None] = lambda job: None


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Preempted)\b.*: |^error: ")


def last_error_line(lines: Sequence[str]) -> str:
    """The last exception (or ``error:``) line of a stage's log, else its last line; torch's
    ``[rankN]:`` prefixes dropped."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln).strip() for ln in lines if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "(no output)"


class Backend:
    #: the ``cluster.name`` that selects it (its module's name)
    name: str = ""

    def check_shape(self, cfg: DictConfig, launch: LaunchConfig) -> None:
        """Raise ``LaunchError`` for a job shape this backend cannot give; nothing by default."""

    def job_parameters(self, cfg: DictConfig, stage: str, row: dict) -> dict[str, Any]:
        """Extra fields of ``stage``'s printed plan (e.g. its sbatch parameters); none by default."""
        return {}

    def run(
        self,
        cfg: DictConfig,
        launch: LaunchConfig,
        root: Path,
        todo: Todo,
        plan: dict[str, dict],
        stages: list[str],
        hooks: Optional[LaunchHooks] = None,
    ) -> Optional[list[dict]]:
        """Run or submit the stale stages of ``todo``; the finished jobs' records, or None when
        the jobs were submitted and not waited for. ``hooks`` (a grid's point): a backend that
        queues jobs makes each stage wait for ``hooks.after[stage]``, hands every job it queued
        to ``hooks.submitted`` and leaves the waiting to the grid. A local backend runs a seed's
        chain until one of its gating stages fails and goes on with the other seeds."""
        raise NotImplementedError

    def wait(self, jobs: Sequence[QueuedJob]) -> list[dict]:
        """Follow ``jobs`` (queued by this backend's ``run`` for a grid) until each has ended; one
        record per job ({"stage", "job_id", "state", "error" when not COMPLETED}). A backend that
        runs its stages before ``run`` returns queues nothing: none by default."""
        return []

    def states(self, job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """{job id: {"state", "reason" (queued) | "exit_code" (ended)}} of jobs this backend
        recorded in run folders, for the status view; empty where it keeps no job records (the
        view then reads the stage folders alone)."""
        return {}

    def failure(self, records: list[dict]) -> Optional[str]:
        """The one-line error the launch ends with for these records, or None (exit 0)."""
        return None
