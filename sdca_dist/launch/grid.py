"""Experiment grids: one launch over several settings, sharing the stages they have in common.

``python launch/slurm.py conf=synthetic method.tau=1,10,100 seeds=3 run_dir=runs/tau`` (Hydra's
sweep syntax: ``key=a,b,c``, ``key=choice(a,b)``, ``key=range(start,stop[,step])``; several
swept keys make their product; ``--multirun``/``-m`` is accepted and changes nothing) launches
one ordinary run per point, in ``<run_dir>/<key>=<value>[,<key>=<value>...]/`` (with
``seed_<k>/`` below it for ``seeds=K``), all through the single-run launcher, so every point is
refused, frozen and resumed exactly as a single run is.

Sharing: a stage whose settings, inputs and code are the same in two points has the same stage
key (``sdca_dist.stage_keys``); the first point to run it publishes it to the stage cache and
the others reuse it (``sdca_dist.stage_cache``). In a ``method.tau`` sweep src and dist_init
read no ``method.tau``: they run once per seed. Locally the points run in order, so the later
points find the shared stages in the cache; on SLURM the shared stage's job of a later point
depends (afterok) on the job of the first point that computes it, so it starts after that one
published and only copies.

``<run_dir>/grid.json`` records the grid; ``<run_dir>/summary.md`` / ``summary.json`` hold the
points x stages table and the paired differences against the baseline point
(``baseline=method.tau=100``, default the first point): per seed, mean, std and a 95% interval
(t distribution over the seeds). No torch here.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sdca_dist.config.compose import ConfigError
from sdca_dist.files import read_json_dict
from sdca_dist.launch.figures import grid_figure

GRID_FILE = "grid.json"
#: keys a grid cannot sweep: they name the job or the seeds (``seeds=K`` gives seeds)
_NOT_SWEPT = ("run_dir", "stage", "seed", "conf")

Point = tuple[tuple[str, str], ...]  # ((key, value), ...) in command-line order


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """``text`` split at commas outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _sweep_values(key: str, value: str) -> Optional[list[str]]:
    """The values a sweep expression gives, or None when ``value`` is a single value."""
    m = re.fullmatch(r"\s*(choice|range)\((.*)\)\s*", value)
    if m:
        args = [a.strip() for a in _split_top(m.group(2))] if m.group(2).strip() else []
        if m.group(1) == "choice":
            values = args
        else:
            try:
                nums = [int(a) for a in args]
            except ValueError:
                raise ConfigError(f"{key}={value}: range() takes integers (start, stop[, step])") from None
            if not 1 <= len(nums) <= 3 or (len(nums) == 3 and nums[2] == 0):
                raise ConfigError(f"{key}={value}: range() takes (stop), (start, stop) or (start, stop, step != 0)")
            values = [str(v) for v in range(*nums)]
    else:
        parts = _split_top(value)
        if len(parts) == 1:
            return None
        values = [p.strip() for p in parts]
    if not values:
        raise ConfigError(f"{key}={value} sweeps over no values")
    empty = [i for i, v in enumerate(values) if v == ""]
    if empty:
        raise ConfigError(f"{key}={value} has an empty value (position {empty[0] + 1}); remove the extra comma")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={value} lists a value twice")
    return values


def parse_sweeps(run_overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, [(swept key, values)]) of a command line's run settings."""
    from sdca_dist.config.compose import _schema_keys

    fixed, sweeps = [], []
    known = set(_schema_keys())
    for arg in run_overrides:
        if arg in ("--multirun", "-m") or "=" not in arg:
            if arg not in ("--multirun", "-m"):
                fixed.append(arg)
            continue
        key, value = arg.split("=", 1)
        values = _sweep_values(key, value)
        if values is None:
            fixed.append(arg)
            continue
        bare = key.lstrip("+~")
        if bare in _NOT_SWEPT:
            hint = " (use seeds=K for several seeds)" if bare == "seed" else ""
            raise ConfigError(f"a grid cannot sweep {bare}{hint}")
        if bare not in known and not any(bare.startswith(k + ".") for k in known):
            raise ConfigError(f"grid over unknown setting {bare!r} ({arg})")
        if any(k == bare for k, _ in sweeps):
            raise ConfigError(f"{bare} is swept twice")
        sweeps.append((bare, values))
    return fixed, sweeps


