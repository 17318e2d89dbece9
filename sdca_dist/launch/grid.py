"""Experiment grids: one launch over several settings, sharing the stages they have in common.

``python launch/slurm.py conf=synthetic method.tau=1,10,100 seeds=3 run_dir=runs/tau`` (Hydra's
sweep syntax: ``key=a,b,c``, ``key=choice(a,b)``, ``key=range(start,stop[,step])``; several
swept keys make their product; ``--multirun``/``-m`` is accepted and changes nothing) launches
one ordinary run per point, in ``<run_dir>/<point>/`` (with ``seed_<k>/`` below it for
``seeds=K``), all through the single-run launcher, so every point is refused, frozen and resumed
exactly as a single run is.

Tied settings sweep as one factor: ``src.iters,src.schedule_iters=100,200`` gives both keys the
same value at each level, ``a,b=(1,2),(3,4)`` one value per key; the keys move together and the
factor counts once in the product and in the summary's main effects.

A point's folder name is its settings, ``key=value`` joined by ``+``
(``method.tau=10+sdca.lr=0.1``), each value reduced to letters, digits and ``._+-`` (brackets
and quotes dropped, any other run of characters made ``_``), so a name holds no comma (it is never
read as a sweep again), no slash and no space; two points that would reduce to one name, or a
name over 120 characters, get a short hash of their settings appended. ``grid.json`` maps every
name to its settings.

Sharing: a stage whose settings, inputs and code are the same in two points has the same stage
key (``sdca_dist.stage_keys``); the first point to run it publishes it to the stage cache and
the others reuse it (``sdca_dist.stage_cache``). Locally the points run in order, so the later
points find the shared stages in the cache; on SLURM the shared stage's job of a later point
depends on the job of the first point that computes it.

Failures stay in their lane: a point that fails does not stop the others, only the points that
take a chain stage from it (locally they are not launched; on SLURM the scheduler, or the wait,
cancels exactly the dependent jobs). The summary (``sdca_dist.launch.grid_summary``) names what
failed and why, and the launch exits 2 after writing it. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sdca_dist.config.compose import ConfigError
from sdca_dist.launch.backends.base import LaunchHooks, QueuedJob
from sdca_dist.run_folder import DONE, GRID, planned_seed_folders

#: keys a grid cannot sweep: they name the job or the seeds (``seeds=K`` gives seeds)
_NOT_SWEPT = ("run_dir", "stage", "seed", "conf")
#: longest point folder name kept as it is (longer ones are cut and hashed)
_NAME_MAX = 120

Point = tuple[tuple[str, str], ...]  # ((key, value), ...) in command-line order


@dataclass(frozen=True)
class Factor:
    """One swept factor: a key, or several tied keys that move together; ``levels`` holds, per
    level, one value per key."""

    keys: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...]

    @property
    def name(self) -> str:
        return ",".join(self.keys)

    def label(self, level: tuple[str, ...]) -> str:
        """How a level is written: its value (tied keys with one value), else ``(v1,v2)``."""
        return level[0] if len(set(level)) == 1 else "(" + ",".join(level) + ")"


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


def _tied_levels(keys: list[str], arg: str, values: Optional[list[str]]) -> tuple[tuple[str, ...], ...]:
    """The levels of a tied factor: a plain value gives every key that value, ``(v1,v2)`` one
    value per key."""
    if values is None:
        one = " ".join(f"{k}={arg.split('=', 1)[1]}" for k in keys)
        raise ConfigError(f"{arg} ties keys over one value: nothing to sweep (set {one})")
    levels = []
    for v in values:
        if v.startswith("(") and v.endswith(")"):
            parts = [p.strip() for p in _split_top(v[1:-1])]
            if len(parts) != len(keys) or "" in parts:
                raise ConfigError(f"{arg}: level {v} gives {len(parts)} value(s) for {len(keys)} tied keys")
            levels.append(tuple(parts))
        else:
            levels.append((v,) * len(keys))
    return tuple(levels)


def parse_sweeps(run_overrides: Sequence[str]) -> tuple[list[str], list[Factor]]:
    """(fixed overrides, swept factors) of a command line's run settings."""
    from sdca_dist.config.compose import _schema_keys

    fixed: list[str] = []
    factors: list[Factor] = []
    known = set(_schema_keys())
    for arg in run_overrides:
        if arg in ("--multirun", "-m") or "=" not in arg:
            if arg not in ("--multirun", "-m"):
                fixed.append(arg)
            continue
        key, value = arg.split("=", 1)
        keys = [k.strip().lstrip("+~") for k in key.split(",")]
        if keys[0] == "run_dir":  # a folder name, never a sweep
            fixed.append(arg)
            continue
        values = _sweep_values(key, value)
        if values is None and len(keys) == 1:
            fixed.append(arg)
            continue
        for bare in keys:
            if bare in _NOT_SWEPT:
                hint = " (use seeds=K for several seeds)" if bare == "seed" else ""
                raise ConfigError(f"a grid cannot sweep {bare}{hint}")
            if bare not in known and not any(bare.startswith(k + ".") for k in known):
                raise ConfigError(f"grid over unknown setting {bare!r} ({arg})")
            if any(bare in f.keys for f in factors) or keys.count(bare) > 1:
                raise ConfigError(f"{bare} is swept twice")
        levels = _tied_levels(keys, arg, values) if len(keys) > 1 else tuple((v,) for v in values or [])
        factors.append(Factor(tuple(keys), levels))
    return fixed, factors


