"""A grid's results as files: ``<grid>/summary.json`` and ``summary.md``, written atomically.

From every point's run folders (``<stage>/DONE`` and ``metrics.json``, target-val mIoU) and the
grid record (``grid.json``, written by ``sdca_dist.launch.grid``):

* ``table``: one row per point, per stage the mIoU of each seed, mean, sample std and the 95% t
  interval of the mean over the seeds done, and which seeds reused the stage from the cache;
* ``paired_differences``: per stage, each point minus the baseline point, seed by seed (a seed
  fixes the src model, the distributions and the data order, so the two results pair), with
  mean, std and 95% interval;
* ``main_effects`` (two or more factors): per stage and factor, each level's mean over the
  other factors' levels, seed by seed, with its interval, and the level minus the baseline's
  level (the factor's main effect averaged over the others), paired by seed, with its interval.
  Computed over the seeds every point has, so each level averages the same cells;
* ``failures``: every stage of every point and seed that failed or never ran, and why (the local
  launcher's ``FAILED.json``, SLURM's state and the job's error line), as the status view says it.

The statistics are ``sdca_dist.launch.seed_stats``'s, shared with the run summary. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from sdca_dist.files import atomic_write_text, read_json_dict
from sdca_dist.launch.figures import grid_figure
from sdca_dist.launch.seed_stats import fmt_interval, over_seeds, paired
from sdca_dist.run_folder import DONE, GRID, METRICS, SUMMARY_JSON, SUMMARY_MD, run_folders, seed_folders


def grid_table(root: Path) -> dict[str, Any]:
    """{point: {stage: {per_seed: {seed: mIoU}, n, mean, std, ci95, reused_seeds, wall_seconds}}}
    from the DONE records and metrics of every point's run folders."""
    grid = read_json_dict(root / GRID) or {}
    out: dict[str, Any] = {}
    for name in grid.get("points", []):
        rows: dict[str, Any] = {}
        for stage in grid.get("stages", []):
            per_seed, reused, walls = {}, [], []
            for seed, rd in seed_folders(root / name):
                done = read_json_dict(rd / stage / DONE)
                if done is None:
                    continue
                walls.append(float(done.get("wall_seconds", float("nan"))))
                if done.get("reused_from"):
                    reused.append(seed)
                metrics = read_json_dict(rd / stage / METRICS)
                if metrics is not None and "mIoU" in metrics:
                    per_seed[seed] = float(metrics["mIoU"])
            if not walls:
                continue
            row: dict[str, Any] = {"per_seed": per_seed, "reused_seeds": reused, "wall_seconds": walls}
            if per_seed:
                row.update({k: v for k, v in over_seeds(per_seed).items() if k != "per_seed"})
            rows[stage] = row
        out[name] = rows
    return out


def paired_differences(grid: dict, table: dict, stages: list[str]) -> dict[str, dict[str, Any]]:
    """{stage: {point: its difference from the baseline point, paired by seed}}."""
    base = grid["baseline"]
    diffs: dict[str, dict[str, Any]] = {}
    for stage in stages:
        ref = table.get(base, {}).get(stage, {}).get("per_seed", {})
        for name in grid["points"]:
            if name == base:
                continue
            d = paired(table.get(name, {}).get(stage, {}).get("per_seed", {}), ref)
            if d is not None:
                diffs.setdefault(stage, {})[name] = d
    return diffs


def main_effects(grid: dict, table: dict, stages: list[str]) -> dict[str, dict[str, Any]]:
    """{stage: {factor: {"baseline_level", "seeds", "levels": {level: {...mean over the other
    factors by seed..., "effect": level - baseline level, paired by seed}}}}}, over the seeds
    every point has for that stage; a stage some point lacks entirely is left out."""
    sweeps, levels_of = grid.get("sweeps", []), grid.get("point_levels", {})
    if len(sweeps) < 2 or not levels_of:
        return {}
    base_levels = levels_of[grid["baseline"]]
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        cells = {n: table.get(n, {}).get(stage, {}).get("per_seed", {}) for n in grid["points"]}
        seeds = sorted(set.intersection(*(set(c) for c in cells.values())))
        if not seeds:
            continue
        for f, sweep in enumerate(sweeps):
            by_level: dict[str, dict[int, float]] = {}
            for level in sweep["values"]:
                members = [n for n in grid["points"] if levels_of[n][f] == level]
                by_level[level] = {s: sum(cells[n][s] for n in members) / len(members) for s in seeds}
            rows = {}
            for level, per_seed in by_level.items():
                row = over_seeds(per_seed)
                if level != base_levels[f]:
                    row["effect"] = paired(per_seed, by_level[base_levels[f]])
                rows[level] = row
            out.setdefault(stage, {})[sweep["key"]] = {
                "baseline_level": base_levels[f],
                "seeds": seeds,
                "levels": rows,
            }
    return out