def is_grid(argv: Sequence[str]) -> bool:
    """Whether a command line's run settings sweep anything (raises ConfigError on bad sweeps)."""
    from sdca_dist.config.run_config import split_overrides

    run, _ = split_overrides([a for a in argv if a not in ("--multirun", "-m")])
    return bool(parse_sweeps(run)[1])


def expand(sweeps: list[tuple[str, list[str]]]) -> list[Point]:
    keys = [k for k, _ in sweeps]
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def point_name(point: Point) -> str:
    """The point's folder name, Hydra's ``override_dirname`` style: ``method.tau=10,method.delta=0.5``."""
    return ",".join(f"{k}={v}".replace("/", "_") for k, v in point)


def parse_baseline(text: Optional[str], points: list[Point]) -> Point:
    """The baseline point named by ``baseline=key=value[,key=value]`` (default: the first point)."""
    if not text:
        return points[0]
    given = {}
    for part in _split_top(text):
        if "=" not in part:
            raise ConfigError(f"baseline={text}: expected key=value (e.g. baseline={point_name(points[0])})")
        k, v = part.split("=", 1)
        given[k.strip()] = v.strip()
    matches = [p for p in points if all(dict(p).get(k) == v for k, v in given.items())]
    if len(matches) != 1:
        names = ", ".join(point_name(p) for p in points)
        what = "no point" if not matches else f"{len(matches)} points"
        raise ConfigError(f"baseline={text} matches {what} of the grid ({names})")
    return matches[0]


# ----------------------------------------------------------------------------------------------
# the launch
# ----------------------------------------------------------------------------------------------
def _arg(argv: Sequence[str], key: str) -> Optional[str]:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def point_argv(fixed: list[str], launch_overrides: list[str], root: Path, point: Point, cache_dir: str) -> list[str]:
    argv = [a for a in fixed if a.split("=", 1)[0] != "run_dir"]
    argv += [f"{k}={v}" for k, v in point]
    argv += [a for a in launch_overrides if a.split("=", 1)[0] not in ("cache_dir", "baseline")]
    return argv + [f"run_dir={root / point_name(point)}", f"cache_dir={cache_dir}"]


def shared_with(
    fixed: list[str], points: list[Point], stages: list[str], seeds: list[int]
) -> dict[tuple[int, str], Optional[int]]:
    """For each (point index, stage): the index of the first point whose recipe for that stage is
    the same for every seed (the one that computes it), else None (computes it itself)."""
    from sdca_dist.config import compose_config
    from sdca_dist.stage_keys import recipe_keys

    keys: list[dict[str, tuple]] = []
    for point in points:
        per_seed = [
            recipe_keys(
                compose_config([*fixed, *(f"{k}={v}" for k, v in point), f"seed={s}"]),
                stages,
                {},
            )
            for s in seeds
        ]
        keys.append({st: tuple(k[st] for k in per_seed) for st in stages})
    out: dict[tuple[int, str], Optional[int]] = {}
    for i, point_keys in enumerate(keys):
        for st in stages:
            first = next((j for j in range(i) if keys[j][st] == point_keys[st]), None)
            out[(i, st)] = None if first is None else (out[(first, st)] if out[(first, st)] is not None else first)
    return out


