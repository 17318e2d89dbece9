"""tests/gpu/gpu_check.py on the CPU: ``--smoke`` runs every item that can run without a GPU (the
script itself is checked here; its figures come from a GPU machine), a FAIL means exit 1, and each
item FAILs when the thing it names is broken on purpose (a mutant): its verdict is a function of
what it measured, so the same verdicts a GPU run reaches are reached here with the GPU's facts
given (an arch list, a backend, a resume difference, timings) or with the CPU path broken."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from engine_fixtures import REPO, child_env

CHECK = [sys.executable, str(REPO / "tests" / "gpu" / "gpu_check.py")]
sys.path.insert(0, str(REPO / "tests" / "gpu"))
import gpu_check as g  # noqa: E402  (the check is a script, not a package)


def _lines(stdout: str) -> dict[str, list[str]]:
    return {m.group(1): m.group(2, 3) for m in re.finditer(r"^(G\d|M_\w+) (PASS|FAIL|SKIP) (.*)$", stdout, re.M)}


@pytest.mark.timeout(900)
def test_smoke_runs_every_item_and_skips_the_gpu_ones():
    r = subprocess.run(CHECK + ["--smoke"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    items = _lines(r.stdout)
    assert sorted(items) == [f"G{n}" for n in range(8)], r.stdout
    for n in (1, 2, 3, 4, 5, 6):
        assert items[f"G{n}"][0] == "PASS", r.stdout
    assert "-> bitwise" in items["G3"][1]  # CPU resume through run_training is bitwise
    g2 = items["G2"][1]
    assert "counts_equal=True" in g2 and "stop_agreed_at=3" in g2 and "vote_collective=True" in g2
    assert "rel_diff=" in items["G4"][1]
    for fmt in ("jpeg/train", "jpeg/eval", "png/train", "png/eval"):
        assert f"{fmt}: labels_equal=1.0000" in items["G5"][1], items["G5"][1]
    for n in (0, 7):
        assert items[f"G{n}"][0] == "SKIP", r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU build of torch")
def test_a_cpu_torch_fails_the_environment_item_and_the_exit_status():
    r = subprocess.run(CHECK + ["--only", "0"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^G0 FAIL .*torch.cuda.is_available\(\) is False", r.stdout, re.M), r.stdout


# ------------------------------------------------------------------ verdicts on a GPU's facts
V100 = (7, 0)
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def test_g0_a_cuda13_torch_on_a_v100_fails_and_a_matching_build_passes():
    with pytest.raises(AssertionError, match=r"7\.0 \(sm_70\) is not in torch.cuda.get_arch_list\(\)"):
        g.check_arch(V100, CUDA13_ARCHS)
    assert g.check_arch(V100, ["sm_70", *CUDA13_ARCHS]) == "sm_70 in arch list"
    assert "PTX JIT" in g.check_arch((10, 3), ["sm_90", "compute_90"])
    with pytest.raises(AssertionError):
        g.check_arch((8, 9), ["sm_90", "compute_90"])  # PTX for a newer GPU cannot run on an older one


def test_g2_a_gpu_run_on_gloo_and_a_vote_that_skips_its_collective_fail():
    with pytest.raises(AssertionError, match="collectives ran on gloo, not nccl"):
        g.expect_backend("cuda", "gloo")
    g.expect_backend("cuda", "nccl")
    with pytest.raises(AssertionError, match="never launched its collective"):
        g.judge_stop_vote(2, 2, collective=False, line="")
    with pytest.raises(AssertionError, match="agreed at step 2, expected 3"):
        g.judge_stop_vote(2, 2, collective=True, line="")
    with pytest.raises(AssertionError, match="float64 CPU reference"):
        g.judge_estimator(True, 1e-6, "")


def test_g3_a_gpu_resume_difference_passes_only_explained_and_small():
    ops = ["upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation"]
    assert g.judge_resume("cpu", 0.0, 1.0, [], "") == "bitwise"
    with pytest.raises(AssertionError, match="CPU resume is not bitwise"):
        g.judge_resume("cpu", 1e-9, 1.0, ops, "")
    with pytest.raises(AssertionError, match="unexplained"):
        g.judge_resume("cuda", 1e-6, 1.0, [], "")
    with pytest.raises(AssertionError, match="more than 0.001 of the weights' scale"):
        g.judge_resume("cuda", 0.01, 1.0, ops, "")
    assert "upsample_bilinear2d_backward" in g.judge_resume("cuda", 1e-6, 1.0, ops, "")


def test_g4_bf16_slower_than_fp32_or_a_loss_off_by_more_than_the_tolerance_fails():
    assert "rel_diff" in g.judge_amp((100.0, 2.0), (60.0, 2.01), assert_speed=True)
    with pytest.raises(AssertionError, match="not faster than fp32"):
        g.judge_amp((100.0, 2.0), (100.0, 2.0), assert_speed=True)
    with pytest.raises(AssertionError, match="more than 0.02"):
        g.judge_amp((100.0, 2.0), (60.0, 2.1), assert_speed=True)
    with pytest.raises(AssertionError, match="more than 0.02"):
        g.judge_amp((100.0, 2.0), (60.0, float("nan")), assert_speed=False)  # a NaN loss never passes


def test_g5_labels_or_images_outside_the_bounds_fail():
    assert "png/eval" in g.judge_images("png", "eval", 1.0, 0.2, 3)
    with pytest.raises(AssertionError):
        g.judge_images("png", "train", 0.99, 0.0, 0)
    with pytest.raises(AssertionError):
        g.judge_images("png", "eval", 1.0, 0.6, 3)  # within JPEG's bound, not PNG's
    assert g.judge_images("jpeg", "eval", 1.0, 0.6, 3)


def test_g6_the_child_environment_has_no_rank_variables():
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29512", "TORCHELASTIC_RUN_ID": "x", "PATH": "/bin"}
    assert g.clean_child_env(env) == {"PATH": "/bin"}


# ------------------------------------------------------------------ the items with their CPU path broken
MUTANTS = r"""
import sys
from unittest import mock
sys.argv = ["gpu_check"]
sys.path.insert(0, "tests/gpu")
import gpu_check as g
import sdca_dist.engine.training as training
from sdca_dist.engine.distributed import StopVote, init_distributed

