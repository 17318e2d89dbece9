"""Helpers for engine tests: the real CLI (alone or under torchrun) on a tiny synthetic benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: a tiny synthetic benchmark (generated once per test session under its own shards root)
TINY = [
    "conf=synthetic",
    "train.log_every=1",
    "train.image_every=2",
    "train.eval_batch_size=4",
    "data.synthetic_counts=[24,24,12]",
    "data.synthetic_source_size=[72,144]",
    "data.synthetic_target_size=[64,128]",
    "data.source_resize=[64,128]",
    "data.target_resize=[64,128]",
    "data.eval_resize=[64,128]",
    "data.ssl_crop=[48,96]",
    "src.batch_size=4",
    "sdca.batch_size=2",
    "sdca.target_batch_size=2",
    "ssl.batch_size=4",
    "oracle.batch_size=4",
]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: no rank variables of this process, one thread,
    and no GPU (``CUDA_VISIBLE_DEVICES=""``): the tests assert gloo and CPU devices, so on a GPU
    node their children must not see the GPUs either. ``extra`` adds variables."""
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e["CUDA_VISIBLE_DEVICES"] = ""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def train_cmd(ranks: int, overrides: list[str]) -> list[str]:
    """The launcher's own local command for a stage (torchrun for several ranks)."""
    from sdca_dist.launch.backends.local import train_command

    return train_command(ranks, overrides)


def tiny(shards_root: Path, *overrides: str) -> list[str]:
    return TINY + [f"data.shards_root={shards_root}", *overrides]


def run_train(ranks: int, overrides: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(ranks, overrides), cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout
    )


def run_launcher(overrides: list[str], timeout: int = 1200, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "slurm.py"), *overrides],
        cwd=REPO,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_error(proc: subprocess.CompletedProcess) -> str:
    """The last line of a finished command's stderr (where the CLIs put their one-line error)."""
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder ``run`` at ``dest`` without stage locks, for a test to change."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def worker_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (torchrun's rank processes)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def fake_shard_sets(root: Path) -> Path:
    """Manifests (empty) for the real presets' shard sets: enough for the launcher's preflight."""
    for name in ("gta5_train", "cityscapes_train", "cityscapes_val"):
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}")
    return root


def dry_run_plan(stdout: str) -> dict:
    """The launcher's ``[dry-run] <stage>: {json}`` lines as {stage: plan}."""
    import json

    return {
        line.split(":", 1)[0][len("[dry-run] ") :]: json.loads(line.split(": ", 1)[1])
        for line in stdout.splitlines()
        if line.startswith("[dry-run] ")
    }
