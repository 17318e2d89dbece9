"""One function per stage, all with the same face: ``run(sc: StageContext) -> dict``.

Each reads its inputs from earlier stages' folders (checked first, see ``run_dir``), writes its
outputs under ``<run_dir>/<stage>/`` and returns a summary; the caller writes DONE.
"""

from __future__ import annotations

from typing import Callable

from sdca_dist.engine.stage_context import StageContext


def registry() -> dict[str, Callable[[StageContext], dict]]:
    from sdca_dist.engine.stages import dist_init, evaluate_stage, pseudo_label, sdca, supervised

    return {
        "src": supervised.run_src,
        "oracle": supervised.run_oracle,
        "ssl": supervised.run_ssl,
        "dist_init": dist_init.run,
        "sdca": sdca.run,
        "pseudo_label": pseudo_label.run,
        "eval": evaluate_stage.run,
    }
