"""Experiment grids from the command line (Hydra's sweep syntax) through the real launcher.

Specifications:
* a 2 x 2 grid, ``method.tau=1,10`` x ``sdca.iters,sdca.schedule_iters=2,3`` (tied keys, one
  factor), ``seeds=2 stages=[src,dist_init,sdca]``: one run folder per point and seed
  (``<run_dir>/method.tau=10+sdca.iters=2+sdca.schedule_iters=2/seed_0``); src and dist_init
  computed once per seed (the other points reuse them from the stage cache), sdca in every point;
  the launch says it finished; summary.md/json at the grid folder: one row per point, the paired
  differences against the baseline and each factor's main effect, each checked against an
  independent float64 computation from the run folders' metrics (t at df = 1, 2, 4);
* point folder names are plain paths (no comma, slash or space) for any value, unique, and never
  read as a sweep again;
* ``dry_run=true`` prints the grid and which stages each point reuses, and writes nothing;
* bad input is one line naming it, exit 2, nothing written: an unknown key, an empty value, a
  swept seed, a baseline that is no point, a tied level of the wrong length; a point whose run
  folder holds other settings;
* a failed point (``src.lr=1e9``) stops only the point that takes its src; the others finish, the
  summary names what failed and why, the launch exits 2; a failed seed stops only its own chain;
* the SLURM dependency rules: aftercorr between arrays over the same seeds, a failed task blocks
  only its dependants.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from engine_fixtures import last_error, run_launcher, tiny

from sdca_dist.config import ConfigError
from sdca_dist.launch.grid import expand, parse_baseline, parse_sweeps, point_levels, point_name, point_names
from sdca_dist.launch.grid_summary import write_grid_summary
from sdca_dist.launch.seed_stats import over_seeds, paired, t_quantile_975

#: the grid fixture launches 24 tiny stage processes (12 of them only restore a cached result)
pytestmark = pytest.mark.timeout(2400)


# --- parsing (no launch) --------------------------------------------------------------------------
def test_sweep_syntax():
    fixed, factors = parse_sweeps(
        ["conf=synthetic", "method.tau=1,10,100", "data.synthetic_counts=[24,24,12]", "sdca.lr=choice(0.1,0.2)"]
    )
    assert fixed == ["conf=synthetic", "data.synthetic_counts=[24,24,12]"]
    assert [(f.name, [f.label(v) for v in f.levels]) for f in factors] == [
        ("method.tau", ["1", "10", "100"]),
        ("sdca.lr", ["0.1", "0.2"]),
    ]
    points = expand(factors)
    assert len(points) == 6 and point_name(points[1]) == "method.tau=1+sdca.lr=0.2"
    assert [f.levels for f in parse_sweeps(["sdca.iters=range(1,4)"])[1]] == [(("1",), ("2",), ("3",))]
    assert parse_baseline("method.tau=100,sdca.lr=0.2", points) == points[5]
    assert parse_baseline(None, points) == points[0]


def test_tied_keys_sweep_as_one_factor():
    """``a,b=v1,v2`` moves both keys together (one value for both, or ``(x,y)`` one per key): two
    levels, not a product of four."""
    _, factors = parse_sweeps(["method.tau=1,10", "sdca.iters,sdca.schedule_iters=20,(30,40)"])
    assert len(factors) == 2 and factors[1].keys == ("sdca.iters", "sdca.schedule_iters")
    assert factors[1].levels == (("20", "20"), ("30", "40"))
    assert [factors[1].label(v) for v in factors[1].levels] == ["20", "(30,40)"]
    points = expand(factors)
    assert len(points) == 4
    assert dict(points[1]) == {"method.tau": "1", "sdca.iters": "30", "sdca.schedule_iters": "40"}
    assert point_levels(points[1], factors) == ["1", "(30,40)"]
    with pytest.raises(ConfigError, match=r"level \(1,2,3\) gives 3 value\(s\) for 2 tied keys"):
        parse_sweeps(["sdca.iters,sdca.schedule_iters=(1,2,3),4"])
    with pytest.raises(ConfigError, match="ties keys over one value: nothing to sweep"):
        parse_sweeps(["sdca.iters,sdca.schedule_iters=20"])
    with pytest.raises(ConfigError, match="sdca.iters is swept twice"):
        parse_sweeps(["sdca.iters=1,2", "sdca.iters,sdca.schedule_iters=3,4"])


def test_point_folder_names_are_safe_paths_never_read_as_sweeps():
    """Lists, negative numbers, strings with spaces or slashes: the folder name holds no comma,
    slash or space, stays readable, is unique, and ``run_dir=<grid>/<name>`` is one run."""
    _, factors = parse_sweeps(
        [
            "data.ssl_scale=[1.0,1.0],[1.0,1.25]",
            "method.tau=-1,2.5e-3",
            "model.pretrained='a b/c.pt','a_b/c.pt'",
        ]
    )
    points = expand(factors)
    names = point_names(points)
    assert names[0].startswith("data.ssl_scale=1.0_1.0+method.tau=-1+model.pretrained=a_b_c.pt_")
    assert len(set(names)) == len(names) == 8  # 'a b/c.pt' and 'a_b/c.pt' reduce alike: hashed apart
    for name in names:
        assert not set(name) & set(", /\\'\"[](){}"), name
        fixed, sweeps = parse_sweeps([f"run_dir=runs/g/{name}", *(f"{k}={v}" for k, v in points[names.index(name)])])
        assert sweeps == [] and fixed[0] == f"run_dir=runs/g/{name}"
    assert point_names([(("method.tau", "1"), ("sdca.lr", "0.1"))]) == ["method.tau=1+sdca.lr=0.1"]
    assert parse_sweeps(["run_dir=runs/a,b", "method.tau=1,2"])[0] == ["run_dir=runs/a,b"]  # a folder, not a sweep
    long = [(("model.pretrained", "x" * 200),)]
    assert len(point_names(long)[0]) == 120


@pytest.mark.parametrize(
    "arg, message",
    [
        ("method.tua=1,10", "grid over unknown setting 'method.tua' (method.tua=1,10)"),
        ("method.tau=choice()", "method.tau=choice() sweeps over no values"),
        ("method.tau=1,,10", "method.tau=1,,10 has an empty value (position 2); remove the extra comma"),
        ("seed=0,1", "a grid cannot sweep seed (use seeds=K for several seeds)"),
        ("method.tau=1,1", "method.tau=1,1 lists a value twice"),
    ],
)
def test_bad_sweeps_name_the_key(arg, message):
    with pytest.raises(ConfigError) as exc:
        parse_sweeps(["conf=synthetic", arg])
    assert str(exc.value) == message


# --- the statistics, checked against float64 formulas and hand-checked t values -------------------
#: Student's t 97.5% quantiles, from a printed table (df: value)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042}


def _stats(values):
    """mean, sample std, 95% interval (t table above), in float64, written independently."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = T_TABLE[n - 1] * std / np.sqrt(n) if n > 1 else None
    return mean, std, (None if half is None else [mean - half, mean + half])


