"""Checkpoint selection: ``train.select=final | best_val``.

Specifications (the real CLI, one process, the tiny synthetic benchmark):
* best_val evaluates every ``select_every`` iterations and at the end, lists each evaluation in
  ``<stage>/selection.json`` and keeps the weights with the highest mIoU: model_final.pt equals
  the checkpoint written at that iteration, metrics.json and DONE carry its mIoU and the label
  ``selected: {rule: best_val, iteration, on: target val (the evaluation set)}``;
* evaluating during training leaves training untouched: best_val's last weights equal the
  default (final) run's model_final.pt bitwise, and the final run carries no selection anywhere;
* a best_val stage stopped by SIGTERM in the middle and resumed selects the same iteration,
  mIoU and weights as the uninterrupted run (the best-so-far state is checkpoint state);
* the launcher's summary labels rows selected on the evaluation set (summary.json flag, a
  footnote marker in summary.md); unlabelled otherwise.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from engine_fixtures import REPO, child_env, run_train, tiny, train_cmd
from omegaconf import OmegaConf

from sdca_dist.launch.summary import write_summary

ITERS = 9
EVERY = 3
#: src.lr=0.05 overshoots on the tiny benchmark: the mIoU peaks at an early evaluation and falls, so
#: the selected weights are not the last ones (else best_val could not be told from final)
COMMON = [
    "stage=src",
    f"train.iters={ITERS}",
    f"train.checkpoint_every={EVERY}",
    "train.keep_checkpoints=5",
    "src.lr=0.05",
]
BEST = ["train.select=best_val", f"train.select_every={EVERY}"]
ON = "target val (the evaluation set)"


@pytest.fixture(scope="module")
def final_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("final")
    proc = run_train(1, tiny(shards, *COMMON, f"run_dir={run}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def best_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("best")
    proc = run_train(1, tiny(shards, *COMMON, *BEST, f"run_dir={run}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint(run: Path, iteration: int) -> dict:
    return _weights(run / "src" / "checkpoints" / f"iter_{iteration:08d}" / "common.pt")


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(
            a[k].float() if a[k].is_floating_point() else a[k], b[k].float() if b[k].is_floating_point() else b[k]
        ), f"{what}: {k} differs"


def test_best_val_keeps_the_best_evaluated_weights_and_labels_them(best_run: Path):
    sel = json.loads((best_run / "src" / "selection.json").read_text())
    evals = sel["evaluations"]
    assert [e["iteration"] for e in evals] == list(range(EVERY, ITERS + 1, EVERY))
    best = max(evals, key=lambda e: e["mIoU"])  # max() keeps the first of equals: the earliest wins
    label = {"rule": "best_val", "iteration": best["iteration"], "on": ON, "mIoU": best["mIoU"]}
    assert sel["selected"] == label
    assert best["iteration"] < ITERS, (
        "precondition: the best evaluation must come before the last one, or this "
        f"test cannot tell best_val from final ({evals}); change COMMON's src.lr"
    )

    metrics = json.loads((best_run / "src" / "metrics.json").read_text())
    assert metrics["selected"] == label and metrics["mIoU"] == best["mIoU"]
    assert metrics["last"] == evals[-1] and len(metrics["per_class"]) == 19
    done = json.loads((best_run / "src" / "DONE").read_text())
    assert done["selected"] == label and done["mIoU"] == best["mIoU"]

    # model_final.pt = the weights at the selected iteration (checkpointed at the same cadence)
    _assert_equal(
        _weights(best_run / "src" / "model_final.pt"),
        _checkpoint(best_run, best["iteration"])["model"],
        f"model_final vs checkpoint {best['iteration']}",
    )
    # the best-so-far state is checkpoint state
    assert _checkpoint(best_run, ITERS)["selection"]["best_iteration"] == best["iteration"]


def test_evaluating_during_training_leaves_training_untouched(final_run: Path, best_run: Path):
    _assert_equal(
        _weights(final_run / "src" / "model_final.pt"),
        _checkpoint(best_run, ITERS)["model"],
        "best_val's last weights vs the final run",
    )
    metrics = json.loads((final_run / "src" / "metrics.json").read_text())
    assert "selected" not in metrics and "selected" not in json.loads((final_run / "src" / "DONE").read_text())
    assert not (final_run / "src" / "selection.json").exists()
    assert "selection" not in _checkpoint(final_run, ITERS)
    assert metrics["mIoU"] == json.loads((best_run / "src" / "selection.json").read_text())["evaluations"][-1]["mIoU"]


def test_best_val_resumed_after_sigterm_selects_what_an_uninterrupted_run_does(shards, best_run: Path, tmp_path):
    run = tmp_path / "interrupted"
    argv = tiny(shards, *COMMON, *BEST, f"run_dir={run}")
    proc = subprocess.Popen(
        train_cmd(1, argv), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # stop after the second evaluation has been made (and checkpointed)
        lines.append(line)
        if re.search(rf"\] it {2 * EVERY + 1}/{ITERS}", line):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out[-3000:]
    assert not (run / "src" / "DONE").exists()

    resumed = run_train(1, argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    at = int(re.search(r"resumed from .* at iteration (\d+)", resumed.stdout).group(1))
    assert 2 * EVERY < at < ITERS
    # only the evaluation after the resume point runs again; the earlier ones come from the checkpoint
    assert re.findall(r"selection \(best_val\): iteration (\d+)", resumed.stdout) == [str(ITERS)]
    for name in ("selection.json",):
        assert json.loads((run / "src" / name).read_text()) == json.loads((best_run / "src" / name).read_text())
    a = json.loads((best_run / "src" / "metrics.json").read_text())
    b = json.loads((run / "src" / "metrics.json").read_text())
    assert b["selected"] == a["selected"] and b["per_class"] == a["per_class"]
    _assert_equal(
        _weights(run / "src" / "model_final.pt"),
        _weights(best_run / "src" / "model_final.pt"),
        "resumed vs uninterrupted model_final",
    )


def test_invalid_select_settings_are_one_line_errors(tmp_path):
    for override, message in (
        ("train.select=best", "train.select='best'; valid: final, best_val"),
        ("train.select_every=0", "train.select_every=0 must be >= 1"),
    ):
        proc = run_train(1, ["conf=synthetic", "stage=src", f"run_dir={tmp_path}", override])
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]


def test_summary_labels_rows_selected_on_the_evaluation_set(best_run: Path, final_run: Path, tmp_path):
    cfg = OmegaConf.create({"conf": "synthetic"})
    for run, selected in ((best_run, True), (final_run, False)):
        out = tmp_path / run.name
        assert write_summary(cfg, out, [(0, run)], ["src"]) is not None
        row = json.loads((out / "summary.json").read_text())["stages"]["src"]
        md = (out / "summary.md").read_text()
        assert row["selected_on_val"] is selected
        assert ("selected_iteration" in row["per_seed"][0]) is selected
        assert ("| src † |" in md and "† selected on the evaluation set" in md) is selected
        assert bool(re.search(r"^\| src \|", md, re.M)) is not selected


def test_select_every_is_a_cadence_of_the_scaled_schedule():
    from sdca_dist.config import compose_config
    from sdca_dist.rank_scaling import scaled_schedule

    for scale, every in ((1, 1000), (4, 250), (3, 334)):
        cfg = compose_config(["conf=gta2city", f"train.scale={scale}"])
        assert cfg.train.select == "final" and scaled_schedule(cfg, "sdca").select_every == every
    assert compose_config(["conf=synthetic"]).train.select_every == 100
