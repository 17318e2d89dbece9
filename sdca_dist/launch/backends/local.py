"""``cluster=local``: the chain on this machine, stage after stage, one torchrun (or plain python)
process group per stage with its planned world size.

This machine is one node: a launch with ``nodes > 1`` is refused (use more
``cluster.tasks_per_node`` for more local ranks). A stage that fails and gates the chain stops
that seed's chain; the other seeds go on (their chains do not depend on it), and the launch
exits 2 after the summary, naming the failure. A reference stage's failure is reported and the
chain goes on.

A failed attempt leaves ``<stage>/FAILED.json`` (exit code, last error line) for the status view;
the stages run before ``run`` returns, so there is nothing to wait for and no job states.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sdca_dist.config.schema import LaunchConfig
from sdca_dist.files import atomic_write_text
from sdca_dist.launch.backends.base import Backend, LaunchError, LaunchHooks, Todo, last_error_line
from sdca_dist.run_folder import DONE, FAILED
from sdca_dist.stage_table import spec


def train_command(ranks: int, args: list[str]) -> list[str]:
    """The command that runs ``python -m sdca_dist.train args`` on ``ranks`` local ranks: torchrun
    (standalone rendezvous) for several, one plain process for one."""
    if ranks > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "sdca_dist.train",
            *args,
        ]
    return [sys.executable, "-m", "sdca_dist.train", *args]


def run_recorded(cmd: list[str], folder: Path) -> int:
    """Run one local stage process, its stderr passed through as it comes and kept; a failure
    leaves ``<folder>/FAILED.json`` (exit code, last error line), a success removes it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED).unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), stderr=subprocess.PIPE, text=True, errors="replace")
    tail: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)
            del tail[:-200]

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = proc.wait()
    t.join()
    if rc != 0:
        record = {"exit_code": rc, "error": last_error_line(tail), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(folder / FAILED, json.dumps(record, indent=1) + "\n")
    return rc


def run_local(todo: Todo, plan: dict[str, dict], model_from: str) -> list[dict]:
    """The chain on this machine: one torchrun (or plain python) process group per stage, each
    with its planned world size. A seed whose chain stage fails runs no later stage; the other
    seeds go on. One record per stage run."""
    records = []
    for seed, run_dir, stages in todo:
        for stage, why in stages:
            ranks = int(plan[stage]["world_size"])
            args = [f"stage={stage}", f"run_dir={run_dir}"] + (
                [f"eval.model_from={model_from}"] if stage == "eval" else []
            )
            cmd = train_command(ranks, args)
            print(f"[launch] seed {seed} {stage} ({why}): {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            rc = run_recorded(cmd, run_dir / stage)  # a failure leaves FAILED.json for the status view
            done = (run_dir / stage / DONE).is_file()
            state = "COMPLETED" if rc == 0 and done else f"FAILED(rc={rc})"
            records.append(
                {
                    "seed": seed,
                    "stage": stage,
                    "state": state,
                    "run_dir": str(run_dir),
                    "seconds": round(time.time() - t0, 1),
                    "exit_code": rc,
                }
            )
            if state != "COMPLETED":
                if not spec(stage).gates_chain:
                    print(f"[launch] seed {seed} {stage} failed (exit {rc}); it gates nothing, going on", flush=True)
                    continue
                later = [s for s, _ in stages[[s for s, _ in stages].index(stage) + 1 :]]
                note = f"; not run for this seed: {', '.join(later)}" if later else ""
                print(f"[launch] seed {seed} {stage} failed (exit {rc}){note}; other seeds go on", flush=True)
                break
    return records


class LocalBackend(Backend):
    name = "local"

    def check_shape(self, cfg: DictConfig, launch: LaunchConfig) -> None:
        if launch.nodes > 1:
            raise LaunchError(
                f"nodes={launch.nodes} with cluster=local: this machine is one node; use "
                f"cluster.tasks_per_node={launch.nodes * cfg.cluster.tasks_per_node} for as many local ranks"
            )

    def run(
        self,
        cfg: DictConfig,
        launch: LaunchConfig,
        root: Path,
        todo: Todo,
        plan: dict[str, dict],
        stages: list[str],
        hooks: Optional[LaunchHooks] = None,
    ) -> Optional[list[dict]]:
        return run_local(todo, plan, str(cfg.eval.model_from))

    def failure(self, records: list[dict]) -> Optional[str]:
        failed = [r for r in records if r["state"] != "COMPLETED" and spec(r["stage"]).gates_chain]
        if not failed:
            return None
        first = failed[0]
        more = f" ({len(failed) - 1} more failed: seeds {', '.join(str(r['seed']) for r in failed[1:])})"
        return (
            f"stage {first['stage']} (seed {first['seed']}) failed with exit code {first['exit_code']}; see its "
            f"output above and {Path(first['run_dir']) / first['stage']}" + (more if len(failed) > 1 else "")
        )


BACKEND = LocalBackend()
