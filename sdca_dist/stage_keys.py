"""Stage keys: what a stage's result depends on, as one hash.

Two stages with the same key compute the same files, so a stage whose key has been computed
before (in any run folder sharing the stage cache, ``sdca_dist.stage_cache``) can reuse that
result instead of running. The key hashes:

* the settings the stage reads: ``COMMON_READS`` (every stage) plus its ``StageSpec.reads`` and
  the names of the shard sets it reads (``data.<set>``). A setting missing here that changes the
  result would make two different computations share a key (a silently wrong reuse); a setting
  listed that does not change it only costs reuse. So the lists are generous: the whole ``train``,
  ``model`` and ``engine`` sections for every stage, the synthetic generator's settings, and the
  whole ``method`` section for every stage that reads any of it after sdca;
* the sha256 of every file the stage reads (earlier stages' outputs, shard manifests, weights);
* the code: the package version and a hash of every ``sdca_dist`` source file, plus the versions
  of torch and DALI (numerics);
* how it ran: the world size (each rank draws its own augmentation, so 1 and 2 ranks train
  different models from the same settings) and the device type.

``settings_key`` is the settings part alone: it says whether a stage folder's DONE was made
with the settings a configuration gives that stage (``Lineage.fresh``; a consumer checking its
producer). No torch here: the launcher plans with it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from sdca_dist.stage_table import spec

#: settings every stage reads: the seed, the model and engine, the training section (iteration
#: counts, scale, evaluation batch, selection rule), and how the data is found and generated
COMMON_READS: tuple[str, ...] = (
    "conf",
    "seed",
    "model",
    "engine",
    "train",
    "data.num_classes",
    "data.classes",
    "data.shards_root",
    "data.num_threads",
    "data.synthetic",
    "data.synthetic_seed",
    "data.synthetic_counts",
    "data.synthetic_source_size",
    "data.synthetic_target_size",
    "data.synthetic_gap",
)

_MISSING = "(absent)"
_DALI = ("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130", "nvidia-dali")


def reads_of(stage: str) -> tuple[str, ...]:
    """Every setting ``stage``'s key covers, in a stable order."""
    s = spec(stage)
    keys = [*COMMON_READS, *(f"data.{k}" for k in s.shard_sets), *s.reads]
    return tuple(dict.fromkeys(keys))


def _select(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def stage_settings(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The settings ``stage`` reads, as plain data keyed by their dotted names."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    out = {key: _select(data, key) for key in reads_of(stage)}
    classes = out.get("data.classes")
    if isinstance(classes, str) and classes:  # the file's content, not only its path: names, colours, values
        from sdca_dist.classes import ClassesError, load_classes

        try:
            out["data.classes"] = {"path": classes, "table": load_classes(classes).to_json()}
        except ClassesError as exc:
            out["data.classes"] = {"path": classes, "error": str(exc)}
    return out


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def settings_key(cfg: DictConfig, stage: str) -> str:
    """sha256 of the stage's name, function and the settings it reads (the settings part)."""
    return _digest({"stage": stage, "run": spec(stage).run, "settings": stage_settings(cfg, stage)})


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, a hash of every source file of the package (sorted by path), and
    the versions of the numerical libraries."""
    import sdca_dist

    root = Path(sdca_dist.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    dalis = [f"{d} {_version(d)}" for d in _DALI if _version(d) != "absent"]
    libs = f"torch {_version('torch')}, {', '.join(dalis) or 'no dali'}"
    return f"sdca_dist {sdca_dist.__version__} src {h.hexdigest()[:16]} ({libs})"


def stage_key(
    cfg: DictConfig, stage: str, input_hashes: Mapping[str, str], *, world_size: int, device: str = "cpu"
) -> str:
    """The key of ``stage`` run under ``cfg`` on these inputs (``{input: sha256}`` as the lineage
    records them), on ``world_size`` ranks of ``device`` type ("cpu" or "cuda")."""
    return _digest(
        {
            "settings": settings_key(cfg, stage),
            "inputs": dict(input_hashes),
            "code": code_version(),
            "world_size": int(world_size),
            "device": str(device).split(":")[0],
        }
    )


def recipe_keys(cfg: DictConfig, stages: list[str], world_sizes: Mapping[str, int]) -> dict[str, str]:
    """For planning, before any input exists: each stage's settings key chained with the recipe
    keys of the stages it reads from (and its world size). Two grid points whose recipe keys of
    a stage match will compute that stage identically (given the same shard sets), so the
    launcher runs it once and the other points reuse it."""
    from sdca_dist.stage_table import STAGE_NAMES, inputs_of

    out: dict[str, str] = {}
    for stage in STAGE_NAMES:  # table order: producers first
        ups = {i.producer: out[i.producer] for i in inputs_of(stage, cfg) if i.producer in out}
        out[stage] = _digest(
            {"settings": settings_key(cfg, stage), "inputs": ups, "world_size": int(world_sizes.get(stage, 1))}
        )
    return {s: out[s] for s in stages}
