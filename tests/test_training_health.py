"""Non-finite losses and out-of-range labels stop training with one line (exit 2), recorded on
the device without a host read per step, and never leave non-finite weights on disk."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import run_train, tiny

from sdca_dist.engine.distributed import DistContext
from sdca_dist.engine.health import TrainingHealth, TrainingHealthError

CPU = DistContext(0, 1, 0, torch.device("cpu"), "gloo")


def test_first_non_finite_term_is_named_with_its_iteration():
    h = TrainingHealth("sdca", CPU, num_classes=19)
    h.observe(0, {"loss": torch.tensor(1.0), "seg": torch.tensor(0.5), "lr": 0.1})
    h.check()  # all finite: nothing to say
    h.observe(6, {"loss": torch.tensor(2.0), "seg": torch.tensor(float("inf"))})
    h.observe(7, {"loss": torch.tensor(float("nan")), "seg": torch.tensor(float("nan"))})
    with pytest.raises(TrainingHealthError, match=r"^stage sdca: non-finite loss term 'seg' at iteration 7;"):
        h.check()


def test_out_of_range_labels_are_ignored_at_once_and_reported():
    h = TrainingHealth("src", CPU, num_classes=19)
    label = torch.tensor([[0, 18, 255, 19, -1]])
    h.labels(3, "source", label)
    assert label.tolist() == [[0, 18, 255, 255, 255]]  # no kernel ever sees 19 or -1
    with pytest.raises(TrainingHealthError, match=r"labels of 'source' outside \[0, 19\) .* at iteration 4"):
        h.check()


def test_non_finite_weights_are_refused():
    h = TrainingHealth("src", CPU, num_classes=19)
    h.check_weights({"w": torch.ones(2), "steps": torch.tensor(3)}, 5)
    with pytest.raises(TrainingHealthError, match=r"non-finite weights \('b'\) after iteration 5"):
        h.check_weights({"w": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, 5)


@pytest.mark.timeout(600)
def test_diverging_run_exits_2_in_one_line_and_writes_no_non_finite_weights(tmp_path):
    """src with an absurd learning rate diverges within a few steps: exit 2 with one line naming
    the stage, no model_final.pt, and every checkpoint left on disk is finite."""
    run = tmp_path / "run"
    r = run_train(
        1,
        tiny(
            tmp_path / "shards", "stage=src", f"run_dir={run}", "src.iters=4", "src.lr=1e12", "train.checkpoint_every=2"
        ),
    )
    assert r.returncode == 2, r.stderr[-3000:]
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("error: stage src: non-finite") and "iteration" in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (run / "src" / "model_final.pt").exists()
    for f in (run / "src").rglob("common.pt"):
        model = torch.load(f, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), f
