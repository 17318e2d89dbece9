"""The launch's results as files: ``<root>/summary.json`` and ``summary.md``.

Per stage: each seed's mIoU, their mean and sample std, per-class IoU (mean over seeds) and wall
time, read from each run folder's ``<stage>/DONE`` and ``metrics.json``. Papers report 3-seed
means; single-seed numbers are hard to reproduce. Rows whose weights were selected on the
evaluation set (``train.select=best_val``) are marked. Each ablation stage (``StageSpec.paired_with``)
is also reported as a paired difference, its stage minus the ablation seed by seed (mean, std and
95% t interval, ``sdca_dist.launch.seed_stats``), under the name its ``effect`` gives
(``alignment_effect``: sdca - sdca_no_align); an unpaired reference stage (the oracle) is also
reported at summary.json's top level. Both files are written atomically and say which shard set
scored (``data.target_val``); the pictures beside them come from ``sdca_dist.launch.figures``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from sdca_dist.files import atomic_write_text, read_json_dict
from sdca_dist.launch.figures import write_run_figures
from sdca_dist.launch.seed_stats import fmt_interval, mean_std, paired
from sdca_dist.run_folder import DONE, METRICS, SUMMARY_JSON, SUMMARY_MD
from sdca_dist.stage_table import TABLE, spec


def write_summary(cfg: DictConfig, root: Path, runs: list[tuple[int, Path]], stages: list[str]) -> Optional[Path]:
    """summary.json + summary.md: per stage, each seed's mIoU, mean and std, per-class IoU (mean over
    seeds) and wall time. Papers report 3-seed means; single-seed numbers are hard to reproduce."""
    table: dict[str, dict] = {}
    for stage in stages:
        per_seed, walls, per_class = [], [], []
        for seed, rd in runs:
            done = read_json_dict(rd / stage / DONE)
            if done is None:
                continue
            walls.append(float(done.get("wall_seconds", float("nan"))))
            metrics = read_json_dict(rd / stage / METRICS)
            if metrics is not None:
                row = {"seed": seed, "mIoU": float(metrics["mIoU"])}
                if "mIoU13" in metrics:
                    row["mIoU13"] = float(metrics["mIoU13"])
                selected = _selected_on_val(rd, stage, metrics)  # train.select=best_val
                if selected is not None:
                    row["selected_iteration"] = selected.get("iteration")
                per_seed.append(row)
                per_class.append(metrics["per_class"])
        if not walls:
            continue
        entry: dict[str, Any] = {"wall_seconds": walls, "wall_seconds_mean": sum(walls) / len(walls)}
        if per_seed:
            ious = [r["mIoU"] for r in per_seed]
            mean, std = mean_std(ious)
            names = list(per_class[0])
            entry.update(
                {
                    "per_seed": per_seed,
                    "mIoU": ious,
                    "mean": mean,
                    "std": std,
                    "per_class_mean": {n: _mean([pc.get(n) for pc in per_class]) for n in names},
                }
            )
            entry["selected_on_val"] = any("selected_iteration" in r for r in per_seed)
        table[stage] = entry
    if not table:
        return None
    data = cfg.get("data")  # a summary re-drawn from bare records may have no data section
    lines = [f"# {cfg.conf}: {len(runs)} seed(s), run folder {root}", ""]
    lines += [describe_data(cfg), ""] if data is not None else []
    lines += [
        "| stage | mIoU mean ± std | per seed | wall time (s, mean) |",
        "|---|---|---|---|",
    ]
    for stage, row in table.items():
        if "mean" in row:
            per = ", ".join(f"{v['seed']}: {v['mIoU']:.2f}" for v in row["per_seed"])
            mark = " †" if row.get("selected_on_val") else ""
            lines.append(
                f"| {stage}{mark} | {row['mean']:.2f} ± {row['std']:.2f} | {per} | {row['wall_seconds_mean']:.0f} |"
            )
        else:
            lines.append(f"| {stage} | - | - | {row['wall_seconds_mean']:.0f} |")
    if any(row.get("selected_on_val") for row in table.values()):
        lines += [
            "",
            "† selected on the evaluation set (train.select=best_val: the weights with the best target-val "
            "mIoU among those evaluated every train.select_every iterations, as the reference code does); "
            "optimistic, not comparable with final-iteration numbers",
        ]
    effects = paired_effects(table)
    for ablation, effect in effects.items():
        s = spec(ablation)
        name = str(s.effect)
        lines += [
            "",
            f"{name[:1].upper() + name[1:]} ({s.paired_with} - {ablation}, paired by seed): {effect['mean']:+.2f} ± "
            f"{effect['std']:.2f} mIoU ({', '.join(f'{k}: {v:+.2f}' for k, v in effect['per_seed'].items())}), "
            f"95% interval {fmt_interval(effect)}",
        ]
    scored = [s for s in table if "per_class_mean" in table[s]]
    if scored:
        lines += [
            "",
            "Per-class IoU (mean over seeds):",
            "",
            "| class | " + " | ".join(scored) + " |",
            "|---|" + "---|" * len(scored),
        ]
        for name in table[scored[0]]["per_class_mean"]:
            vals = [table[s]["per_class_mean"].get(name) for s in scored]
            lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines += ["", f"TensorBoard: tensorboard --logdir {root}"]
    root.mkdir(parents=True, exist_ok=True)
    payload = {"conf": cfg.conf, "seeds": [s for s, _ in runs], "stages": table}
    if data is not None:
        payload["scored_on"] = str(data.target_val)  # the shard set every stage's mIoU is computed on
    for stage in table:
        if spec(stage).launch_flag and not spec(stage).paired_with:
            payload[stage] = table[stage]
    for ablation, effect in effects.items():
        payload[str(spec(ablation).effect).replace(" ", "_")] = effect
    atomic_write_text(root / SUMMARY_JSON, json.dumps(payload, indent=1) + "\n")
    atomic_write_text(root / SUMMARY_MD, "\n".join(lines) + "\n")
    write_run_figures(cfg, root, runs, stages)
    print("\n".join(lines), flush=True)
    return root / SUMMARY_MD


def data_manifest(cfg: DictConfig, name: str) -> Path:
    """The manifest path of the shard set ``name`` of a run's data section."""
    from sdca_dist.data.sets import manifest_path, shard_set

    return manifest_path(shard_set(cfg, name))