def run_grid(argv: Sequence[str], launch_one: Callable[..., int], wait: Optional[Callable] = None) -> int:
    """Launch every point of the grid through ``launch_one(argv, hooks)`` (the single-run
    launcher). Every point is checked (a dry run of each, output kept back) before any is
    launched, so a bad point means nothing is written or submitted. On SLURM with ``wait=true``,
    ``wait(submitted)`` (the launcher's) waits for every point's jobs at once, at the end."""
    from sdca_dist.config.run_config import parse_launch, split_overrides
    from sdca_dist.stage_cache import default_cache_dir

    user = [a for a in argv if a not in ("--multirun", "-m")]
    run_overrides, launch_overrides = split_overrides(user)
    launch = parse_launch(launch_overrides)
    fixed, sweeps = parse_sweeps(run_overrides)
    points = expand(sweeps)
    baseline = parse_baseline(launch.baseline, points)
    root = Path(_arg(run_overrides, "run_dir") or "runs/grid")
    cache_dir = str(Path(launch.cache_dir).resolve() if launch.cache_dir else default_cache_dir(root))

    # every point checked first: a dry run each, its output kept back
    checked: list[str] = []
    for point in points:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = launch_one([*point_argv(fixed, launch_overrides, root, point, cache_dir), "dry_run=true"], {})
        if rc != 0:
            print(f"error: grid point {point_name(point)} cannot run (above); nothing launched", file=sys.stderr)
            return rc
        checked.append(out.getvalue())
    from sdca_dist.launch.plan import planned_stages

    stages = planned_stages(launch)
    base_seed = _preset_seed(fixed)  # the command line's seed=, else the preset's
    seeds = [base_seed + k for k in range(launch.seeds)]
    sharing = shared_with(fixed, points, stages, seeds)

    print(f"[grid] {len(points)} point(s) x {launch.seeds} seed(s) under {root}; stage cache {cache_dir}", flush=True)
    for i, point in enumerate(points):
        reused = [s for s in stages if sharing[(i, s)] is not None]
        computed = [s for s in stages if sharing[(i, s)] is None]
        mark = " (baseline)" if point == baseline else ""
        line = f"[grid] {point_name(point)}{mark}: computes {', '.join(computed) or 'nothing'}"
        if reused:
            line += "; reuses " + ", ".join(f"{s} from {point_name(points[sharing[(i, s)]])}" for s in reused)
        print(line, flush=True)
    if launch.dry_run:
        for point, text in zip(points, checked):
            print(f"[grid] --- {point_name(point)} ---\n{text.rstrip()}", flush=True)
        return 0

    root.mkdir(parents=True, exist_ok=True)
    record = {
        "sweeps": [{"key": k, "values": v} for k, v in sweeps],
        "points": [point_name(p) for p in points],
        "baseline": point_name(baseline),
        "seeds": seeds,
        "stages": stages,
        "fixed": fixed,
        "cache_dir": cache_dir,
    }
    from sdca_dist.files import atomic_write_text

    atomic_write_text(root / GRID_FILE, json.dumps(record, indent=1) + "\n")
    jobs: list[dict[str, str]] = []
    submitted: list = []
    for i, point in enumerate(points):
        after = {
            s: [jobs[sharing[(i, s)]][s]] for s in stages if sharing[(i, s)] is not None and s in jobs[sharing[(i, s)]]
        }
        hooks: dict[str, Any] = {"after": after, "submitted": {}, "grid_point": True}
        print(f"[grid] point {i + 1}/{len(points)}: {point_name(point)}", flush=True)
        rc = launch_one(point_argv(fixed, launch_overrides, root, point, cache_dir), hooks)
        if rc != 0:
            print(f"error: grid point {point_name(point)} failed (above); later points not launched", file=sys.stderr)
            return rc
        jobs.append(dict(hooks["submitted"]))
        submitted += hooks.get("jobs", [])
    failed = []
    if submitted and launch.wait and wait is not None:
        failed = [r for r in wait(submitted) if r["state"] != "COMPLETED"]
    if not any(jobs) or launch.wait:  # ran here (or waited): every point has its results
        write_grid_summary(root)
    if failed:
        first = failed[0]
        print(
            f"error: stage {first['stage']} job {first['job_id']} ended {first['state']}: {first.get('error', '')}"
            + (f" ({len(failed) - 1} more failed or not run)" if len(failed) > 1 else ""),
            file=sys.stderr,
        )
        return 2
    else:
        print(f"[grid] submitted; summary when done: python launch/slurm.py run_dir={root} (all stages fresh)")
    return 0


def _preset_seed(fixed: list[str]) -> int:
    from sdca_dist.config import compose_config

    return int(compose_config([a for a in fixed if a.split("=", 1)[0] != "run_dir"]).seed)


