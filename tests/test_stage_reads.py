"""Stage keys against what the stages actually read, and the sharing that follows from them.

The shared chain (``tiny_chain``) runs every chain stage and the alignment ablation with
``SDCA_RECORD_READS`` set, and this module runs oracle and eval the same way on a copy; each
stage then has a record of every setting it read (``sdca_dist.config.reads``). Specifications:

* every setting a stage reads is in its key (``sdca_dist.stage_keys.reads_of``): a read that is
  not declared would let the stage cache reuse a result computed under another value of it.
  Only which job this is (``stage``, ``run_dir``) and where it runs (``cluster.*``) are exempt;
* the other direction is reported (a pytest warning listing, per stage, the declared settings the
  run never read: they cost reuse, not correctness), and for the ``method`` section, whose
  width decides what a method sweep recomputes, the declarations equal the reads;
* so a ``method.pseudo_label_cap`` grid (read by pseudo_label only) shares src, dist_init, sdca,
  the ablation and the oracle between its points and recomputes pseudo_label and ssl; a
  ``method.tau`` grid (an sdca setting) recomputes sdca and what follows and shares the rest.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from engine_fixtures import copy_run, run_launcher, run_train, tiny

from sdca_dist.config import compose_config
from sdca_dist.config.run_config import flat_settings
from sdca_dist.stage_keys import reads_of
from sdca_dist.stage_table import STAGE_NAMES

#: settings that say which job this is and where it runs, not what it computes
NOT_SETTINGS = ("stage", "run_dir", "cluster")


def covered(key: str, declared) -> bool:
    """``key`` (a setting or a section) lies within one of the ``declared`` settings or sections."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def undeclared(stage: str, read: set[str]) -> list[str]:
    return sorted(k for k in read if not covered(k, NOT_SETTINGS) and not covered(k, reads_of(stage)))


def never_read(stage: str, read: set[str], leaves) -> list[str]:
    """Declared settings (as leaves of the configuration) that no read of the stage touched."""
    return sorted(
        leaf
        for leaf in leaves
        if covered(leaf, reads_of(stage)) and not any(leaf == k or leaf.startswith(k + ".") for k in read)
    )


def load_reads(*folders: Path) -> dict[str, set[str]]:
    """{stage: settings read by any of its ranks} from the records in ``folders``."""
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.rank*.json")):
            record = json.loads(path.read_text())
            out.setdefault(record["stage"], set()).update(record["reads"])
    return out


@pytest.fixture(scope="module")
def stage_reads(tiny_chain, tmp_path_factory) -> dict[str, set[str]]:
    """What each of the eight stages read: the shared chain's records, then oracle and eval run
    on a copy of it (no stage cache: they are computed)."""
    refs = tmp_path_factory.mktemp("reference_reads")
    run = copy_run(tiny_chain, refs / "run")
    (run / "cache.json").unlink(missing_ok=True)
    for stage in ("oracle", "eval"):
        proc = run_train(1, [f"stage={stage}", f"run_dir={run}"], SDCA_RECORD_READS=str(refs / "reads"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reads = load_reads(tiny_chain.parent / "reads", refs / "reads")
    assert sorted(reads) == sorted(STAGE_NAMES), sorted(reads)
    return reads


def test_the_record_sees_the_reads_it_must(stage_reads):
    """The instrument itself: typed reads (the sdca objective's MethodConfig), plain reads
    (pseudo_label's cap), a stage's schedule section and the seed are all recorded."""
    assert {"method.tau", "method.feat_weight", "sdca.lr", "seed"} <= stage_reads["sdca"]
    assert {"method.pseudo_label_cap", "method.threshold_bins"} <= stage_reads["pseudo_label"]
    assert "method.pseudo_label_cap" not in stage_reads["sdca"]
    assert "eval.model_from" in stage_reads["eval"] and "oracle.lr" in stage_reads["oracle"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_setting_a_stage_reads_is_in_its_key(stage_reads, stage):
    missing = undeclared(stage, stage_reads[stage])
    assert not missing, (
        f"stage {stage} reads {missing} but its key does not cover them: add them to its StageSpec.reads "
        "(sdca_dist/stage_table.py) or to COMMON_READS (sdca_dist/stage_keys.py)"
    )


def test_declared_settings_never_read_are_reported_and_method_is_exact(stage_reads):
    leaves = list(flat_settings(compose_config(["conf=synthetic"])))
    report = {s: never_read(s, stage_reads[s], leaves) for s in STAGE_NAMES}
    lines = [f"{s}: {', '.join(keys)}" for s, keys in report.items() if keys]
    if lines:
        warnings.warn("declared in a stage key but never read by the tiny chain:\n" + "\n".join(lines), stacklevel=1)
    # the method section decides what a method sweep recomputes: declared = read, per stage
    method = [k for k in leaves if k.startswith("method.")]
    for stage in STAGE_NAMES:
        declared = {k for k in method if covered(k, reads_of(stage))}
        read = {k for k in method if k in stage_reads[stage]}
        assert declared == read, f"{stage}: method declared {sorted(declared)}, read {sorted(read)}"


def _grid_lines(stdout: str) -> dict[str, str]:
    """The dry run's ``[grid] <point>: computes ...; reuses ...`` lines by point."""
    return {
        line.split(": ", 1)[0][len("[grid] ") :].removesuffix(" (baseline)"): line.split(": ", 1)[1]
        for line in stdout.splitlines()
        if line.startswith("[grid] ") and ": computes " in line
    }


def test_a_pseudo_label_cap_grid_shares_every_stage_before_pseudo_label(shards, tmp_path, stage_reads):
    """The dry run of a ``method.pseudo_label_cap`` grid: its second point computes pseudo_label
    and ssl only and reuses src, dist_init, sdca, the ablation and the oracle from the first."""
    args = [
        "cluster=local",
        f"run_dir={tmp_path / 'grid'}",
        "method.pseudo_label_cap=0.8,0.9",
        "with_ablation=true",
        "with_oracle=true",
        "dry_run=true",
    ]
    proc = run_launcher(tiny(shards, *args), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = _grid_lines(proc.stdout)
    first, second = "method.pseudo_label_cap=0.8", "method.pseudo_label_cap=0.9"
    shared = ", ".join(f"{s} from {first}" for s in ("src", "dist_init", "sdca", "sdca_no_align", "oracle"))
    assert lines[second].startswith("computes pseudo_label, ssl; reuses "), lines
    reused = lines[second].split("; reuses ", 1)[1]
    assert sorted(reused.split(", ")) == sorted(shared.split(", ")), lines
    assert not (tmp_path / "grid").exists(), "a dry run wrote the grid folder"


def test_an_sdca_grid_shares_what_comes_before_sdca():
    """In process: a ``method.tau`` sweep (an sdca setting) shares src, dist_init and the oracle
    and recomputes sdca, the ablation, pseudo_label and ssl."""
    from sdca_dist.launch.grid import shared_with

    stages = ["oracle", "src", "dist_init", "sdca", "sdca_no_align", "pseudo_label", "ssl"]
    points = [(("method.tau", "10"),), (("method.tau", "100"),)]
    sharing = shared_with(["conf=synthetic"], points, stages, [0, 1])
    assert [s for s in stages if sharing[(1, s)] == 0] == ["oracle", "src", "dist_init"]
    cap = shared_with(
        ["conf=synthetic"], [(("method.threshold_bins", "100"),), (("method.threshold_bins", "1000"),)], stages, [0]
    )
    assert [s for s in stages if cap[(1, s)] is None] == ["pseudo_label", "ssl"]
