"""The stage engine for real: torchrun with 2 gloo ranks, DALI loaders, DDP and DeepSpeed.

Specifications:
* the whole chain runs and leaves each stage's outputs (model_final.pt, metrics.json, DONE);
* a stage stopped by a signal on ANY rank at a random step writes a checkpoint, exits 3, and
  the rerun ends with weights bitwise equal to an uninterrupted run;
* DeepSpeed (ZeRO-2 fp32, ZeRO-1 bf16) trains with 2 ranks, resumes bitwise after a signal and
  writes the same model_final.pt format as DDP;
* a stage whose inputs are missing fails at once, naming the missing file.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from engine_fixtures import REPO, child_env, run_launcher, run_train, tiny, train_cmd, worker_pids

STAGES = ["src", "dist_init", "sdca", "pseudo_label", "ssl"]


@pytest.fixture(scope="module")
def chain(shards, tmp_path_factory) -> Path:
    """The full chain, 2 ranks per stage, through the launcher's local mode."""
    run_dir = tmp_path_factory.mktemp("chain")
    proc = run_launcher(
        tiny(
            shards,
            "cluster=local",
            "cluster.tasks_per_node=2",
            "wait=true",
            f"run_dir={run_dir}",
            "train.iters=4",
            "train.checkpoint_every=2",
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir / "launcher.log").write_text(proc.stdout)
    return run_dir


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _stopped_at(run: Path, stage: str) -> int:
    """The iteration of the last complete checkpoint a stopped ``stage`` of ``run`` wrote: where its
    rerun resumes (``iter_00000012``; a ``.tmp`` folder is a checkpoint still being written)."""
    ckpts = [p for p in (run / stage / "checkpoints").glob("iter_*") if not p.name.endswith(".tmp")]
    assert ckpts, f"{run / stage} has no checkpoint"
    return max(int(p.name.split("_")[1]) for p in ckpts)


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    """Two state dicts hold the same keys and bitwise equal tensors (``what`` names them in a failure)."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_chain_writes_every_stage_output(chain: Path):
    for stage in STAGES:
        assert (chain / stage / "DONE").is_file(), stage
        env = json.loads((chain / stage / "environment.json").read_text())  # the versions it ran with
        assert env["torch_build"] == torch.__version__ and env["packages"]["numpy"], stage
    for stage in ("src", "sdca", "ssl"):
        metrics = json.loads((chain / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["mIoU"] <= 100.0
        assert len(metrics["per_class"]) == 19 and "road" in metrics["per_class"]
        state = _state(chain / stage / "model_final.pt")
        assert all(not v.is_floating_point() or v.dtype == torch.float32 for v in state.values())
        assert (chain / stage / "tb").is_dir() and any((chain / stage / "tb").iterdir())
    dists = _state(chain / "dist_init" / "distributions.pt")
    assert dists["feat"]["count"].sum() > 0 and dists["out"]["mean"].shape[1] == 19
    manifest = json.loads((chain / "pseudo_label" / "shards" / "manifest.json").read_text())
    assert manifest and json.loads((chain / "pseudo_label" / "thresholds.json").read_text())["cap"] == 0.9
    # each adapting stage starts from the previous stage's weights, not from scratch
    log = (chain / "launcher.log").read_text()
    assert f"[sdca] initialised from {chain}/src/model_final.pt" in log
    assert f"[ssl] initialised from {chain}/sdca/model_final.pt" in log
    summary = (chain / "summary.md").read_text()
    assert "| src |" in summary and "| ssl |" in summary
    # quiet output: each stage names the settings that differ from the preset once, and the
    # whole configuration (~100 lines) is in the run folder, not printed
    assert "tau: 100.0" not in log and "tau: 100.0" in (chain / "config.yaml").read_text()
    for stage in STAGES:
        assert log.count(f"[{stage}] rank 0 of 2 (gloo, cpu); conf=synthetic with ") == 1, stage


def test_rerunning_the_chain_skips_done_stages(chain: Path, shards: Path):
    proc = run_launcher(
        tiny(
            shards,
            "cluster=local",
            "cluster.tasks_per_node=2",
            "wait=true",
            f"run_dir={chain}",
            "train.iters=4",
            "train.checkpoint_every=2",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("DONE with these settings and inputs, skipped") == len(STAGES)


def test_missing_input_fails_at_once_naming_the_file(tmp_path: Path, shards: Path):
    proc = run_train(1, tiny(shards, "stage=sdca", f"run_dir={tmp_path}"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{tmp_path}/src/model_final.pt" in last and "does not exist" in last
    assert not (tmp_path / "sdca" / "DONE").exists()


def _run_until_signal(overrides: list[str], stop_after: int) -> subprocess.CompletedProcess:
    """Start 2 ranks; once rank 0 reports iteration ``stop_after``, send SIGUSR2 to ONE rank."""
    proc = subprocess.Popen(
        train_cmd(2, overrides), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = []
    signalled = False
    deadline = time.time() + 600
    for line in proc.stdout:
        out.append(line)
        m = re.search(r"\] it (\d+)/", line)
        if m and not signalled and int(m.group(1)) >= stop_after:
            target = random.choice(worker_pids(proc.pid))
            import os

            os.kill(target, signal.SIGUSR2)
            signalled = True
        if time.time() > deadline:
            proc.kill()
            break
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), "")


@pytest.mark.parametrize(
    "engine", [["engine=ddp"], ["engine=deepspeed", "engine.zero_stage=1"]], ids=["ddp", "deepspeed_zero1"]
)
def test_sdca_interrupted_at_a_random_step_resumes_bitwise_exact(shards: Path, tmp_path: Path, engine):
    iters = 16
    base = tmp_path / "base"  # src and dist_init made with the run's own settings (a stage refuses others)
    for stage in ("src", "dist_init"):
        settings = [f"train.iters={iters}", "train.checkpoint_every=5", *engine]
        made = run_train(2, tiny(shards, f"stage={stage}", f"run_dir={base}", *settings))
        assert made.returncode == 0, made.stderr[-3000:]
    runs = {}
    for name in ("straight", "interrupted"):
        runs[name] = tmp_path / name
        shutil.copytree(base, runs[name], ignore=shutil.ignore_patterns(".lock"))
    common = ["stage=sdca"]  # the frozen run configuration holds the rest
    straight = run_train(2, [*common, f"run_dir={runs['straight']}"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    stop_after = random.randint(2, 8)
    first = _run_until_signal([*common, f"run_dir={runs['interrupted']}"], stop_after)
    # each rank exits 3 after the checkpoint; torchrun itself reports any non-zero worker as 1
    assert first.returncode != 0, first.stdout[-3000:]
    assert re.search(r"exitcode\s*: 3 ", first.stdout), first.stdout[-3000:]
    assert "stop signal: checkpoint written" in first.stdout
    # one line for the stop (rank 0), saying how to resume and what torchrun's report that follows means
    stops = [ln for ln in first.stdout.splitlines() if re.search(r"\[sdca\] stopped by SIG[A-Z0-9]+ at iteration", ln)]
    assert len(stops) == 1 and stops[0].endswith(
        "checkpoint written; resume: run the same command again (exit 3); torchrun reports the ranks below "
        "as failed with exitcode 3: that is this stop, not a crash"
    ), stops
    stopped_at = _stopped_at(runs["interrupted"], "sdca")
    assert stop_after <= stopped_at < iters
    assert not (runs["interrupted"] / "sdca" / "DONE").exists()

    second = run_train(2, [*common, f"run_dir={runs['interrupted']}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at iteration {stopped_at}" in second.stdout
    a, b = (_state(runs[name] / "sdca" / "model_final.pt") for name in ("straight", "interrupted"))
    _assert_same_state(a, b, f"sdca's model after a resume at iteration {stopped_at}")
    da, db = (_state(runs[name] / "sdca" / "distributions_final.pt") for name in ("straight", "interrupted"))
    assert da.keys() == db.keys() and {"feat", "out"} <= set(da), (da.keys(), db.keys())
    for level in ("feat", "out"):
        _assert_same_state(da[level], db[level], f"sdca's {level} estimator after a resume at {stopped_at}")


@pytest.mark.parametrize("zero, bf16", [(2, False), (1, True)])
def test_deepspeed_two_ranks_resumes_bitwise_and_writes_plain_model(
    chain: Path, shards: Path, tmp_path: Path, zero, bf16
):
    """ZeRO-2 in fp32 and ZeRO-1 in bf16 (BatchNorm buffers in bf16 via data_types.buffer_dtype):
    src stopped by a signal on one rank at iteration >= 2 of 8 and resumed ends with the weights,
    the mIoU and the per-class IoU of an uninterrupted run, bitwise (CPU kernels are
    deterministic); model_final.pt has the DDP format, and in bf16 holds the fp32 master weights."""
    settings = [
        "stage=src",
        "engine=deepspeed",
        f"engine.zero_stage={zero}",
        f"engine.bf16={str(bf16).lower()}",
        "train.iters=8",
        "train.checkpoint_every=100",
    ]
    runs = {name: tmp_path / name for name in ("straight", "interrupted")}
    straight = run_train(2, tiny(shards, *settings, f"run_dir={runs['straight']}"), timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _run_until_signal(tiny(shards, *settings, f"run_dir={runs['interrupted']}"), 2)
    assert re.search(r"exitcode\s*: 3 ", first.stdout), first.stdout[-3000:]
    stopped_at = _stopped_at(runs["interrupted"], "src")
    assert 2 <= stopped_at < 8 and not (runs["interrupted"] / "src" / "DONE").exists()
    second = run_train(2, ["stage=src", f"run_dir={runs['interrupted']}"], timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"at iteration {stopped_at}" in second.stdout

    ds, resumed = (_state(runs[name] / "src" / "model_final.pt") for name in ("straight", "interrupted"))
    _assert_same_state(ds, resumed, f"src's model after a resume at iteration {stopped_at}")
    metrics = [json.loads((r / "src" / "metrics.json").read_text()) for r in runs.values()]
    assert metrics[0]["mIoU"] == metrics[1]["mIoU"]
    assert json.dumps(metrics[0]["per_class"]) == json.dumps(metrics[1]["per_class"])  # NaN: a class never seen
    present = [v for v in metrics[0]["per_class"].values() if v is not None and v == v]  # null/NaN: absent
    assert present and metrics[0]["mIoU"] == pytest.approx(sum(present) / len(present), abs=1e-6)

    ddp = _state(chain / "src" / "model_final.pt")
    assert ds.keys() == ddp.keys()
    assert all(ds[k].shape == ddp[k].shape and ds[k].dtype == ddp[k].dtype for k in ds)
    if bf16:  # the fp32 master weights, not the bf16 module (whose values all survive a bf16 round trip)
        floats = [v for v in ds.values() if v.is_floating_point()]
        assert any(not torch.equal(v, v.bfloat16().float()) for v in floats), "model_final.pt is bf16-rounded"


def test_eval_stage_reproduces_the_training_stage_metrics(chain: Path, shards: Path):
    """eval on src's model_final.pt must give exactly the mIoU src reported at its end (same data)."""
    proc = run_train(2, tiny(shards, "stage=eval", "eval.model_from=src", f"run_dir={chain}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((chain / "eval" / "metrics.json").read_text())
    trained = json.loads((chain / "src" / "metrics.json").read_text())
    assert evaluated["model_from"] == "src"
    assert evaluated["mIoU"] == trained["mIoU"] and evaluated["per_class"] == trained["per_class"]