# ----------------------------------------------------------------------------------------------
# the summary
# ----------------------------------------------------------------------------------------------
#: two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (table to 30 degrees of freedom, then the Cornish-Fisher
    expansion, within 0.001 of the exact value)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def paired(per_seed: dict[int, float]) -> dict[str, Any]:
    """Paired differences by seed: mean, sample std and the 95% t interval of the mean."""
    vals = list(per_seed.values())
    mean, std = mean_std(vals)
    n = len(vals)
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"per_seed": per_seed, "n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def seed_folders(point_dir: Path) -> list[tuple[int, Path]]:
    """(seed, run folder) of a point (or single run) folder: ``seed_<k>/`` sub-folders, or itself."""
    subs = sorted(
        (int(p.name.split("_", 1)[1]), p)
        for p in point_dir.glob("seed_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit()
    )
    if subs:
        return subs
    cfg = point_dir / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^seed: (\d+)$", cfg.read_text(), re.M)
        return [(int(m.group(1)) if m else 0, point_dir)]
    return []


def grid_table(root: Path) -> dict[str, Any]:
    """{point: {stage: {per_seed: {seed: mIoU}, mean, std, reused: [seeds]}}} from the DONE
    records and metrics of every point's run folders."""
    grid = read_json_dict(root / GRID_FILE) or {}
    out: dict[str, Any] = {}
    for name in grid.get("points", []):
        rows: dict[str, Any] = {}
        for stage in grid.get("stages", []):
            per_seed, reused, walls = {}, [], []
            for seed, rd in seed_folders(root / name):
                done = read_json_dict(rd / stage / "DONE")
                if done is None:
                    continue
                walls.append(float(done.get("wall_seconds", float("nan"))))
                if done.get("reused_from"):
                    reused.append(seed)
                metrics = read_json_dict(rd / stage / "metrics.json")
                if metrics is not None and "mIoU" in metrics:
                    per_seed[seed] = float(metrics["mIoU"])
            if not walls:
                continue
            row: dict[str, Any] = {"per_seed": per_seed, "reused_seeds": reused, "wall_seconds": walls}
            if per_seed:
                row["mean"], row["std"] = mean_std(list(per_seed.values()))
            rows[stage] = row
        out[name] = rows
    return out


def write_grid_summary(root: Path | str, log: Callable[[str], None] = print) -> Optional[Path]:
    """``summary.md`` / ``summary.json`` at the grid folder: the points x stages table (mIoU mean
    ± std over seeds) and, per stage, each point minus the baseline point paired by seed."""
    root = Path(root)
    grid = read_json_dict(root / GRID_FILE)
    if grid is None:
        return None
    table = grid_table(root)
    stages = [s for s in grid["stages"] if any("mean" in table[p].get(s, {}) for p in table)]
    base = grid["baseline"]
    diffs: dict[str, dict[str, Any]] = {}
    for stage in stages:
        ref = table.get(base, {}).get(stage, {}).get("per_seed", {})
        for name in grid["points"]:
            if name == base:
                continue
            mine = table.get(name, {}).get(stage, {}).get("per_seed", {})
            common = sorted(set(ref) & set(mine))
            if common:
                diffs.setdefault(stage, {})[name] = paired({s: mine[s] - ref[s] for s in common})
    swept = ", ".join(f"{s['key']} in {{{', '.join(s['values'])}}}" for s in grid["sweeps"])
    lines = [
        f"# Grid {root}: {swept}; seeds {', '.join(str(s) for s in grid['seeds'])}",
        "",
        "mIoU, mean ± std over seeds (n = seeds done); (r) = reused from the stage cache for some seeds",
        "",
        "| point | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name in grid["points"]:
        cells = []
        for stage in stages:
            row = table.get(name, {}).get(stage)
            if not row or "mean" not in row:
                cells.append("-")
                continue
            mark = " (r)" if row["reused_seeds"] else ""
            cells.append(f"{row['mean']:.2f} ± {row['std']:.2f} (n={len(row['per_seed'])}){mark}")
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
                lo, hi = d["ci95"]
                ci = f"[{lo:+.2f}, {hi:+.2f}]" if d["n"] > 1 else "n/a (1 seed)"
                lines.append(f"| {stage} | {name} | {per} | {d['mean']:+.2f} | {d['std']:.2f} | {ci} |")
    payload = {**grid, "table": table, "paired_differences": diffs}
    from sdca_dist.files import atomic_write_text

    atomic_write_text(root / "summary.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    grid_figure(root)  # grid_differences.png beside summary.json (sdca_dist.launch.figures)
    log("\n".join(lines))
    return root / "summary.md"
