"""The face of a cluster backend: what the launcher asks of the place where stages run.

The launcher (``sdca_dist.launch.cli``) makes and checks the plan, freezes the run folders and
works out which stages are stale; a backend only

1. refuses, before anything is written, a job shape it cannot give (``check_shape``);
2. adds its own job parameters to each stage's printed plan (``job_parameters``);
3. runs or submits the stale stages, each with its planned shape, a stage after the one it
   depends on (``run``): it returns one record per finished job ({"stage", "state", ...},
   ``state`` "COMPLETED" when it completed) when it waited for them, or None when it only
   submitted them;
4. says, after the summary is written, what failed, if the launch must exit 2 for it
   (``failure``).

A stage whose ``StageSpec.gates_chain`` is false (a reference) never stops the stages after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from sdca_dist.config.schema import LaunchConfig
from sdca_dist.launch.plan import Todo


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
        hooks: Optional[dict] = None,
    ) -> Optional[list[dict]]:
        """Run or submit the stale stages of ``todo``; the finished jobs' records, or None when
        the jobs were submitted and not waited for. ``hooks`` (a grid's point): a backend that
        queues jobs makes ``stage`` wait for ``hooks["after"][stage]`` (the jobs computing a
        stage the point shares, each ``{"job": id, "seeds": [...]}``), reports its jobs in
        ``hooks["submitted"]`` ({stage: {"job": id, "seeds": [...]}}) and ``hooks["jobs"]`` (what
        the grid hands to the wait), and leaves the waiting to the grid. A local backend runs a
        seed's chain until one of its gating stages fails and goes on with the other seeds."""
        raise NotImplementedError

    def failure(self, records: list[dict]) -> Optional[str]:
        """The one-line error the launch ends with for these records, or None (exit 0)."""
        return None
