"""``python -m sdca_dist.train stage=STAGE run_dir=DIR [conf=NAME key=value ...]``: run one stage.

A new run folder needs ``conf=NAME`` (and any settings): they are frozen in ``DIR/config.yaml``
at the first start. On an existing run folder ``stage=`` and ``run_dir=`` are all it takes;
settings given again must match the frozen ones (a difference is refused, naming each key).

Works alone (one process), under ``torchrun --nproc_per_node=N`` and under ``srun``: the rank
environment is read in one place (sdca_dist.engine.distributed). Under torchrun, SIGTERM or
SIGUSR2 to the ranks (or SIGTERM to the agent, which forwards it) stops every rank at the next
step boundary with a checkpoint; if the agent itself dies (SIGUSR2 or SIGKILL to ``torchrun``),
each rank gets SIGTERM from the kernel and does the same (sdca_dist.engine.preemption). Exit codes:
0 done, 2 bad configuration or input (one line naming the key or file) or training that went
non-finite (one line naming stage, iteration and loss term), 3 stopped by a signal after
writing a checkpoint (rerun the same command to resume), 1 anything else.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence

from sdca_dist.config import ConfigError


def _arg(argv: Sequence[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def prepare(argv: Sequence[str]):
    """The frozen run configuration for this command line (frozen now if the folder is new)."""
    from sdca_dist.config.run_config import freeze, resolve, with_values
    from sdca_dist.scaling import parse_scale, resolve_scale

    stage = _arg(argv, "stage")
    run_dir = _arg(argv, "run_dir")
    if not stage:
        raise ConfigError("stage= is required (src, dist_init, sdca, pseudo_label, ssl, eval, oracle)")
    if run_dir is None or not run_dir.strip():
        raise ConfigError("run_dir is empty; name the run folder (run_dir=runs/NAME)")

    def adjust(cfg):
        # train.scale=auto under torchrun: the smallest K with which every stage uses these ranks
        if parse_scale(cfg.train.scale) == "auto":
            world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
            return with_values(cfg, train__scale=resolve_scale(cfg, world))
        return cfg

    cfg, new = resolve(run_dir, argv, stage=stage, adjust=adjust)
    if new:
        freeze(run_dir, cfg, argv)
    return cfg


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from sdca_dist.engine.preemption import under_torchrun
    from sdca_dist.processes import die_with_parent

    if under_torchrun():  # the agent's death (e.g. SIGUSR2 to torchrun) stops this rank at a step boundary
        die_with_parent(signal.SIGTERM)
    try:
        cfg = prepare(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from sdca_dist.data.errors import DataError
    from sdca_dist.data.sets import DataConfigError
    from sdca_dist.engine.distributed import DeviceSetupError
    from sdca_dist.engine.health import TrainingHealthError
    from sdca_dist.engine.preemption import PREEMPTED_EXIT_CODE, Preempted
    from sdca_dist.engine.runner import run_stage
    from sdca_dist.lineage import MissingInputError, RunFolderBusy, StageInputError, StageOutputError
    from sdca_dist.models.pretrained import WeightsError
    from sdca_dist.scaling import ScaleError

    try:
        run_stage(cfg)
    except Preempted as exc:
        print(f"[{cfg.stage}] {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (
        MissingInputError,
        StageInputError,
        StageOutputError,
        RunFolderBusy,
        DataConfigError,
        DataError,
        ScaleError,
        DeviceSetupError,
        TrainingHealthError,
        WeightsError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # no space, read-only run folder, a file where a folder should be
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (stage {cfg.stage}, run_dir={cfg.run_dir})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
