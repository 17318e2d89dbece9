"""The run folder: what each stage reads, what it writes, and its DONE marker.

``<run_dir>/<stage>/`` holds one stage's outputs. A stage is complete when its ``DONE`` file
exists (written last, atomically); the launcher chains stages by these markers and the engine
never looks further than the inputs a stage declares.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdca_dist.engine.checkpoint import atomic_write_text

MODEL_FINAL = "model_final.pt"
METRICS = "metrics.json"
DISTRIBUTIONS = "distributions.pt"
THRESHOLDS = "thresholds.json"
PSEUDO_SHARDS = "shards"
DONE = "DONE"


class MissingInputError(FileNotFoundError):
    """A stage's input from an earlier stage is absent; the message names the file."""


class StageInputError(ValueError):
    """A stage's input exists but cannot be used (corrupt, wrong model); the message names the file."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def done_path(self, stage: str) -> Path:
        return self.stage(stage) / DONE

    def is_done(self, stage: str) -> bool:
        return self.done_path(stage).is_file()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        payload = {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
        atomic_write_text(self.done_path(stage), json.dumps(payload, indent=1) + "\n")

    # --- inputs each stage needs from earlier ones -------------------------------------------
    def model_of(self, stage: str) -> Path:
        return self.stage(stage) / MODEL_FINAL

    def distributions_of(self, stage: str) -> Path:
        return self.stage(stage) / DISTRIBUTIONS

    def pseudo_manifest(self) -> Path:
        return self.stage("pseudo_label") / PSEUDO_SHARDS / "manifest.json"


#: stage -> files (relative to run_dir) it needs, in the order they are produced
def required_inputs(stage: str, eval_model_from: str = "ssl") -> list[str]:
    return {
        "src": [],
        "oracle": [],
        "dist_init": [f"src/{MODEL_FINAL}"],
        "sdca": [f"src/{MODEL_FINAL}", f"dist_init/{DISTRIBUTIONS}"],
        "pseudo_label": [f"sdca/{MODEL_FINAL}"],
        "ssl": [f"sdca/{MODEL_FINAL}", f"pseudo_label/{PSEUDO_SHARDS}/manifest.json"],
        "eval": [f"{eval_model_from}/{MODEL_FINAL}"],
    }[stage]


def check_inputs(run: RunDir, stage: str, eval_model_from: str = "ssl") -> None:
    """Fail at once, naming the first missing file, before any work is done."""
    for rel in required_inputs(stage, eval_model_from):
        path = run.root / rel
        if not path.exists():
            raise MissingInputError(f"stage {stage!r} needs {path}, which does not exist (run the earlier stage first)")
