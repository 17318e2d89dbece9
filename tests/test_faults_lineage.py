"""Nothing silently wrong: a stage never builds on data or settings other than the run folder's.

Through the real CLI on the tiny synthetic benchmark:
* a shard tar whose bytes changed after packing (same length, manifest untouched) is refused by
  every stage that reads it, naming the tar, and the launcher counts the stages that read it as
  stale; the same for the pseudo-label shards;
* a stage run directly refuses an input whose producer's DONE records other settings than the
  run's (a hand-edited config.yaml), naming the producer and the key;
* settings are finite numbers (``src.lr=inf`` is refused, also from a hand-edited config.yaml);
* no DONE for outputs that are not finite (distributions computed from NaN weights);
* the embedded benchmark is keyed by its generator settings: other settings never reuse its sets.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from engine_fixtures import copy_run, last_error, run_train, tiny

from sdca_dist.config.run_config import load_frozen
from sdca_dist.lineage import Lineage


def _flip_members(tar: Path, manifest: Path, part: str, count: int = 40) -> None:
    """Flip ``count`` bytes inside the ``part`` payload ("image", "label") of every sample of ``tar``
    (same length; the manifest is left as it is)."""
    m = json.loads(manifest.read_text())
    index = [s["name"] for s in m["shards"]].index(tar.name)
    data = bytearray(tar.read_bytes())
    for rec in m["samples"]:
        if rec["shard"] == index:
            off, size = rec[part]
            for i in range(off + size // 3, off + size // 3 + min(count, size // 3)):
                data[i] ^= 0x5A
    tar.write_bytes(bytes(data))


def test_a_shard_tar_changed_after_packing_is_refused_and_makes_its_readers_stale(tiny_chain, shards, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    source = next(p for p in shards.rglob("manifest.json") if p.parent.name == "gta5_train")
    tar = sorted(source.parent.glob("*.tar"))[0]
    original = tar.read_bytes()
    try:  # the session's shard set, restored below: nothing else runs in this worker meanwhile
        _flip_members(tar, source, "image")  # 40 bytes flipped inside every JPEG of the tar
        assert tar.stat().st_size == len(original)
        proc = run_train(1, ["stage=dist_init", f"run_dir={run}"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = last_error(proc)
        assert err.startswith("error: stage 'dist_init' refuses ") and str(tar) in err and "--repair" in err, err
        cfg = load_frozen(run)
        for stage in ("src", "dist_init", "sdca"):
            ok, why = Lineage(run).fresh(cfg, stage)
            assert not ok and str(tar) in why, (stage, why)
    finally:
        tar.write_bytes(original)
    assert Lineage(run).fresh(load_frozen(run), "src") == (True, "done")


def test_a_replaced_pseudo_label_tar_is_refused_naming_it(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    manifest = run / "pseudo_label" / "shards" / "manifest.json"
    before = manifest.read_bytes()
    tar = sorted(manifest.parent.glob("*.tar"))[0]
    size = tar.stat().st_size
    _flip_members(tar, manifest, "label", count=10**9)  # every label rewritten, same length
    assert tar.stat().st_size == size and manifest.read_bytes() == before

    proc = run_train(1, ["stage=ssl", f"run_dir={run}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_error(proc)
    assert str(tar) in err and "redo=[pseudo_label]" in err, err
    ok, why = Lineage(run).fresh(load_frozen(run), "ssl")
    assert not ok and str(tar) in why, why


def test_a_stage_run_directly_refuses_an_input_made_with_other_settings(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    config = run / "config.yaml"
    text = config.read_text()
    assert "lr: 0.01\n" in text
    config.write_text(text.replace("lr: 0.01\n", "lr: 0.02\n", 1))  # src.lr edited by hand

    proc = run_train(1, ["stage=dist_init", f"run_dir={run}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_error(proc)
    assert "stage src was done with other settings" in err and "src.lr: 0.01 -> 0.02" in err, err
    assert "redo=[src]" in err
    ok, why = Lineage(run).fresh(load_frozen(run), "src")
    assert not ok and "src.lr: 0.01 -> 0.02" in why


def test_settings_must_be_finite(tmp_path):
    proc = run_train(1, ["conf=synthetic", "stage=src", f"run_dir={tmp_path / 'run'}", "src.lr=inf"])
    assert proc.returncode == 2
    assert last_error(proc) == "error: src.lr=inf: settings must be finite numbers (not inf or nan)"
    assert not (tmp_path / "run").exists()
    proc = run_train(1, ["conf=synthetic", "stage=src", f"run_dir={tmp_path / 'run'}", "method.tau=nan"])
    assert proc.returncode == 2 and "method.tau=nan" in last_error(proc)


def test_a_hand_edited_config_with_inf_is_refused(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01\n", "lr: .inf\n", 1))
    proc = run_train(1, ["stage=src", f"run_dir={run}"])
    assert proc.returncode == 2 and "src.lr=inf" in last_error(proc) and str(config) in last_error(proc), proc.stderr[
        -2000:
    ]


def test_no_done_for_distributions_that_are_not_finite(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    model = run / "src" / "model_final.pt"
    state = torch.load(model, weights_only=True)
    state = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, model)
    done = json.loads((run / "src" / "DONE").read_text())  # as a stage without the finite check left it
    done["outputs"]["model_final.pt"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (run / "src" / "DONE").write_text(json.dumps(done))

    proc = run_train(1, ["stage=dist_init", f"run_dir={run}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_error(proc)
    assert f"{run / 'dist_init' / 'distributions.pt'} holds " in err and "non-finite values" in err, err
    assert not (run / "dist_init" / "DONE").exists()


def test_no_done_for_weights_that_are_not_finite(shards, tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        1, tiny(shards, "stage=src", f"run_dir={run}", "train.iters=3", "src.lr=1e30", "train.eval_at_end=false")
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = last_error(proc)
    # the weights check names the file; a stop on a non-finite loss (in the training loop) names the loss
    assert re.search(r"non-finite|nan|inf", err, re.I) and "src" in err, err
    assert not (run / "src" / "DONE").exists()