def is_grid(argv: Sequence[str]) -> bool:
    """Whether a command line's run settings sweep anything (raises ConfigError on bad sweeps)."""
    from sdca_dist.config.run_config import split_overrides

    run, _ = split_overrides([a for a in argv if a not in ("--multirun", "-m")])
    return bool(parse_sweeps(run)[1])


def expand(factors: list[Factor]) -> list[Point]:
    """Every point of the factors' product, the last factor varying fastest."""
    return [
        tuple((k, v) for f, level in zip(factors, combo) for k, v in zip(f.keys, level))
        for combo in itertools.product(*(f.levels for f in factors))
    ]


def point_levels(point: Point, factors: list[Factor]) -> list[str]:
    """The label of each factor's level at ``point``."""
    values = dict(point)
    return [f.label(tuple(values[k] for k in f.keys)) for f in factors]


def _safe_value(value: str) -> str:
    """A value as a folder name part: brackets and quotes dropped, every other run of characters
    outside letters, digits and ``._+-`` made one ``_``."""
    value = re.sub(r"[\[\](){}'\"]", "", value.strip())
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", value).strip("_") or "_"


def point_name(point: Point) -> str:
    """The point's readable folder name, ``key=value`` joined by ``+`` (before any hash
    ``point_names`` appends)."""
    return "+".join(f"{k}={_safe_value(v)}" for k, v in point)


def point_names(points: list[Point]) -> list[str]:
    """The folder name of every point: ``point_name``, with ``_<hash of the settings>`` appended
    (and cut to length) where two points would share a name or a name is too long."""
    names = [point_name(p) for p in points]
    out = []
    for p, name in zip(points, names):
        if names.count(name) > 1 or len(name) > _NAME_MAX:
            digest = hashlib.sha1(json.dumps(list(p)).encode()).hexdigest()[:8]
            name = f"{name[: _NAME_MAX - 9]}_{digest}"
        out.append(name)
    return out


def parse_baseline(text: Optional[str], points: list[Point]) -> Point:
    """The baseline point named by ``baseline=key=value[,key=value]`` (default: the first point)."""
    if not text:
        return points[0]
    given = {}
    for part in _split_top(text):
        if "=" not in part:
            raise ConfigError(f"baseline={text}: expected key=value (e.g. baseline={_cli_name(points[0])})")
        k, v = part.split("=", 1)
        given[k.strip()] = v.strip()
    matches = [p for p in points if all(dict(p).get(k) == v for k, v in given.items())]
    if len(matches) != 1:
        names = ", ".join(_cli_name(p) for p in points)
        what = "no point" if not matches else f"{len(matches)} points"
        raise ConfigError(f"baseline={text} matches {what} of the grid ({names})")
    return matches[0]


def _cli_name(point: Point) -> str:
    """A point as ``baseline=`` takes it: ``key=value,key=value`` with the values as given."""
    return ",".join(f"{k}={v}" for k, v in point)


# ----------------------------------------------------------------------------------------------
# the launch
# ----------------------------------------------------------------------------------------------
def _arg(argv: Sequence[str], key: str) -> Optional[str]:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def point_argv(fixed: list[str], launch_overrides: list[str], folder: Path, point: Point, cache_dir: str) -> list[str]:
    """The single-run command line of one point, its run folder ``folder``."""
    argv = [a for a in fixed if a.split("=", 1)[0] != "run_dir"]
    argv += [f"{k}={v}" for k, v in point]
    argv += [a for a in launch_overrides if a.split("=", 1)[0] not in ("cache_dir", "baseline")]
    return argv + [f"run_dir={folder}", f"cache_dir={cache_dir}"]


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