def failures(root: Path, grid: dict) -> list[dict[str, str]]:
    """Every planned stage of every point and seed that has no DONE: its state and why, as the
    status view reads it (``failed`` with the exit code or SLURM state and the error line,
    ``not started``), or ``not run`` naming the earlier chain stage of that seed that failed (and
    the status view's detail, e.g. SLURM's cancelling the job before it started)."""
    from sdca_dist.launch.status import queue_states, stage_row, stops_chain

    folders = run_folders(root, grid)
    jobs, states = queue_states([rd for _, _, rd in folders])
    out = []
    for name, seed, rd in folders:
        stopped_by = None  # the first chain stage of this seed that failed
        for stage in grid.get("stages", []):
            if (rd / stage / DONE).is_file():
                continue
            state, detail = stage_row(rd, stage, None, None, jobs[rd], states)
            if stopped_by is not None and state in ("failed", "not started", "not run"):
                state, detail = "not run", f"{stopped_by} failed" + (f" ({detail})" if detail else "")
            elif stops_chain(stage, state):
                stopped_by = stage
            out.append({"point": name, "seed": seed, "stage": stage, "state": state, "why": detail})
    return out


def write_grid_summary(
    root: Path | str, log: Callable[[str], None] = print, points_failed: Optional[dict[str, str]] = None
) -> Optional[Path]:
    """``summary.md`` / ``summary.json`` at the grid folder (both atomically); the path of
    summary.md, or None without a grid record. ``points_failed``: {point: why} from the launch
    (a point that ended with an error, or was not launched because a point it takes a stage from
    failed)."""
    root = Path(root)
    grid = read_json_dict(root / GRID)
    if grid is None:
        return None
    table = grid_table(root)
    stages = [s for s in grid["stages"] if any("mean" in table[p].get(s, {}) for p in table)]
    diffs = paired_differences(grid, table, stages)
    effects = main_effects(grid, table, stages)
    failed = failures(root, grid)
    payload = {
        **grid,
        "table": table,
        "paired_differences": diffs,
        "main_effects": effects,
        "failures": failed,
        "points_failed": dict(points_failed or {}),
    }
    lines = _markdown(root, grid, table, stages, diffs, effects, failed)
    if points_failed:
        lines += ["", "Points that failed or were not launched:", ""]
        lines += [f"- {name}: {why}" for name, why in points_failed.items()]
    atomic_write_text(root / SUMMARY_JSON, json.dumps(payload, indent=1) + "\n")
    atomic_write_text(root / SUMMARY_MD, "\n".join(lines) + "\n")
    grid_figure(root)  # grid_differences.png beside summary.json (sdca_dist.launch.figures)
    log("\n".join(lines))
    return root / SUMMARY_MD


def _markdown(
    root: Path, grid: dict, table: dict, stages: list[str], diffs: dict, effects: dict, failed: list[dict]
) -> list[str]:
    base = grid["baseline"]
    swept = "; ".join(f"{s['key']} in {{{', '.join(s['values'])}}}" for s in grid["sweeps"])
    lines = [
        f"# Grid {root}: {swept}; seeds {', '.join(str(s) for s in grid['seeds'])}",
        "",
        "mIoU, mean ± std over seeds (n = seeds done) and 95% interval of the mean; (r) = reused from the "
        "stage cache for some seeds",
        "",
        "| point | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name in grid["points"]:
        cells = []
        for stage in stages:
            row = table.get(name, {}).get(stage)
            if not row or "mean" not in row:
                cells.append("failed" if any(f["point"] == name and f["stage"] == stage for f in failed) else "-")
                continue
            mark = " (r)" if row["reused_seeds"] else ""
            ci = f" {fmt_interval(row, signed=False)}" if row.get("ci95") else ""
            cells.append(f"{row['mean']:.2f} ± {row['std']:.2f}{ci} (n={row['n']}){mark}")
        label = f"{name} (baseline)" if name == base else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if diffs:
        lines += [
            "",
            f"Paired differences against the baseline {base} (same seed: same src model and data order),",
            "mean, std and 95% interval (t distribution over the seeds):",
            "",
            "| stage | point | per seed | mean | std | 95% interval |",
            "|---|---|---|---|---|---|",
        ]
        for stage, per_point in diffs.items():
            for name, d in per_point.items():
                per = ", ".join(f"{s}: {v:+.2f}" for s, v in d["per_seed"].items())
                lines.append(f"| {stage} | {name} | {per} | {d['mean']:+.2f} | {d['std']:.2f} | {fmt_interval(d)} |")
    if effects:
        lines += [
            "",
            "Main effects: each factor's level averaged over the other factors' levels, seed by seed, and its",
            "difference from the baseline's level (paired by seed), mean, std and 95% interval:",
            "",
            "| stage | factor | level | mean ± std | 95% interval | minus baseline level | 95% interval |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage, per_factor in effects.items():
            for factor, e in per_factor.items():
                for level, row in e["levels"].items():
                    eff = row.get("effect")
                    minus = f"{eff['mean']:+.2f} ± {eff['std']:.2f}" if eff else "(baseline)"
                    lines.append(
                        f"| {stage} | {factor} | {level} | {row['mean']:.2f} ± {row['std']:.2f} | "
                        f"{fmt_interval(row, signed=False)} | {minus} | {fmt_interval(eff) if eff else ''} |"
                    )
    if failed:
        lines += ["", "Not finished (failed, or not run because what it needs failed):", ""]
        lines += [
            f"- {f['point']} seed {f['seed']} {f['stage']}: {f['state']}" + (f"; {f['why']}" if f["why"] else "")
            for f in failed
        ]
    return lines