run = g._Run(smoke=True)
run.ctx = init_distributed("auto")
v100 = {"capability": (7, 0), "arch_list": ["sm_75", "sm_80", "sm_90", "sm_120"], "name": "Tesla V100",
        "mem_gib": 32.0, "gpus": 1, "cudnn": 91000, "nccl": "2.27.3"}
orig_loader = g._g5_loader
mutants = {
    "M_g0_cuda13_on_v100": (g.g0_environment, mock.patch.object(g, "gpu_facts", lambda: v100)),
    "M_g2_vote_without_collective": (g.g2_collectives, mock.patch.object(StopVote, "vote", lambda self, r: r)),
    "M_g3_rng_not_restored": (g.g3_resume, mock.patch.object(training, "set_rng_state", lambda state: None)),
    "M_g4_zero_tolerance": (g.g4_step, mock.patch.object(g, "AMP_LOSS_TOLERANCE", 0.0)),
    "M_g5_graphs_seeded_apart": (g.g5_dali, mock.patch.object(
        g, "_g5_loader", lambda m, d, t, c, second=False: orig_loader(m, d, t, c, second, seed=4 if second else 3))),
    "M_g6_rank_variables_leaked": (g.g6_chain, mock.patch.object(g, "clean_child_env", lambda env: dict(env))),
}
for name, (item, patch) in mutants.items():
    with patch:
        status, figures = g.run_item(item, run)
    print(f"{name} {status} {figures}", flush=True)
"""


@pytest.mark.timeout(900)
def test_each_item_fails_when_what_it_checks_is_broken():
    r = subprocess.run(
        [sys.executable, "-c", MUTANTS], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = _lines(r.stdout)
    expect = {
        "M_g0_cuda13_on_v100": "sm_70) is not in torch.cuda.get_arch_list()",
        "M_g2_vote_without_collective": "never launched its collective",
        "M_g3_rng_not_restored": "CPU resume is not bitwise",
        "M_g4_zero_tolerance": "bf16 loss differs from fp32 by more than 0",
        "M_g5_graphs_seeded_apart": "the two graphs disagree: jpeg/train",
        "M_g6_rank_variables_leaked": "stage src exit",
    }
    assert sorted(got) == sorted(expect), r.stdout + r.stderr[-2000:]
    for name, message in expect.items():
        status, figures = got[name]
        assert status == "FAIL" and message in figures, f"{name}: {status} {figures}"