@dataclass
class GridPlan:
    """What a grid launch is about: its factors, points (with folder names), baseline, seeds,
    stages and which point computes each shared stage."""

    root: Path
    fixed: list[str]
    launch_overrides: list[str]
    factors: list[Factor]
    points: list[Point]
    names: list[str]
    baseline: Point
    seeds: list[int]
    stages: list[str]
    cache_dir: str
    sharing: dict[tuple[int, str], Optional[int]]

    def argv(self, i: int) -> list[str]:
        return point_argv(self.fixed, self.launch_overrides, self.root / self.names[i], self.points[i], self.cache_dir)

    def record(self) -> dict[str, Any]:
        """grid.json: the grid as the summary and the status view read it."""
        return {
            "sweeps": [
                {"key": f.name, "keys": list(f.keys), "values": [f.label(v) for v in f.levels]} for f in self.factors
            ],
            "points": self.names,
            "point_settings": {n: dict(p) for n, p in zip(self.names, self.points)},
            "point_levels": {n: point_levels(p, self.factors) for n, p in zip(self.names, self.points)},
            "baseline": self.names[self.points.index(self.baseline)],
            "seeds": self.seeds,
            "stages": self.stages,
            "fixed": self.fixed,
            "cache_dir": self.cache_dir,
        }


def _plan(argv: Sequence[str]) -> tuple[GridPlan, Any]:
    from sdca_dist.config.run_config import parse_launch, split_overrides
    from sdca_dist.launch.plan import planned_stages
    from sdca_dist.stage_cache import default_cache_dir

    user = [a for a in argv if a not in ("--multirun", "-m")]
    run_overrides, launch_overrides = split_overrides(user)
    launch = parse_launch(launch_overrides)
    fixed, factors = parse_sweeps(run_overrides)
    points = expand(factors)
    root = Path(_arg(run_overrides, "run_dir") or "runs/grid")
    stages = planned_stages(launch)
    base_seed = _preset_seed(fixed)  # the command line's seed=, else the preset's
    seeds = [base_seed + k for k in range(launch.seeds)]
    plan = GridPlan(
        root=root,
        fixed=fixed,
        launch_overrides=launch_overrides,
        factors=factors,
        points=points,
        names=point_names(points),
        baseline=parse_baseline(launch.baseline, points),
        seeds=seeds,
        stages=stages,
        cache_dir=str(Path(launch.cache_dir).resolve() if launch.cache_dir else default_cache_dir(root)),
        sharing={},
    )
    return plan, launch


def run_grid(argv: Sequence[str], launch_one: Callable[[Sequence[str], LaunchHooks], int]) -> int:
    """Launch every point of the grid through ``launch_one(argv, hooks)`` (the single-run
    launcher). Every point is checked (a dry run of each, output kept back) before any is
    launched, so a bad point means nothing is written or submitted. A point that fails stops
    only the points that take a chain stage from it. Jobs a backend queued (SLURM) are followed,
    with ``wait=true``, by that backend's ``wait``, which cancels only those that depend on a
    failed one. The summary is written when every point ended (locally, or with ``wait=true``);
    exit 2 when anything failed."""
    plan, launch = _plan(argv)
    checked: list[str] = []
    for i in range(len(plan.points)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = launch_one([*plan.argv(i), "dry_run=true"], LaunchHooks())
        if rc != 0:
            print(f"error: grid point {plan.names[i]} cannot run (above); nothing launched", file=sys.stderr)
            return rc
        checked.append(out.getvalue())
    plan.sharing = shared_with(plan.fixed, plan.points, plan.stages, plan.seeds)
    _print_plan(plan, launch.seeds)
    if launch.dry_run:
        for name, text in zip(plan.names, checked):
            print(f"[grid] --- {name} ---\n{text.rstrip()}", flush=True)
        return 0

    from sdca_dist.files import atomic_write_text

    plan.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.root / GRID, json.dumps(plan.record(), indent=1) + "\n")
    failed_points, submitted = _launch_points(plan, launch_one)
    records: list[dict] = []
    if submitted and launch.wait:
        records = _wait(submitted)
    queued = bool(submitted) and not launch.wait
    if queued:
        print(
            f"[grid] submitted; summary when done: python launch/slurm.py run_dir={plan.root} "
            "(all stages fresh), progress: status=true",
            flush=True,
        )
        return 2 if failed_points else 0
    from sdca_dist.launch.grid_summary import write_grid_summary

    summary = write_grid_summary(plan.root, points_failed=failed_points)
    failures = [r for r in records if r["state"] != "COMPLETED"]
    if failed_points or failures:
        what = "; ".join(f"{name}: {why}" for name, why in failed_points.items())
        jobs = ", ".join(f"{r['stage']} job {r['job_id']} {r['state']}" for r in failures[:4])
        more = f" (+{len(failures) - 4} more)" if len(failures) > 4 else ""
        detail = "; ".join(x for x in (what, jobs + more) if x)
        print(f"error: grid {plan.root} ended with failures ({detail}); see {summary}", file=sys.stderr)
        return 2
    print(f"[grid] finished: {len(plan.points)} point(s) x {launch.seeds} seed(s); summary {summary}", flush=True)
    return 0


