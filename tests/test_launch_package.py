"""The launcher package and the stage table as the one extension point.

Specifications:
* every per-stage list is derived from the stage table: the schema has one schedule section per
  training stage's ``schedule`` and one launcher bool per reference stage's ``launch_flag``; each
  flag adds its stage to the plan, in table order; the schedule checks run on every section;
* ``cluster.name`` is a backend module of ``sdca_dist.launch.backends``, each with its
  ``conf/cluster/<name>.yaml``; an unknown name is one line listing the backends;
* the summary reports each ablation (``paired_with``) as a paired difference per seed, under the
  name its ``effect`` gives;
* the launcher runs as ``python -m sdca_dist.launch``; composing a configuration and importing
  the launcher and its backends imports no torch, a dry run neither torch nor submitit (the
  status view of a real run: ``tests/test_status.py``).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sdca_dist.config import ConfigError, compose_config
from sdca_dist.config.compose import conf_dir
from sdca_dist.config.run_config import parse_launch
from sdca_dist.config.schema import Config, LaunchConfig, StageSchedule
from sdca_dist.launch.backends import backend, backend_names
from sdca_dist.launch.plan import planned_stages
from sdca_dist.launch.summary import write_summary
from sdca_dist.stage_table import CHAIN, TABLE, spec

REPO = Path(__file__).resolve().parents[1]


def test_schema_sections_and_launcher_flags_come_from_the_stage_table():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for s in TABLE:
        if s.training:
            assert issubclass(fields[s.schedule].default_factory, StageSchedule), s.name
    launch_bools = {f.name for f in dataclasses.fields(LaunchConfig) if f.type in (bool, "bool")}
    flags = {s.launch_flag: s.name for s in TABLE if s.launch_flag}
    assert flags == {"with_oracle": "oracle", "with_ablation": "sdca_no_align"}
    assert set(flags) <= launch_bools
    for flag, stage in flags.items():
        planned = planned_stages(parse_launch([f"{flag}=true"]))
        assert planned == [s.name for s in TABLE if s.name in set(CHAIN) | {stage}]
    assert planned_stages(parse_launch([])) == list(CHAIN)


def test_schedule_checks_run_on_every_schedule_section():
    for section in dict.fromkeys(s.schedule for s in TABLE if s.training):
        with pytest.raises(ConfigError, match=rf"^{section}\.iters=0 must be >= 1$"):
            compose_config(["conf=synthetic", f"{section}.iters=0"])
    for s in TABLE:
        if "target_batch_size" in s.batch_keys:
            with pytest.raises(ConfigError, match=rf"^{s.schedule}\.target_batch_size=0 must be >= 1$"):
                compose_config(["conf=synthetic", f"{s.schedule}.target_batch_size=0"])


def test_cluster_names_are_the_backend_modules_each_with_a_cluster_file():
    assert backend_names() == ("local", "slurm")
    for name in backend_names():
        assert backend(name).name == name
        assert OmegaConf.load(conf_dir() / "cluster" / f"{name}.yaml").name == name
    with pytest.raises(ConfigError, match=r"^cluster.name='pbs'; valid: local, slurm$"):
        backend("pbs")


def test_an_unknown_cluster_name_is_refused_where_the_backend_is_chosen(tmp_path, capsys):
    from sdca_dist.launch.cli import main

    rc = main(["conf=synthetic", "cluster.name=pbs", "dry_run=true", f"run_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "error: cluster.name='pbs'; valid: local, slurm"
    assert not (tmp_path / "run").exists()


def _seed_folder(rd: Path, scores: dict[str, float]) -> None:
    for stage, miou in scores.items():
        (rd / stage).mkdir(parents=True)
        (rd / stage / "DONE").write_text(json.dumps({"wall_seconds": 10.0}))
        (rd / stage / "metrics.json").write_text(json.dumps({"mIoU": miou, "per_class": {"road": miou}}))


def test_summary_reports_each_ablation_as_a_paired_difference(tmp_path):
    runs = [(0, tmp_path / "seed_0"), (1, tmp_path / "seed_1")]
    _seed_folder(runs[0][1], {"sdca": 30.0, "sdca_no_align": 29.0})
    _seed_folder(runs[1][1], {"sdca": 31.0, "sdca_no_align": 32.0})
    cfg = OmegaConf.create({"conf": "synthetic"})
    write_summary(cfg, tmp_path, runs, ["sdca", "sdca_no_align"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    ablation = spec("sdca_no_align")
    assert (ablation.paired_with, ablation.effect) == ("sdca", "alignment effect")
    effect = summary["alignment_effect"]
    assert effect["per_seed"] == {"0": 1.0, "1": -1.0} and effect["mean"] == 0.0
    assert effect["std"] == pytest.approx(2**0.5)
    md = (tmp_path / "summary.md").read_text()
    assert "Alignment effect (sdca - sdca_no_align, paired by seed): +0.00 ± 1.41 mIoU (0: +1.00, 1: -1.00)" in md


def test_planning_imports_no_torch_and_a_dry_run_neither_torch_nor_submitit(tmp_path):
    plan = (
        "import sys; import sdca_dist.launch.cli, sdca_dist.launch.backends.slurm, sdca_dist.launch.backends.local; "
        "from sdca_dist.config import compose_config; compose_config(['conf=synthetic']); "
        "print('imported', sorted(m for m in ('torch', 'submitit') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", plan], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported []" in proc.stdout, proc.stderr[-2000:]
    dry = (
        "import sys; from sdca_dist.launch.cli import main; "
        f"rc = main(['conf=synthetic', 'dry_run=true', 'with_oracle=true', 'run_dir={tmp_path / 'run'}']); "
        "print(sorted(m for m in ('torch', 'submitit') if m in sys.modules)); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", dry], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "[]"  # a whole dry run: preflight, shard-set paths, lineage
    assert '[dry-run] oracle: {"nodes": 1' in proc.stdout
    assert '"sbatch": {"job_name": "sdca-synthetic-src"' in proc.stdout
    assert not (tmp_path / "run").exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "sdca_dist.launch", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert help_text.returncode == 0 and "python -m sdca_dist.launch conf=NAME" in help_text.stdout
