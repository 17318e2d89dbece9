"""predict ends in one line for the user's mistakes and never leaves a partial set under out:
a garbage weights file, weights of another class count, an out that is full or read-only."""

from __future__ import annotations

import torch
from engine_fixtures import last_error
from fault_fixtures import tmpfs
from predict_fixtures import OVERRIDES, run_predict

from sdca_dist.models import build_model


def test_garbage_or_wrong_class_count_weights_end_in_one_line(valset, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all" * 50)
    proc = run_predict([*OVERRIDES, f"model={garbage}", f"input={valset.shards}", f"out={tmp_path / 'a'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_error(proc).startswith("error: cannot read model weights ") and str(garbage) in last_error(proc)

    sixteen = tmp_path / "sixteen.pt"
    torch.save(build_model("small", 16).state_dict(), sixteen)
    proc = run_predict([*OVERRIDES, f"model={sixteen}", f"input={valset.shards}", f"out={tmp_path / 'b'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_error(proc).startswith("error: ") and str(sixteen) in last_error(proc)


def test_out_on_a_full_file_system_leaves_no_partial_set(valset, tmp_path):
    out = tmp_path / "full"
    with tmpfs(out, size="24k"):
        proc = run_predict([*OVERRIDES, f"model={valset.weights}", f"input={valset.shards}", f"out={out}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "No space left on device" in last_error(proc) and str(out) in last_error(proc), last_error(proc)
        assert not [p for p in out.rglob("*") if p.is_file()], "partial predictions left behind"


def test_out_on_a_read_only_file_system_ends_in_one_line(valset, tmp_path):
    out = tmp_path / "ro"
    with tmpfs(out, read_only=True):
        proc = run_predict([*OVERRIDES, f"model={valset.weights}", f"input={valset.shards}", f"out={out}/pred"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Read-only file system" in last_error(proc) and str(out) in last_error(proc), last_error(proc)
