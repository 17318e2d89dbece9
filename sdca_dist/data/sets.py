"""Where the shard sets live, and the synthetic benchmark's sets: no torch here.

The launcher (preflight, the dry run, the status view, freshness) and the engine both ask this
module which folder a named shard set is in. It also makes the embedded synthetic benchmark
appear on first use (``conf=synthetic``): the first process to take the lock generates and
shards; the others wait and then find it ready.

The synthetic benchmark is keyed by its generator settings (``data.synthetic_seed``,
``synthetic_counts``, ``synthetic_source_size``, ``synthetic_target_size``, ``synthetic_gap``):
``<shards_root>/synthetic.json`` records the settings its sets were generated with (written
before generation starts, so an interrupted generation resumes in the same folder). Other
settings generate into their own folder ``<shards_root>/settings-<hash>/`` (with its own
record), never reusing another set; so does a ``shards_root`` holding sets without a record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sdca_dist.shard import shard_command
from sdca_dist.synth import synth_command

#: shard sets of the synthetic benchmark: name -> (layout, split)
SYNTHETIC_SETS = {
    "gta5_train": ("gta5", "train"),
    "cityscapes_train": ("cityscapes", "train"),
    "cityscapes_val": ("cityscapes", "val"),
}


class DataConfigError(ValueError):
    """A data setting that cannot work (e.g. a batch that does not split over the ranks)."""


#: the generator-settings record of a synthetic shards folder
SYNTHETIC_RECORD = "synthetic.json"


def generator_settings(cfg: DictConfig) -> dict:
    """The settings that determine the synthetic benchmark's bytes (its folder's key)."""
    d = cfg.data
    return {
        "seed": int(d.synthetic_seed),
        "counts": [int(x) for x in d.synthetic_counts],
        "source_size": [int(x) for x in d.synthetic_source_size],
        "target_size": [int(x) for x in d.synthetic_target_size],
        "gap": {str(k): float(v) for k, v in sorted(dict(d.get("synthetic_gap") or {}).items())},
    }


def _record_of(folder: Path) -> Optional[dict]:
    try:
        data = json.loads((folder / SYNTHETIC_RECORD).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _holds_sets(folder: Path) -> bool:
    return (folder / "raw").exists() or any((folder / name).exists() for name in SYNTHETIC_SETS)


def synthetic_root(cfg: DictConfig) -> Path:
    """The folder of the synthetic sets for these generator settings: ``data.shards_root`` when its
    record holds them (or it holds no sets yet), else ``<shards_root>/settings-<hash>``."""
    root = Path(cfg.data.shards_root)
    if not cfg.data.synthetic:
        return root
    want = generator_settings(cfg)
    record = _record_of(root)
    if record == want or (record is None and not _holds_sets(root)):
        return root
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"settings-{key}"


def shard_set(cfg: DictConfig, name: str) -> Path:
    """Folder of a named shard set (absolute names are used as they are)."""
    path = Path(name)
    return path if path.is_absolute() else synthetic_root(cfg) / name


def manifest_path(folder: Path) -> Path:
    return Path(folder) / "manifest.json"


def build_hint(folder: Path) -> str:
    """The command that packs the shard set ``folder`` (``<layout>_<split>``, the presets' names;
    ``--root`` is where the raw dataset is, docs/reproducing.md)."""
    from sdca_dist.data.layouts import LAYOUTS

    layout, _, split = Path(folder).name.rpartition("_")
    if layout not in LAYOUTS or split not in ("train", "val"):
        return f"python -m sdca_dist.shard --layout LAYOUT --root DATASET --split SPLIT --out {folder}"
    return f"python -m sdca_dist.shard --layout {layout} --root data/{layout} --split {split} --out {folder}"


def ensure_synthetic_shards(cfg: DictConfig, log=print) -> None:
    """Generate + shard the synthetic benchmark if its manifests are missing (race-safe), in the
    folder of its generator settings (``synthetic_root``)."""
    if not cfg.data.synthetic:
        return
    wanted = [cfg.data.source, cfg.data.target_train, cfg.data.target_val]
    for name in wanted:
        if name not in SYNTHETIC_SETS:
            raise DataConfigError(
                f"data.source/target name {name!r} is not a synthetic set ({', '.join(SYNTHETIC_SETS)})"
            )
    if all(manifest_path(shard_set(cfg, n)).is_file() for n in wanted) and _record_of(synthetic_root(cfg)):
        return
    top = Path(cfg.data.shards_root)
    try:
        top.mkdir(parents=True, exist_ok=True)
        lock = open(top / ".generate.lock", "w")
    except OSError as exc:
        raise DataConfigError(
            f"data.shards_root={top}: cannot create the synthetic benchmark there ({exc.strerror or exc})"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks block here until the first one is done
        root = synthetic_root(cfg)  # again, under the lock: a concurrent first use may have claimed it
        root.mkdir(parents=True, exist_ok=True)
        if _record_of(root) is None:  # claim the folder before generating: an interrupted run resumes here
            from sdca_dist.files import atomic_write_text

            atomic_write_text(root / SYNTHETIC_RECORD, json.dumps(generator_settings(cfg), indent=1) + "\n")
        raw = root / "raw"
        if not (raw / ".complete").is_file():
            log(f"generating the synthetic benchmark under {raw} ({json.dumps(generator_settings(cfg))})")
            (sh, sw), (th, tw) = cfg.data.synthetic_source_size, cfg.data.synthetic_target_size
            _run(
                synth_command(
                    raw,
                    tuple(int(x) for x in cfg.data.synthetic_counts),
                    (sw, sh),
                    (tw, th),
                    seed=cfg.data.synthetic_seed,
                    knobs=dict(cfg.data.get("synthetic_gap") or {}),
                )
            )
            (raw / ".complete").write_text("ok\n")
        for name in wanted:
            out = shard_set(cfg, name)
            if manifest_path(out).is_file():
                continue
            layout, split = SYNTHETIC_SETS[name]
            log(f"sharding synthetic {layout}/{split} -> {out}")
            _run(shard_command(layout, raw / layout, split, out, workers=1))


def _run(cmd: list[str]) -> None:
    env = dict(os.environ)
    # the generator/sharder are single-node tools: never let them see the rank environment
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {tail[0]}")


def check_manifests(cfg: DictConfig, names: list[str]) -> None:
    for name in names:
        path = manifest_path(shard_set(cfg, name))
        if not path.is_file():
            raise FileNotFoundError(f"shard manifest {path} does not exist (pack it with {build_hint(path.parent)})")