@pytest.mark.parametrize("n", [2, 3, 5, 10, 31])
def test_seed_statistics_mean_std_and_t_interval(n):
    vals = {s: math.sin(1.7 * s) * 3 + 0.25 * s for s in range(n)}
    got = over_seeds(vals)
    mean, std, ci = _stats(list(vals.values()))
    assert got["n"] == n and got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["std"] == pytest.approx(std, abs=1e-12)
    assert got["ci95"] == pytest.approx(ci, abs=1e-12)
    d = paired({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 0.0, 2: 0.0, 3: 9.0})
    assert d["per_seed"] == {0: 1.0, 1: 2.0, 2: 4.0} and d["ci95"] == pytest.approx(_stats([1, 2, 4])[2])
    assert over_seeds({7: 1.5})["ci95"] is None  # one seed: no interval
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert abs(t_quantile_975(60) - 2.000) < 0.002 and abs(t_quantile_975(120) - 1.980) < 0.002


def _fake_grid(root, factors_argv, seeds, value):
    """A grid folder as a finished launch leaves it (grid.json; per point and seed the DONE and
    metrics.json of src and sdca), with sdca's mIoU ``value(point settings, seed)``."""
    from sdca_dist.launch.grid import GridPlan

    _, factors = parse_sweeps(factors_argv)
    points = expand(factors)
    plan = GridPlan(root, [], [], factors, points, point_names(points), points[0], seeds, ["src", "sdca"], "", {})
    root.mkdir(parents=True)
    (root / "grid.json").write_text(json.dumps(plan.record()))
    for name, point in zip(plan.names, points):
        for seed in seeds:
            rd = root / name / f"seed_{seed}"
            for stage, miou in (("src", 10.0 + seed), ("sdca", value(dict(point), seed))):
                (rd / stage).mkdir(parents=True)
                (rd / stage / "DONE").write_text(json.dumps({"stage": stage, "wall_seconds": 1.0}))
                (rd / stage / "metrics.json").write_text(json.dumps({"mIoU": miou}))
    return plan


