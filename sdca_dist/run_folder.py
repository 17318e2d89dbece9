"""The run folder: the one place that names its files and folders, and the rules that find them.

A launch writes under one root folder::

    <root>/                       a run, a multi-seed run, or a grid
      grid.json                   a grid: its points, their settings, seeds, stages (GRID)
      summary.json, summary.md    the launch's results (SUMMARY_JSON, SUMMARY_MD) and pictures
      <point>/                    a grid: one point's folder, named from its settings
      seed_<k>/                   seeds=K: one seed's run folder (SEED_PREFIX)

and each run folder (the root itself for one seed) holds::

    config.yaml, config.origin.json, .config.lock    the frozen run configuration
    plan.json                     the launch plan: nodes and each stage's job shape (PLAN)
    cache.json                    which stage cache the run uses (CACHE_SETTING)
    jobs.json                     SLURM: which job runs each stage (JOBS, written by its backend)
    slurm/<stage>/<job>/          SLURM: the jobs' logs (SLURM_LOGS)
    <stage>/
      .lock                       the stage lock (sdca_dist.locks: its holder line)
      LINEAGE.json, DONE          the stage's inputs when it starts; written last, its record
      progress.json               rank 0's progress record (the status view's running row)
      FAILED.json                 the local backend's record of a failed attempt
      environment.json, selection.json, per_class_iou.md, tb/, checkpoints/, val_examples/
      model_final.pt, metrics.json, ...   the files the stage leaves for later stages
      shards/, .verified/         pseudo_label: its shard set and the tars' verification records

The files a stage leaves for later stages are declared with the stages, in
``sdca_dist.stage_table`` (their home), and a shard folder's verification records with the shard
sets (``sdca_dist.data.verification``); this module re-exports them so a reader of the folder
finds every name here. That re-export is the one import of the package's lowest layer that runs
up to the data layer: the records' folder belongs to the shard-set layout, which the data layer
owns, and ``data.verification`` imports no torch. ``STAGE_FILES`` and ``RUN_FILES`` list every
name (a test walks a finished run and checks each entry is one of them). No torch here: the
launcher and the status view read the folder with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdca_dist.data.verification import RECORDS as SHARD_RECORDS
from sdca_dist.stage_table import DISTRIBUTIONS, METRICS, MODEL_FINAL, PSEUDO_MANIFEST, THRESHOLDS

# ----------------------------------------------------------------------------------------------
# run-level names
# ----------------------------------------------------------------------------------------------
CONFIG = "config.yaml"
CONFIG_ORIGIN = "config.origin.json"
CONFIG_LOCK = ".config.lock"
PLAN = "plan.json"
CACHE_SETTING = "cache.json"
JOBS = "jobs.json"
SLURM_LOGS = "slurm"
GRID = "grid.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
IOU_FIGURE = "summary_iou.png"
EXAMPLES_FIGURE = "summary_examples.png"
GRID_FIGURE = "grid_differences.png"
SEED_PREFIX = "seed_"

# ----------------------------------------------------------------------------------------------
# stage-level names (<run_dir>/<stage>/...)
# ----------------------------------------------------------------------------------------------
DONE = "DONE"
LINEAGE = "LINEAGE.json"
LOCK = ".lock"
PROGRESS = "progress.json"
FAILED = "FAILED.json"
ENVIRONMENT = "environment.json"
SELECTION = "selection.json"
PER_CLASS_IOU = "per_class_iou.md"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
VAL_EXAMPLES = "val_examples"
DISTRIBUTIONS_FINAL = "distributions_final.pt"
PSEUDO_LABEL_QUALITY = "pseudo_label_quality.json"
#: the pseudo-label stage's shard folder (its manifest is ``PSEUDO_MANIFEST``); its tars'
#: verification records lie beside it, in ``SHARD_RECORDS`` (``sdca_dist.data.verification``)
PSEUDO_SHARDS = PSEUDO_MANIFEST.split("/")[0]

#: every name a run folder holds at its top level (stage folders and seed/point folders aside)
RUN_FILES = frozenset(
    {CONFIG, CONFIG_ORIGIN, CONFIG_LOCK, PLAN, CACHE_SETTING, JOBS, SLURM_LOGS}
    | {GRID, SUMMARY_JSON, SUMMARY_MD, IOU_FIGURE, EXAMPLES_FIGURE, GRID_FIGURE}
)
#: every name a stage folder holds at its top level
STAGE_FILES = frozenset(
    {DONE, LINEAGE, LOCK, PROGRESS, FAILED, ENVIRONMENT, SELECTION, PER_CLASS_IOU, CHECKPOINTS, TENSORBOARD}
    | {VAL_EXAMPLES, DISTRIBUTIONS_FINAL, PSEUDO_LABEL_QUALITY, PSEUDO_SHARDS, SHARD_RECORDS}
    | {MODEL_FINAL, METRICS, DISTRIBUTIONS, THRESHOLDS}
)
#: the records of one attempt, never results (the stage cache copies none of them)
ATTEMPT_RECORDS = frozenset({DONE, LINEAGE, LOCK, PROGRESS, FAILED, CHECKPOINTS, TENSORBOARD})


# ----------------------------------------------------------------------------------------------
# seeds and grid points
# ----------------------------------------------------------------------------------------------
def seed_folder(root: Path, seed: int) -> Path:
    """Seed ``seed``'s run folder under a multi-seed root."""
    return Path(root) / f"{SEED_PREFIX}{seed}"


