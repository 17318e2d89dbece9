"""The run folder as the engine sees it: where each stage's files live.

``<run_dir>/config.yaml`` is the frozen run configuration (``sdca_dist.config.run_config``);
``<run_dir>/<stage>/`` holds one stage's outputs, its ``LINEAGE.json`` and, written last, its
``DONE`` record (``sdca_dist.lineage``). What each stage reads and writes is declared once, in
``sdca_dist.stage_table``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdca_dist.lineage import DONE, MissingInputError, StageInputError  # noqa: F401 - the engine's errors
from sdca_dist.stage_table import DISTRIBUTIONS, METRICS, MODEL_FINAL, PSEUDO_MANIFEST, THRESHOLDS  # noqa: F401

PSEUDO_SHARDS = PSEUDO_MANIFEST.split("/")[0]


@dataclass(frozen=True)
class RunDir:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def model_of(self, stage: str) -> Path:
        return self.stage(stage) / MODEL_FINAL

    def distributions_of(self, stage: str) -> Path:
        return self.stage(stage) / DISTRIBUTIONS

    def pseudo_manifest(self) -> Path:
        return self.root / "pseudo_label" / PSEUDO_MANIFEST
