"""Pictures beside the summaries, for where a user would rather look than read.

A run's (or a seed set's) summary writes, beside ``summary.md``:

* ``summary_iou.png``: per-class IoU of every scored stage side by side, one point per seed and
  a bar at the mean over seeds (matplotlib);
* ``summary_examples.png``: a few target-val images (rows) with their ground truth and each
  stage's prediction (columns) in the run's class colours, from the stages' ``val_examples/``
  (``sdca_dist.engine.val_examples``), seed of the first run folder (Pillow: pixel-exact tiles).

A grid's summary writes ``grid_differences.png``: per stage and point, the paired difference to
the baseline (each seed a point, the mean and its 95% interval as a bar), from the grid's
``summary.json``. Every file is written atomically; a summary without scores writes no picture.
Nothing here imports torch (the launcher draws them).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sdca_dist.files import atomic_write_bytes, read_json_dict
from sdca_dist.run_folder import EXAMPLES_FIGURE, GRID_FIGURE, IOU_FIGURE, METRICS, SUMMARY_JSON


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def per_class_by_stage(runs: list[tuple[int, Path]], stages: list[str]) -> dict[str, dict[int, dict]]:
    """{stage: {seed: per_class IoU dict}} of the stages with a metrics.json in some run folder."""
    out: dict[str, dict[int, dict]] = {}
    for stage in stages:
        for seed, rd in runs:
            metrics = read_json_dict(Path(rd) / stage / METRICS)
            if metrics is not None and isinstance(metrics.get("per_class"), dict):
                out.setdefault(stage, {})[seed] = metrics["per_class"]
    return out


def iou_figure(per_class: dict[str, dict[int, dict]], path: Path, title: str = "") -> Optional[Path]:
    """Per-class IoU of every stage (colour) per class (x), each seed a point, the mean a bar."""
    if not per_class:
        return None
    plt = _pyplot()
    names = list(next(iter(next(iter(per_class.values())).values())))
    stages = list(per_class)
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * max(1, len(stages)) ** 0.5 + 2), 4.2))
    colours = plt.get_cmap("tab10")
    for k, stage in enumerate(stages):
        x0 = np.arange(len(names)) - 0.4 + width * (k + 0.5)
        seeds = per_class[stage]
        means = []
        for j, name in enumerate(names):
            vals = [v[name] for v in seeds.values() if v.get(name) is not None]
            means.append(sum(vals) / len(vals) if vals else math.nan)
            if vals:
                ax.scatter([x0[j]] * len(vals), vals, s=12, color=colours(k % 10), zorder=3, edgecolors="black")
        ax.bar(x0, np.nan_to_num(means), width=width * 0.9, color=colours(k % 10), alpha=0.45, label=stage)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    seeds_n = max(len(s) for s in per_class.values())
    ax.set_title(title or f"per-class IoU by stage ({seeds_n} seed(s): points; mean: bars)")
    ax.legend(fontsize=8, ncol=min(len(stages), 6))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def examples_panel(run_dir: Path, stages: list[str], palette: np.ndarray, path: Path) -> Optional[Path]:
    """Rows = the stored target-val examples, columns = image, ground truth, each stage's
    prediction; labels in ``palette`` (class colours), ignore black. Pillow, pixel-exact tiles."""
    from PIL import Image, ImageDraw

    from sdca_dist.classes import colorize
    from sdca_dist.engine.val_examples import read_examples

    shown = [(s, read_examples(Path(run_dir) / s)) for s in stages]
    shown = [(s, ex) for s, ex in shown if ex]
    if not shown:
        return None
    rows = min(len(ex) for _, ex in shown)
    first = shown[0][1]
    columns = ["image", "ground truth"] + [s for s, _ in shown]
    h = max(first[i]["image"].shape[0] for i in range(rows))
    w = max(first[i]["image"].shape[1] for i in range(rows))
    head, gap = 16, 2
    canvas = Image.new("RGB", (len(columns) * (w + gap), head + rows * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * (w + gap) + 2, 2), name, fill="black")
    n = len(palette)
    for r in range(rows):
        tiles = [first[r]["image"], colorize(first[r]["label"], n, palette)]
        tiles += [colorize(ex[r]["pred"], n, palette) for _, ex in shown]
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (c * (w + gap), head + r * (h + gap)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_run_figures(cfg, root: Path, runs: list[tuple[int, Path]], stages: list[str]) -> list[Path]:
    """The run summary's pictures (``IOU_FIGURE``, ``EXAMPLES_FIGURE``) in ``root``; the paths written."""
    from sdca_dist.classes import builtin_table, run_classes

    root = Path(root)
    written = []
    data = cfg.get("data")
    scored_on = f"scored on {data.target_val}" if data is not None else "scored on target val"
    p = iou_figure(
        per_class_by_stage(runs, stages), root / IOU_FIGURE, f"{cfg.conf}: per-class IoU by stage, {scored_on}"
    )
    written += [p] if p else []
    if runs:
        table = run_classes(data) if data is not None else builtin_table(19)
        p = examples_panel(runs[0][1], stages, table.palette(), root / EXAMPLES_FIGURE)
        written += [p] if p else []
    return written


def grid_figure(root: Path) -> Optional[Path]:
    """``GRID_FIGURE`` from the grid's summary.json: per (stage, point) the paired differences to
    the baseline, each seed a point, the mean with its 95% interval; None without differences."""
    summary = read_json_dict(Path(root) / SUMMARY_JSON) or {}
    diffs: dict[str, Any] = summary.get("paired_differences") or {}
    rows = [
        (f"{stage}: {point}", d)
        for stage, per_point in diffs.items()
        if isinstance(per_point, dict)
        for point, d in per_point.items()
        if isinstance(d, dict) and "mean" in d
    ]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.45 * len(rows)))
    for y, (label, d) in enumerate(rows):
        lo, hi = (d.get("ci95") or [math.nan, math.nan])[:2]
        if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
            ax.plot([lo, hi], [y, y], color="tab:blue", linewidth=2)
        ax.plot([d["mean"]], [y], "o", color="tab:blue", markersize=7)
        seeds = list((d.get("per_seed") or {}).values())
        ax.scatter(seeds, [y + 0.18] * len(seeds), s=10, color="black", zorder=3)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"mIoU difference to the baseline {summary.get('baseline', '')} (paired by seed)")
    ax.set_title("paired differences: seeds (points), mean and 95% interval")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, Path(root) / GRID_FIGURE)