def describe_data(cfg: DictConfig) -> str:
    """One line: source -> target (labelled or not), the split every stage is scored on, the classes."""
    from sdca_dist.data.labelled import data_line

    return data_line(cfg, lambda name: data_manifest(cfg, name))


def _selected_on_val(rd: Path, stage: str, metrics: dict) -> Optional[dict]:
    """The ``selected`` record (train.select=best_val) behind a stage's number, or None: a training
    stage's own, or for eval that of the stage whose model it scored."""
    selected = metrics.get("selected")
    model_from = str(metrics.get("model_from") or "")
    if selected is None and stage == "eval" and model_from and not model_from.endswith(".pt"):
        selected = (read_json_dict(rd / model_from / METRICS) or {}).get("selected")
    return selected if isinstance(selected, dict) and selected.get("rule") == "best_val" else None


def paired_effects(table: dict[str, dict]) -> dict[str, dict]:
    """ablation stage -> its paired difference, for each ablation in ``table`` whose stage is
    there too (in table order)."""
    out = {}
    for s in TABLE:
        if s.paired_with and s.name in table:
            effect = paired_difference(table, s.paired_with, s.name)
            if effect is not None:
                out[s.name] = effect
    return out


def paired_difference(table: dict[str, dict], stage: str, ablation: str) -> Optional[dict]:
    """``stage`` minus ``ablation`` per seed (same inputs and seed: a paired difference), with
    mean, sample std and 95% t interval (``seed_stats.paired``); None without both stages' scores."""
    a, b = table.get(stage, {}), table.get(ablation, {})
    if "per_seed" not in a or "per_seed" not in b:
        return None
    return paired({r["seed"]: r["mIoU"] for r in a["per_seed"]}, {r["seed"]: r["mIoU"] for r in b["per_seed"]})


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