@pytest.mark.parametrize("seeds", [[0, 1, 2], [3, 4, 5, 6, 7]])
def test_grid_summary_matches_an_independent_computation(tmp_path, seeds):
    """A 2 x 3 grid's summary.json against float64 formulas: every cell's mean, std and interval,
    every paired difference, every main effect (level mean over the other factor, seed by seed,
    minus the baseline level's); df = 2 and 4."""

    def value(p, seed):
        return 30 + 2 * float(p["method.tau"]) + 0.5 * float(p["sdca.lr"]) * seed + math.cos(seed * float(p["sdca.lr"]))

    plan = _fake_grid(tmp_path / "g", ["method.tau=1,3", "sdca.lr=1,2,5"], seeds, value)
    write_grid_summary(tmp_path / "g", log=lambda _: None)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    cell = {n: {s: value(dict(p), s) for s in seeds} for n, p in zip(plan.names, plan.points)}
    for name in plan.names:
        row = summary["table"][name]["sdca"]
        mean, std, ci = _stats(list(cell[name].values()))
        assert (row["mean"], row["std"]) == pytest.approx((mean, std), abs=1e-9)
        assert row["ci95"] == pytest.approx(ci, abs=1e-9)
    base = plan.names[0]
    for name in plan.names[1:]:
        d = summary["paired_differences"]["sdca"][name]
        mean, std, ci = _stats([cell[name][s] - cell[base][s] for s in seeds])
        assert (d["mean"], d["std"], d["n"]) == pytest.approx((mean, std, len(seeds)), abs=1e-9)
        assert d["ci95"] == pytest.approx(ci, abs=1e-9)
        assert summary["paired_differences"]["src"][name]["per_seed"] == {str(s): 0.0 for s in seeds}
    effects = summary["main_effects"]["sdca"]
    assert set(effects) == {"method.tau", "sdca.lr"}
    for key, levels, base_level in (("method.tau", ["1", "3"], "1"), ("sdca.lr", ["1", "2", "5"], "1")):

        def level_mean(level, seed, key=key):
            members = [n for n, p in zip(plan.names, plan.points) if dict(p)[key] == level]
            return sum(cell[n][seed] for n in members) / len(members)

        for level in levels:
            got = effects[key]["levels"][level]
            mean, std, ci = _stats([level_mean(level, s) for s in seeds])
            assert (got["mean"], got["std"]) == pytest.approx((mean, std), abs=1e-9)
            assert got["ci95"] == pytest.approx(ci, abs=1e-9)
            if level == base_level:
                assert "effect" not in got
                continue
            mean, std, ci = _stats([level_mean(level, s) - level_mean(base_level, s) for s in seeds])
            assert (got["effect"]["mean"], got["effect"]["std"]) == pytest.approx((mean, std), abs=1e-9)
            assert got["effect"]["ci95"] == pytest.approx(ci, abs=1e-9)
    # tau's main effect is exactly 2 * (3 - 1) = 4 on every seed (value is additive in tau)
    assert effects["method.tau"]["levels"]["3"]["effect"]["mean"] == pytest.approx(4.0)
    md = (tmp_path / "g" / "summary.md").read_text()
    assert "Main effects" in md and "| sdca | method.tau | 3 |" in md


