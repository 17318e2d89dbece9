"""``python -m sdca_dist.bench scale`` in smoke mode: real gloo ranks, real DALI loaders, a few steps.

No timing is asserted (the figures depend on the machine); the tests pin the output contract
(machine header, one row per variant, the last line) and that the 1-rank and 2-rank variants
trained on the same number of images, and that a dying rank ends the benchmark at once with one
line instead of leaving the survivor waiting in a collective.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\d+)\+(\d+)\s+([12])\s+(\d+)\s+[\d.]+\s+[\d.]+\s+(-|\d+%)\s")


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "sdca_dist.bench", "scale", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_output_and_equal_images():
    iters = 2
    proc = _bench("--iters", str(iters), "--warmup", "1", "--batches", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    # machine noise: every repeat's pair is shown, the median pair counts, and the ranks are bound
    assert "each rank bound to one core" in lines[1]
    each = [ln for ln in lines if "efficiency of each repeat" in ln]
    assert len(each) == 1 and re.fullmatch(
        r"2\+2, efficiency of each repeat: \d+% \d+%; median (\d+)% \(range \d+-\d+%\)", each[0]
    ), each
    assert re.search(r"median (\d+)%", each[0]).group(1) + "%" == lines[-1].split(": ")[1]
    assert lines[0].startswith("machine: ") and " cores " in lines[0] and "torch " in lines[0]
    assert "OMP_NUM_THREADS=1" in lines[1]
    assert re.fullmatch(r"scaling efficiency: \d+%", lines[-1]), lines[-1]
    images: dict[tuple[int, int], int] = {}
    for ln in lines:
        m = ROW.match(ln)
        if m:
            batch, world, n = int(m.group(1)), int(m.group(3)), int(m.group(4))
            assert (batch, world) not in images, f"row repeated: {ln}"
            images[(batch, world)] = n
            assert (m.group(5) == "-") == (world == 1), ln  # efficiency is a 2-rank figure
    assert set(images) == {(2, 1), (2, 2)}, proc.stdout
    # same global batch, same steps: both variants saw exactly the same number of images
    assert images[(2, 1)] == images[(2, 2)] == iters * 2 * 2


def test_a_dying_rank_fails_fast_with_one_line():
    """Rank 1 dies mid-run: the benchmark names it (its exit code) and ends; a survivor left
    waiting in a collective would instead end with the benchmark's own hang message
    ("ranks still running after ... (--timeout)") or not at all."""
    proc = _bench("--iters", "2", "--warmup", "1", "--batches", "2", "--repeats", "1", "--kill-rank", "1", timeout=120)
    assert proc.returncode == 1
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert err == [err[-1]] and re.fullmatch(r"error: rank 1 of 2 exited with code 3 \(global batch 2\+2\)", err[-1]), (
        proc.stderr
    )
    assert "scaling efficiency" not in proc.stdout and "still running" not in proc.stderr


def test_bad_arguments_are_one_line_exit_2():
    proc = _bench("--batches", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--batches" in proc.stderr