def _print_plan(plan: GridPlan, seeds: int) -> None:
    print(
        f"[grid] {len(plan.points)} point(s) x {seeds} seed(s) under {plan.root}; stage cache {plan.cache_dir}",
        flush=True,
    )
    for i, name in enumerate(plan.names):
        reused = [s for s in plan.stages if plan.sharing[(i, s)] is not None]
        computed = [s for s in plan.stages if plan.sharing[(i, s)] is None]
        mark = " (baseline)" if plan.points[i] == plan.baseline else ""
        line = f"[grid] {name}{mark}: computes {', '.join(computed) or 'nothing'}"
        if reused:
            line += "; reuses " + ", ".join(f"{s} from {plan.names[plan.sharing[(i, s)]]}" for s in reused)
        print(line, flush=True)


def _wait(submitted: list[QueuedJob]) -> list[dict]:
    """Each backend's ``wait`` on the jobs it queued, in submission order per backend."""
    from sdca_dist.launch.backends import backend

    names = list(dict.fromkeys(j.backend for j in submitted))
    return [r for name in names for r in backend(name).wait([j for j in submitted if j.backend == name])]


def _launch_points(
    plan: GridPlan, launch_one: Callable[[Sequence[str], LaunchHooks], int]
) -> tuple[dict[str, str], list[QueuedJob]]:
    """Launch the points in order: ({failed point: why}, every job any point queued, for the
    wait). A point that takes a chain stage from a failed point is not launched."""
    from sdca_dist.stage_table import spec

    jobs: list[dict[str, QueuedJob]] = []  # per point: {stage: the job it queued}
    failed: dict[str, str] = {}
    submitted: list[QueuedJob] = []
    for i, name in enumerate(plan.names):
        blocked = [
            (s, plan.names[j])
            for s in plan.stages
            for j in [plan.sharing[(i, s)]]
            if j is not None and spec(s).gates_chain and plan.names[j] in failed and not _done(plan, j, s)
        ]
        if blocked:
            stage, source = blocked[0]
            failed[name] = f"not launched: takes {stage} from {source}, which failed"
            print(f"[grid] point {i + 1}/{len(plan.names)}: {name} {failed[name]}", flush=True)
            jobs.append({})
            continue
        after = {s: [jobs[j][s]] for s in plan.stages for j in [plan.sharing[(i, s)]] if j is not None and s in jobs[j]}
        queued: list[QueuedJob] = []
        print(f"[grid] point {i + 1}/{len(plan.names)}: {name}", flush=True)
        rc = launch_one(plan.argv(i), LaunchHooks(after=after, submitted=queued.append))
        jobs.append({q.stage: q for q in queued})
        submitted += queued
        if rc != 0:
            failed[name] = f"exit {rc}"
            print(f"[grid] point {name} failed (exit {rc}, above); going on with the points that do not need it")
    return failed, submitted


def _done(plan: GridPlan, j: int, stage: str) -> bool:
    """Whether point ``j`` has ``stage`` done for every seed (its failure came later)."""
    return all((f / stage / DONE).is_file() for _, f in planned_seed_folders(plan.root / plan.names[j], plan.seeds))


def _preset_seed(fixed: list[str]) -> int:
    from sdca_dist.config import compose_config

    return int(compose_config([a for a in fixed if a.split("=", 1)[0] != "run_dir"]).seed)