# --- the launcher ---------------------------------------------------------------------------------
def test_bad_grid_is_one_line_exit_2_and_nothing_written(tmp_path):
    for arg, message in (
        ("method.tua=1,10", "error: grid over unknown setting 'method.tua' (method.tua=1,10)"),
        ("method.tau=1,,10", "error: method.tau=1,,10 has an empty value (position 2); remove the extra comma"),
    ):
        proc = run_launcher(["conf=synthetic", "cluster=local", arg, f"run_dir={tmp_path / 'g'}"], timeout=300)
        assert proc.returncode == 2 and last_error(proc) == message, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    bad_base = run_launcher(
        ["conf=synthetic", "cluster=local", "method.tau=1,10", "baseline=method.tau=5", f"run_dir={tmp_path / 'g'}"],
        timeout=300,
    )
    assert bad_base.returncode == 2
    assert last_error(bad_base) == (
        "error: baseline=method.tau=5 matches no point of the grid (method.tau=1, method.tau=10)"
    )
    assert not (tmp_path / "g").exists()


#: the 2 x 2 grid: tau (read by sdca only) x sdca's length, tied to its schedule horizon
P = {(tau, it): f"method.tau={tau}+sdca.iters={it}+sdca.schedule_iters={it}" for tau in (1, 10) for it in (2, 3)}


