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
from pathlib import Path
from typing import Sequence

from sdca_dist.config import ConfigError


def _arg(argv: Sequence[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def prepare(argv: Sequence[str]):
    """The frozen run configuration for this command line (frozen now if the folder is new)."""
    from sdca_dist.config.run_config import freeze, resolve, with_values
    from sdca_dist.rank_scaling import parse_scale, resolve_scale

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
    wrote = freeze(run_dir, cfg, argv) if new else False
    return cfg, wrote


class StartRecord:
    """What a start that freezes a new run folder's configuration found there, so that a refused
    start (another job holds the stage, an input is missing) can take back what it wrote: a
    refusal leaves the folder as it was (the configuration may be started again with other
    settings). Only a folder without ``config.yaml`` is recorded (a new run's, small)."""

    def __init__(self, run_dir: str | None) -> None:
        from sdca_dist.config.run_config import config_path

        self.root = Path(run_dir) if run_dir and run_dir.strip() else None
        self.existed = self.root is not None and self.root.exists()
        self.fresh = self.root is not None and not config_path(self.root).is_file()
        self.before: set[Path] = set(self.root.rglob("*")) if self.fresh and self.existed else set()

    def take_back(self, wrote: bool) -> None:
        """Remove the folders this start made and, when it wrote it (``wrote``), the configuration,
        unless the start left other files (then its configuration explains them and stays)."""
        from sdca_dist.config.run_config import CONFIG_FILE, ORIGIN_FILE

        if not self.fresh or not self.root.is_dir():
            return
        written = {self.root / CONFIG_FILE, self.root / ORIGIN_FILE} if wrote else set()
        new = set(self.root.rglob("*")) - self.before - written
        if any(not p.is_dir() for p in new):
            return
        for p in written:
            p.unlink(missing_ok=True)
        for d in sorted(new, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        if not self.existed:
            try:
                self.root.rmdir()
            except OSError:
                pass


def stopped_line(stage: str, exc: Exception, torchrun: bool) -> str:
    """The one line a clean stop prints (rank 0): what happened and how to resume. Under torchrun
    it says what torchrun prints next: its agent reports every rank that exits non-zero as a
    failed child ("exitcode: 3") with a ChildFailedError traceback, and exits 1 itself."""
    from sdca_dist.engine.preemption import PREEMPTED_EXIT_CODE

    line = f"[{stage}] {exc}; resume: run the same command again (exit {PREEMPTED_EXIT_CODE})"
    if torchrun:
        line += "; torchrun reports the ranks below as failed with exitcode 3: that is this stop, not a crash"
    return line


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from sdca_dist.engine.preemption import under_torchrun
    from sdca_dist.processes import die_with_parent

    if under_torchrun():  # the agent's death (e.g. SIGUSR2 to torchrun) stops this rank at a step boundary
        die_with_parent(signal.SIGTERM)
    start = StartRecord(_arg(argv, "run_dir"))
    try:
        cfg, wrote = prepare(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        start.take_back(wrote=False)
        return 2
    code = _run(cfg)
    if code == 2:
        start.take_back(wrote)
    return code


def _run(cfg) -> int:
    """Run the stage; the exit code (see the module's docstring)."""
    from sdca_dist.data.errors import DataError
    from sdca_dist.data.sets import DataConfigError
    from sdca_dist.engine.distributed import DeviceSetupError
    from sdca_dist.engine.health import TrainingHealthError
    from sdca_dist.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, under_torchrun
    from sdca_dist.engine.runner import run_stage
    from sdca_dist.lineage import MissingInputError, RunFolderBusy, StageInputError, StageOutputError
    from sdca_dist.locks import LockError
    from sdca_dist.models.pretrained import WeightsError
    from sdca_dist.rank_scaling import ScaleError

    try:
        run_stage(cfg)
    except Preempted as exc:
        if int(os.environ.get("RANK") or 0) == 0:  # one line for the whole stop, not one per rank
            print(stopped_line(cfg.stage, exc, under_torchrun()), file=sys.stderr, flush=True)
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
        LockError,
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
