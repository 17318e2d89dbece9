"""``python -m sdca_dist.train conf=NAME stage=STAGE run_dir=DIR [overrides]``: run one stage.

Works alone (one process), under ``torchrun --nproc_per_node=N`` and under ``srun``: the rank
environment is read in one place (sdca_dist.engine.distributed). Exit codes: 0 done,
2 bad configuration or missing input, 3 stopped by a signal after writing a checkpoint
(rerun the same command to resume), 1 anything else.
"""

from __future__ import annotations

import sys

from sdca_dist.config import ConfigError, compose_config
from sdca_dist.engine.preemption import PREEMPTED_EXIT_CODE, Preempted


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from sdca_dist.engine.data import DataConfigError
    from sdca_dist.data.errors import DataError
    from sdca_dist.engine.run_dir import MissingInputError, StageInputError
    from sdca_dist.engine.runner import run_stage

    try:
        run_stage(cfg)
    except Preempted as exc:
        print(f"[{cfg.stage}] {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (MissingInputError, StageInputError, DataConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
