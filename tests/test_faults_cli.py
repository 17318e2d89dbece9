"""The command-line tools refuse nonsense in one line and leave nothing behind:
benchmark and sampler arguments are range-checked; a killed shard build leaves no pool workers;
a failed one leaves no empty --out; absurd scaled plans are warned about; the ranks of a torchrun
whose agent dies stop instead of training on unsupervised."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_fixtures import (
    REPO,
    child_env,
    dry_run_plan,
    fake_shard_sets,
    last_error,
    run_launcher,
    tiny,
    train_cmd,
    worker_pids,
)

from sdca_dist.config import compose_config
from sdca_dist.rank_scaling import plan_warnings


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, option",
    [
        (["sdca_dist.bench", "step", "--size", "0", "0"], "--size"),
        (["sdca_dist.bench", "step", "--iters", "0"], "--iters"),
        (["sdca_dist.bench", "loader", "--batches", "-1"], "--batches"),
        (["sdca_dist.bench", "loader", "--images", "0"], "--images"),
        (["sdca_dist.data.sampling", "x/manifest.json", "--draws", "3", "--seed", "-1"], "--seed"),
    ],
)
def test_out_of_range_arguments_are_refused_in_one_line(args, option):
    proc = _run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"argument {option}: must be >= " in last_error(proc), last_error(proc)
    assert not proc.stdout.strip(), "a table was printed"


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("sdca_dist.bench.thresholds", ["--images", "0"], "argument --images: must be between 1 and 2,975, got 0"),
        ("sdca_dist.bench.thresholds", ["--mem", "ours"], "unrecognized arguments: --mem ours"),
        ("sdca_dist.bench.scale", ["--k", "0"], "unrecognized arguments: --k 0"),  # not the hidden --kill-rank
        ("sdca_dist.bench.scale", ["--iters", "0"], "argument --iters: must be between 1 and 100,000, got 0"),
        ("sdca_dist.bench.scale", ["--timeout", "0"], "argument --timeout: must be a finite number > 0, got 0"),
        ("sdca_dist.bench.estimator", ["--memory", "ours"], "unrecognized arguments: --memory ours"),
        ("sdca_dist.bench.estimator", ["--reps", "0"], "argument --reps: must be between 1 and 1,000, got 0"),
        ("sdca_dist.bench.step", ["--it", "3"], "unrecognized arguments: --it 3"),
        ("sdca_dist.bench.loader", ["--image", "3"], "unrecognized arguments: --image 3"),
        (
            "sdca_dist.data.sampling",
            ["x/manifest.json", "--draws", "100000000000"],
            "argument --draws: must be between 1 and 100,000,000, got 100,000,000,000",
        ),
        ("sdca_dist.data.sampling", ["x/manifest.json", "--draws", "0"], "argument --draws: must be between"),
        ("sdca_dist.data.sampling", ["x/manifest.json", "--draws", "3", "--sum"], "unrecognized arguments: --sum"),
        ("sdca_dist.synth", ["--out", "x", "--num-source", "0"], "argument --num-source: must be >= 1, got 0"),
        ("sdca_dist.synth", ["--out", "x", "--work", "2"], "unrecognized arguments: --work 2"),
        ("sdca_dist.shard", ["--layout", "gta5", "--root", "r", "--out", "o", "--work", "2"], "unrecognized arguments"),
        (
            "sdca_dist.models.convert",
            ["--from", "official", "ck.pth", "--out", "o.pt", "--num", "19"],
            "unrecognized arguments: --num 19",
        ),
    ],
)
def test_abbreviations_zero_and_absurd_sizes_are_refused_in_one_line(module, argv, message, capsys):
    """Every tool's options are named in full (an abbreviation is never taken for a hidden test
    option), sizes are range-checked and memory-growing ones bounded, before any work starts."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and not out.strip()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_every_tool_builds_its_parser_with_the_shared_one():
    """``sdca_dist.arguments.parser`` (no abbreviations, one-line errors) is the only ArgumentParser."""
    own = REPO / "sdca_dist" / "arguments.py"
    files = [p for p in (REPO / "sdca_dist").rglob("*.py") if p != own]
    others = [str(p.relative_to(REPO)) for p in files if "ArgumentParser(" in p.read_text()]
    assert others == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _big_gta5(src: Path, dest: Path, copies: int) -> Path:
    """A gta5-layout folder of ``copies`` pairs (copies of the tiny set's files: slow enough to kill)."""
    for sub in ("images", "labels"):
        (dest / sub).mkdir(parents=True)
    pairs = sorted((src / "images").glob("*.png"))
    for i in range(copies):
        p = pairs[i % len(pairs)]
        shutil.copy(p, dest / "images" / f"{i:05d}.png")
        shutil.copy(src / "labels" / p.name, dest / "labels" / f"{i:05d}.png")
    return dest