def seed_of(folder: Path) -> Optional[int]:
    """The seed a ``seed_<k>`` folder name gives, else None."""
    name = Path(folder).name
    rest = name[len(SEED_PREFIX) :]
    return int(rest) if name.startswith(SEED_PREFIX) and rest.isdigit() else None


def planned_seed_folders(root: Path, seeds: list[int]) -> list[tuple[int, Path]]:
    """(seed, run folder) a launch of ``seeds`` uses under ``root``: ``root`` itself for one seed,
    ``seed_<k>/`` below it for several."""
    if len(seeds) == 1:
        return [(seeds[0], Path(root))]
    return [(s, seed_folder(root, s)) for s in seeds]


def seed_folders(root: Path) -> list[tuple[int, Path]]:
    """(seed, run folder) found under a run (or grid point) folder: its ``seed_<k>/`` folders, or
    itself when it holds a frozen configuration (its seed read from it); none otherwise."""
    subs = sorted((seed_of(p), p) for p in Path(root).glob(f"{SEED_PREFIX}*") if p.is_dir() and seed_of(p) is not None)
    if subs:
        return subs  # type: ignore[return-value]
    cfg = Path(root) / CONFIG
    if cfg.is_file():
        m = re.search(r"^seed: (\d+)$", cfg.read_text(), re.M)
        return [(int(m.group(1)) if m else 0, Path(root))]
    return []


def run_folders(root: Path, grid: Optional[dict]) -> list[tuple[str, int, Path]]:
    """(point name or "", seed, run folder) under ``root``: each point of a grid (``grid``: its
    ``grid.json`` record; the folders a point not launched yet will have), else the root's own."""
    root = Path(root)
    if grid is None:
        return [("", seed, rd) for seed, rd in seed_folders(root)]
    seeds = [int(s) for s in grid.get("seeds", [0])]
    out = []
    for name in grid.get("points", []):
        found = seed_folders(root / name) or planned_seed_folders(root / name, seeds)
        out += [(name, seed, rd) for seed, rd in found]
    return out


# ----------------------------------------------------------------------------------------------
# the run folder as the engine sees it
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDir:
    """One run folder: where each stage's files live. A stage function opens an earlier stage's
    file through ``StageContext.input_file``, which asks the stage table which stage made it."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name
