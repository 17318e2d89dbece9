"""tests/gpu/gpu_check.py on the CPU: ``--smoke`` runs every item that can run without a GPU (the
script itself is checked here; its figures come from a GPU machine), and a FAIL means exit 1."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from engine_fixtures import REPO, child_env

CHECK = [sys.executable, str(REPO / "tests" / "gpu" / "gpu_check.py")]


def _lines(stdout: str) -> dict[str, list[str]]:
    return {m.group(1): m.group(2, 3) for m in re.finditer(r"^(G\d) (PASS|FAIL|SKIP) (.*)$", stdout, re.M)}


@pytest.mark.timeout(900)
def test_smoke_runs_every_item_and_skips_the_gpu_ones():
    r = subprocess.run(CHECK + ["--smoke"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    items = _lines(r.stdout)
    assert sorted(items) == [f"G{n}" for n in range(8)], r.stdout
    for n in (1, 2, 3, 4):
        assert items[f"G{n}"][0] == "PASS", r.stdout
    assert "bitwise=True" in items["G3"][1]  # CPU resume is bitwise
    assert "counts_equal=True" in items["G2"][1] and "stop_vote_steps=[3, 3]" in items["G2"][1]
    for n in (0, 5, 6, 7):
        assert items[f"G{n}"][0] == "SKIP", r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU build of torch")
def test_a_cpu_torch_fails_the_environment_item_and_the_exit_status():
    r = subprocess.run(CHECK + ["--only", "0"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^G0 FAIL .*torch.cuda.is_available\(\) is False", r.stdout, re.M), r.stdout