def test_a_killed_shard_build_leaves_no_pool_workers(synth_root, tmp_path):  # noqa: F811
    raw = _big_gta5(synth_root / "gta5", tmp_path / "gta5", 3000)
    cmd = [sys.executable, "-m", "sdca_dist.shard", "--layout", "gta5", "--root", str(raw)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"], cwd=REPO, env=child_env()
    )
    workers: list[int] = []
    try:
        end = time.time() + 120
        while time.time() < end and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.5)
            workers = [p for p in worker_pids(proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) >= 2, "the pool did not start"
        time.sleep(2)  # the workers are encoding
        proc.kill()
        proc.wait()
        end = time.time() + 30
        while time.time() < end and any(_alive(p) for p in workers):
            time.sleep(0.5)
        assert not [p for p in workers if _alive(p)], "pool workers outlived the killed build"
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_failed_shard_build_leaves_no_empty_out(synth_root, tmp_path):  # noqa: F811
    raw = tmp_path / "gta5"
    shutil.copytree(synth_root / "gta5", raw)
    sorted((raw / "images").glob("*.png"))[3].write_bytes(b"not an image")
    out = tmp_path / "new" / "out"
    proc = _run("sdca_dist.shard", "--layout", "gta5", "--root", str(raw), "--out", str(out), "--workers", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists(), "an empty --out was left"


def test_absurd_scaled_plans_are_warned_about(tmp_path):
    cfg = compose_config(["conf=gta2city", "train.scale=1000"])
    lines = plan_warnings(cfg)
    assert any("stage src: warm-up (20 iterations) covers the whole stage (20 iterations)" in w for w in lines)
    assert any("stage src: train.scale=1000 leaves 20 iterations" in w for w in lines)
    assert plan_warnings(compose_config(["conf=gta2city"])) == []
    assert plan_warnings(compose_config(["conf=gta2city", "train.scale=2"])) == []

    shards = fake_shard_sets(tmp_path / "shards")
    proc = run_launcher(
        ["conf=gta2city", "nodes=1000", "train.scale=auto", f"data.shards_root={shards}", "dry_run=true"]
        + [f"run_dir={tmp_path / 'run'}"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dry_run_plan(proc.stdout)["src"]["scale"] == 1000
    assert "[launch] warning: stage src: warm-up (20 iterations) covers the whole stage" in proc.stdout


def test_ranks_stop_when_their_torchrun_agent_dies(tmp_path):
    run = tmp_path / "run"
    argv = tiny(tmp_path / "shards", "stage=src", f"run_dir={run}", "train.iters=5000", "train.checkpoint_every=1000")
    agent = subprocess.Popen(
        train_cmd(2, argv), cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ranks: list[int] = []
    try:
        for line in agent.stdout:
            if "] it 2/" in line:
                break
        ranks = worker_pids(agent.pid)
        assert len(ranks) == 2, ranks
        agent.send_signal(signal.SIGUSR2)  # the agent dies of it (no handler of its own)
        agent.wait(timeout=60)
        end = time.time() + 120
        while time.time() < end and any(_alive(p) for p in ranks):
            time.sleep(1)
        assert not [p for p in ranks if _alive(p)], "ranks kept training after their agent died"
        checkpoints = list((run / "src" / "checkpoints").glob("iter_*"))
        assert checkpoints and all((c / "COMPLETE.json").is_file() for c in checkpoints)
    finally:
        for p in ranks:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