@pytest.fixture(scope="module")
def grid(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    args = tiny(
        shards,
        "cluster=local",
        "src.iters=2",
        "src.schedule_iters=2",
        "method.tau=1,10",
        "sdca.iters,sdca.schedule_iters=2,3",
        "seeds=2",
        "stages=[src,dist_init,sdca]",
    ) + [f"run_dir={root / 'tau'}", "baseline=method.tau=10,sdca.iters=2"]
    dry = run_launcher([*args, "dry_run=true"])
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert not (root / "tau").exists(), "a dry run writes nothing"
    proc = run_launcher(args, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "tau", dry, proc, args


def test_dry_run_prints_the_grid_and_what_each_point_reuses(grid):
    _, dry, _, _ = grid
    assert "[grid] 4 point(s) x 2 seed(s)" in dry.stdout
    assert f"[grid] {P[1, 2]}: computes src, dist_init, sdca" in dry.stdout
    for key in ((1, 3), (10, 2), (10, 3)):
        mark = " (baseline)" if key == (10, 2) else ""
        line = f"[grid] {P[key]}{mark}: computes sdca; reuses src from {P[1, 2]}, dist_init from {P[1, 2]}"
        assert line in dry.stdout, dry.stdout[-3000:]


def test_a_two_key_grid_runs_and_says_it_finished(grid):
    root, _, proc, _ = grid
    assert f"[grid] finished: 4 point(s) x 2 seed(s); summary {root / 'summary.md'}" in proc.stdout
    assert "submitted; summary when done" not in proc.stdout
    for (tau, it), name in P.items():
        for seed in (0, 1):
            cfg = (root / name / f"seed_{seed}" / "config.yaml").read_text()
            assert re.search(rf"^  tau: {tau}\.0$", cfg, re.M) and re.search(rf"^seed: {seed}$", cfg, re.M)
            assert re.search(rf"^sdca:\n(  .*\n)*  iters: {it}\n(  .*\n)*  schedule_iters: {it}$", cfg, re.M), cfg


def test_shared_stages_run_once_per_seed(grid):
    root, _, _, _ = grid
    computed, reused = [], []
    for name in P.values():
        for seed in (0, 1):
            for stage in ("src", "dist_init", "sdca"):
                done = json.loads((root / name / f"seed_{seed}" / stage / "DONE").read_text())
                (reused if done.get("reused_from") else computed).append((name, seed, stage))
    others = [P[1, 3], P[10, 2], P[10, 3]]
    assert sorted(reused) == sorted((n, s, st) for n in others for s in (0, 1) for st in ("src", "dist_init"))
    assert len(computed) == 12  # 2 src + 2 dist_init + 8 sdca
    src = [json.loads((root / n / "seed_0" / "src" / "DONE").read_text()) for n in P.values()]
    assert all(d["outputs"] == src[0]["outputs"] for d in src)


def test_grid_summary_checked_against_the_per_seed_metrics(grid):
    """summary.json of the real grid against an independent float64 computation from each run
    folder's metrics.json: every cell, every paired difference and every main effect, with the t
    interval at df = 1 (12.706: two seeds)."""
    root, _, _, _ = grid
    summary = json.loads((root / "summary.json").read_text())
    assert summary["baseline"] == P[10, 2] and summary["points"] == list(P.values())
    assert [s["key"] for s in summary["sweeps"]] == ["method.tau", "sdca.iters,sdca.schedule_iters"]
    cell = {
        (k, stage): {
            s: json.loads((root / n / f"seed_{s}" / stage / "metrics.json").read_text())["mIoU"] for s in (0, 1)
        }
        for k, n in P.items()
        for stage in ("src", "sdca")
    }
    for k, name in P.items():
        row = summary["table"][name]["sdca"]
        mean, std, ci = _stats(list(cell[k, "sdca"].values()))
        assert (row["mean"], row["std"], row["n"]) == pytest.approx((mean, std, 2), abs=1e-9)
        assert row["ci95"] == pytest.approx([mean - 12.706 * std / math.sqrt(2), mean + 12.706 * std / math.sqrt(2)])
        if k == (10, 2):
            continue
        d = summary["paired_differences"]["sdca"][name]
        diffs = [cell[k, "sdca"][s] - cell[(10, 2), "sdca"][s] for s in (0, 1)]
        mean, std, ci = _stats(diffs)
        assert d["per_seed"] == pytest.approx({"0": diffs[0], "1": diffs[1]}, abs=1e-9)
        assert (d["mean"], d["std"]) == pytest.approx((mean, std), abs=1e-9) and d["ci95"] == pytest.approx(ci)
        # src is shared: its paired difference is exactly zero on every seed
        assert summary["paired_differences"]["src"][name]["per_seed"] == {"0": 0.0, "1": 0.0}
    tau = summary["main_effects"]["sdca"]["method.tau"]
    assert tau["baseline_level"] == "10" and tau["seeds"] == [0, 1]
    effect = [
        (cell[(1, 2), "sdca"][s] + cell[(1, 3), "sdca"][s]) / 2
        - (cell[(10, 2), "sdca"][s] + cell[(10, 3), "sdca"][s]) / 2
        for s in (0, 1)
    ]
    mean, std, ci = _stats(effect)
    got = tau["levels"]["1"]["effect"]
    assert (got["mean"], got["std"]) == pytest.approx((mean, std), abs=1e-9) and got["ci95"] == pytest.approx(ci)
    length = summary["main_effects"]["sdca"]["sdca.iters,sdca.schedule_iters"]["levels"]["3"]["effect"]
    effect = [
        (cell[(1, 3), "sdca"][s] + cell[(10, 3), "sdca"][s]) / 2
        - (cell[(1, 2), "sdca"][s] + cell[(10, 2), "sdca"][s]) / 2
        for s in (0, 1)
    ]
    assert length["mean"] == pytest.approx(_stats(effect)[0], abs=1e-9)
    assert summary["failures"] == [] and summary["points_failed"] == {}
    md = (root / "summary.md").read_text()
    assert f"| {P[10, 2]} (baseline) |" in md and f"Paired differences against the baseline {P[10, 2]}" in md
    assert "(r)" in md and "Main effects" in md  # reused stages are marked


def test_a_point_whose_folder_holds_other_settings_is_refused(grid):
    root, _, _, args = grid
    changed = [a for a in args if not a.startswith("src.iters=")] + ["src.iters=1"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    proc = run_launcher(changed)
    assert proc.returncode == 2
    assert "was started with other settings (src.iters: 2 -> 1)" in proc.stderr
    assert last_error(proc) == f"error: grid point {P[1, 2]} cannot run (above); nothing launched"
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before, "something was written"


def test_a_failed_point_stops_only_what_depends_on_it(shards, tmp_path):
    """src.lr=1e9 x tau: the first point stops on non-finite values (exit 2: src's weights or
    dist_init's distributions, whichever turns non-finite first); the second point takes that
    stage from it and is not launched; the two points with a sane lr finish. The summary names
    what failed and why, and the launch exits 2 after writing it."""
    root = tmp_path / "g"
    args = tiny(
        shards,
        "cluster=local",
        "src.iters=2",
        "sdca.iters=2",
        "src.lr=1e9,0.01",
        "method.tau=1,10",
        "stages=[src,dist_init,sdca]",
        f"run_dir={root}",
    )
    proc = run_launcher(args, timeout=2400)
    bad, bad2 = "src.lr=1e9+method.tau=1", "src.lr=1e9+method.tau=10"
    good = ["src.lr=0.01+method.tau=1", "src.lr=0.01+method.tau=10"]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in good:
        assert all((root / name / st / "DONE").is_file() for st in ("src", "dist_init", "sdca")), name
    assert not (root / bad / "sdca").exists() and not (root / bad2).exists()
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["table"][good[1]]) == {"src", "dist_init", "sdca"}
    mine = [f for f in summary["failures"] if f["point"] == bad]
    first = mine[0]
    assert first["stage"] in ("src", "dist_init") and first["state"] == "failed", summary["failures"]
    assert "exit code 2" in first["why"] and "non-finite" in first["why"], first
    assert not (root / bad / first["stage"] / "DONE").exists()
    assert [(f["state"], f["why"]) for f in mine[1:]] == [("not run", f"{first['stage']} failed")] * (len(mine) - 1)
    assert mine[-1]["stage"] == "sdca"
    why = f"not launched: takes {first['stage']} from {bad}, which failed"
    assert summary["points_failed"] == {bad: "exit 2", bad2: why}
    assert last_error(proc) == (
        f"error: grid {root} ended with failures ({bad}: exit 2; {bad2}: {why}); see {root / 'summary.md'}"
    )
    md = (root / "summary.md").read_text()
    assert f"- {bad} seed 0 {first['stage']}: failed; exit code 2" in md and f"- {bad2}: {why}" in md


def test_seed_arrays_wait_seed_by_seed_and_a_failure_blocks_only_its_dependants():
    """The SLURM backend's dependency rules, from its own functions: arrays over the same seeds
    chain with aftercorr (task k on task k), otherwise afterok; a task is blocked only by a
    failed task it depends on."""
    from sdca_dist.launch.backends.slurm import StageArray, _blocked, dependency_on, dependency_parameter

    assert dependency_on("11", [0, 1], [0, 1]) == ("aftercorr", "11")
    assert dependency_on("11", [0, 1], [1]) == ("afterok", "11")  # seed 0's stage was fresh
    assert dependency_on("11", [0], [0]) == ("afterok", "11")  # one seed: no array to correspond
    assert dependency_parameter([("aftercorr", "11"), ("afterok", "12"), ("aftercorr", "13")]) == (
        "aftercorr:11:13,afterok:12"
    )
    corr = StageArray("dist_init", [], [0, 1], [("aftercorr", "11")])
    whole = StageArray("dist_init", [], [0, 1], [("afterok", "11")])
    other = StageArray("src", [], [0, 1], [("aftercorr", "21")])
    failed = {"11": {1}}  # seed 1's task of job 11 failed
    assert not _blocked(corr, 0, failed) and _blocked(corr, 1, failed)
    assert _blocked(whole, 0, failed) and _blocked(whole, 1, failed)
    assert not _blocked(other, 0, failed) and not _blocked(other, 1, failed)  # another point's chain


def test_a_failed_seed_stops_only_its_own_chain(shards, tmp_path):
    """seeds=2, local: seed 0's src cannot run (its stage folder is held by another process, exit
    2); seed 0 runs no later stage, seed 1 runs src and dist_init; the summary is written with
    seed 1 and the launch exits 2 naming seed 0's stage."""
    from sdca_dist.lineage import StageLock

    run = tmp_path / "run"
    lock = StageLock(run / "seed_0" / "src")
    lock.acquire()
    try:
        proc = run_launcher(
            tiny(shards, "cluster=local", "src.iters=2", "seeds=2", "stages=[src,dist_init]", f"run_dir={run}")
        )
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[launch] seed 0 src failed (exit 2); not run for this seed: dist_init; other seeds go on" in proc.stdout
    assert all((run / "seed_1" / st / "DONE").is_file() for st in ("src", "dist_init")), proc.stdout[-3000:]
    assert not (run / "seed_0" / "src" / "DONE").exists() and not (run / "seed_0" / "dist_init").exists()
    assert last_error(proc) == (
        f"error: stage src (seed 0) failed with exit code 2; see its output above and {run / 'seed_0' / 'src'}"
    )
    summary = json.loads((run / "summary.json").read_text())
    assert [r["seed"] for r in summary["stages"]["src"]["per_seed"]] == [1]
