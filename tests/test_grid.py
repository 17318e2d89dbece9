"""Experiment grids from the command line (Hydra's sweep syntax) through the real launcher.

Specifications:
* ``method.tau=1,10 seeds=2 stages=[src,dist_init,sdca]``: one run folder per point and seed
  (``<run_dir>/method.tau=10/seed_0``); src and dist_init computed once per seed (the second
  point reuses them from the stage cache), sdca in every point; summary.md/json at the grid
  folder with the points x stages table and the paired differences against the baseline;
* ``dry_run=true`` prints the grid and which stages each point reuses, and writes nothing;
* bad input is one line naming it, exit 2, nothing written: an unknown key, an empty value, a
  swept seed, a baseline that is no point; a point whose run folder holds other settings;
* the summary's statistics: paired differences per seed, mean, std, 95% t interval.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from engine_fixtures import last_error, run_launcher, tiny

from sdca_dist.config import ConfigError
from sdca_dist.launch.grid import expand, paired, parse_baseline, parse_sweeps, point_name, t_quantile_975

#: the grid fixture launches 12 tiny stage processes (about 2 minutes on an idle 2-core machine)
pytestmark = pytest.mark.timeout(2400)


# --- parsing (no launch) --------------------------------------------------------------------------
def test_sweep_syntax():
    fixed, sweeps = parse_sweeps(
        ["conf=synthetic", "method.tau=1,10,100", "data.synthetic_counts=[24,24,12]", "sdca.lr=choice(0.1,0.2)"]
    )
    assert fixed == ["conf=synthetic", "data.synthetic_counts=[24,24,12]"]
    assert sweeps == [("method.tau", ["1", "10", "100"]), ("sdca.lr", ["0.1", "0.2"])]
    points = expand(sweeps)
    assert len(points) == 6 and point_name(points[1]) == "method.tau=1,sdca.lr=0.2"
    assert parse_sweeps(["sdca.iters=range(1,4)"])[1] == [("sdca.iters", ["1", "2", "3"])]
    assert parse_baseline("method.tau=100,sdca.lr=0.2", points) == points[5]
    assert parse_baseline(None, points) == points[0]


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


def test_paired_differences_mean_std_and_t_interval():
    d = paired({0: 1.0, 1: 2.0, 2: 4.0})
    assert d["mean"] == pytest.approx(7 / 3)
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert d["std"] == pytest.approx(std)
    half = 4.303 * std / math.sqrt(3)
    assert d["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert t_quantile_975(30) == 2.042 and abs(t_quantile_975(60) - 2.000) < 0.002
    assert abs(t_quantile_975(120) - 1.980) < 0.002


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


@pytest.fixture(scope="module")
def grid(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    args = tiny(
        shards, "cluster=local", "train.iters=2", "method.tau=1,10", "seeds=2", "stages=[src,dist_init,sdca]"
    ) + [f"run_dir={root / 'tau'}", "baseline=method.tau=10"]
    dry = run_launcher([*args, "dry_run=true"])
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert not (root / "tau").exists(), "a dry run writes nothing"
    proc = run_launcher(args, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "tau", dry, proc, args


def test_dry_run_prints_the_grid_and_what_each_point_reuses(grid):
    _, dry, _, _ = grid
    assert "[grid] 2 point(s) x 2 seed(s)" in dry.stdout
    assert "[grid] method.tau=1: computes src, dist_init, sdca" in dry.stdout
    assert (
        "[grid] method.tau=10 (baseline): computes sdca; reuses src from method.tau=1, dist_init from method.tau=1"
        in dry.stdout
    )


def test_shared_stages_run_once_per_seed(grid):
    root, _, proc, _ = grid
    computed, reused = [], []
    for point in ("method.tau=1", "method.tau=10"):
        for seed in (0, 1):
            for stage in ("src", "dist_init", "sdca"):
                done = json.loads((root / point / f"seed_{seed}" / stage / "DONE").read_text())
                (reused if done.get("reused_from") else computed).append((point, seed, stage))
    assert sorted(reused) == sorted((("method.tau=10", s, st) for s in (0, 1) for st in ("src", "dist_init")))
    assert len(computed) == 8  # 2 src + 2 dist_init + 4 sdca
    cfg = (root / "method.tau=10" / "seed_1" / "config.yaml").read_text()
    assert re.search(r"^  tau: 10.0$", cfg, re.M) and re.search(r"^seed: 1$", cfg, re.M)
    src = [json.loads((root / p / "seed_0" / "src" / "DONE").read_text()) for p in ("method.tau=1", "method.tau=10")]
    assert src[0]["outputs"] == src[1]["outputs"]


def test_grid_summary_has_the_table_and_paired_differences(grid):
    root, _, _, _ = grid
    summary = json.loads((root / "summary.json").read_text())
    assert summary["baseline"] == "method.tau=10"
    sdca = summary["table"]["method.tau=1"]["sdca"]
    base = summary["table"]["method.tau=10"]["sdca"]
    diff = summary["paired_differences"]["sdca"]["method.tau=1"]
    for seed in ("0", "1"):
        assert diff["per_seed"][seed] == pytest.approx(sdca["per_seed"][seed] - base["per_seed"][seed])
    assert diff["n"] == 2 and len(diff["ci95"]) == 2
    # src is shared: its paired difference is exactly zero on every seed
    assert all(v == 0.0 for v in summary["paired_differences"]["src"]["method.tau=1"]["per_seed"].values())
    md = (root / "summary.md").read_text()
    assert "| method.tau=10 (baseline) |" in md and "Paired differences against the baseline method.tau=10" in md
    assert "(r)" in md  # reused stages are marked


def test_a_point_whose_folder_holds_other_settings_is_refused(grid):
    root, _, _, args = grid
    changed = [a for a in args if not a.startswith("train.iters=")] + ["train.iters=3"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    proc = run_launcher(changed)
    assert proc.returncode == 2
    assert "was started with other settings (train.iters: 2 -> 3)" in proc.stderr
    assert last_error(proc) == "error: grid point method.tau=1 cannot run (above); nothing launched"
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before, "something was written"
