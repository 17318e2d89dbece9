"""``python -m sdca_dist.bench estimator``: our semantic-distribution update vs the reference's.

Scale of one ResNet-101 SDCA step on one GPU: N = 14,400 pixels (one 1280x720 source image at
output stride 8 = 160 x 90), C = 19 classes, feature level A = 2048 and output
level A = 19, 10% ignored pixels. Both variants update both levels from the same warm state.

* reference: the formulation of the SDCA reference code, rewritten here: drop ignored pixels,
  expand features and a one-hot to N x C x A, take masked sums/means and the squared deviations in
  that expanded space, then the running merge. float32, as the reference runs.
* ours: ``sdca_dist.method.update_distributions`` (chunked float64 moments, no N x C x A).

Time: same process, same inputs, median of several repetitions (fewer for the slow reference).
Memory: the extra peak resident memory of ONE update beyond inputs and state, measured in a fresh
subprocess per variant (so allocator caches of one cannot hide the other's peak): the kernel's
high-water mark (VmHWM) is reset through /proc/self/clear_refs right before the update and read
right after, minus the resident size before. torch CPU tensors are plain malloc'd memory, so
this sees all of them (tracemalloc would not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from sdca_dist import arguments
from sdca_dist.method import SemanticDistribution, update_distributions

N_PIXELS, NUM_CLASSES, FEAT_DIM = 14_400, 19, 2048
IGNORE = 255


# --------------------------------------------------------------------------------------------
# peak resident memory of a callable (Linux /proc)
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_delta_mb(fn: Callable[[], object]) -> float:
    """Extra peak resident memory (MB) while ``fn`` runs, over the resident size before it."""
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current VmRSS
        fh.write("5")
    before = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - before) / 1024.0


# --------------------------------------------------------------------------------------------
class ReferenceEstimator:
    """The reference's estimator update, N x C x A formulation (float32), for comparison only."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.count = torch.zeros(num_classes)
        self.mean = torch.zeros(num_classes, dim)
        self.var = torch.zeros(num_classes, dim)

    def update(self, features: Tensor, labels: Tensor) -> None:
        keep = labels != IGNORE
        labels, features = labels[keep], features[keep]
        n, a = features.shape
        c = self.count.shape[0]
        feats_nca = features.view(n, 1, a).expand(n, c, a)
        onehot = torch.zeros(n, c).scatter_(1, labels.view(-1, 1), 1)
        onehot_nca = onehot.view(n, c, 1).expand(n, c, a)
        by_class = feats_nca.mul(onehot_nca)  # N x C x A
        amount = onehot_nca.sum(0)
        amount[amount == 0] = 1
        batch_mean = by_class.sum(0) / amount
        dev = by_class - batch_mean.expand(n, c, a).mul(onehot_nca)  # N x C x A (two of them live)
        batch_var = dev.pow(2).sum(0).div(amount)
        n_b = onehot.sum(0).view(c, 1).expand(c, a)
        w = n_b.div(n_b + self.count.view(c, 1).expand(c, a))
        w[w != w] = 0
        extra = w.mul(1 - w).mul((self.mean - batch_mean).pow(2))
        self.var = self.var.mul(1 - w) + batch_var.mul(w) + extra
        self.mean = self.mean.mul(1 - w) + batch_mean.mul(w)
        self.count = self.count + onehot.sum(0)


# --------------------------------------------------------------------------------------------
def make_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Post-ReLU-like features, logits and labels, generated in place (no big temporaries)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.empty(N_PIXELS, FEAT_DIM).normal_(generator=g).abs_()
    logits = torch.empty(N_PIXELS, NUM_CLASSES).normal_(generator=g).mul_(4.0)
    labels = torch.randint(0, NUM_CLASSES, (N_PIXELS,), generator=g)
    labels[torch.rand(N_PIXELS, generator=g) < 0.1] = IGNORE
    return feats, logits, labels


def warm_state(dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A plausible running state (as after dist_init) without running an update."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(10_000, 100_000, (NUM_CLASSES,), generator=g)
    mean = torch.rand(NUM_CLASSES, dim, generator=g, dtype=torch.float64)
    var = torch.rand(NUM_CLASSES, dim, generator=g, dtype=torch.float64) + 0.1
    return count, mean, var


def build(variant: str):
    """Both levels of ``variant`` in the same warm state, and a function doing one step's update."""
    feats, logits, labels = make_inputs()
    if variant == "ours":
        levels = [SemanticDistribution(NUM_CLASSES, FEAT_DIM), SemanticDistribution(NUM_CLASSES, NUM_CLASSES)]
        for i, est in enumerate(levels):
            count, mean, var = warm_state(est.dim, seed=10 + i)
            est.load_state_dict({"count": count, "mean": mean, "var": var})

        def step() -> None:
            update_distributions([(levels[0], feats, labels), (levels[1], logits, labels)])
    elif variant == "reference":
        levels = [ReferenceEstimator(NUM_CLASSES, FEAT_DIM), ReferenceEstimator(NUM_CLASSES, NUM_CLASSES)]
        for i, est in enumerate(levels):
            count, mean, var = warm_state(est.mean.shape[1], seed=10 + i)
            est.count, est.mean, est.var = count.float(), mean.float(), var.float()

        def step() -> None:
            levels[0].update(feats, labels)
            levels[1].update(logits, labels)
    else:
        raise ValueError(f"unknown variant {variant!r} (ours|reference)")
    return levels, step


def _timed(step: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _progress(message: str) -> None:
    print(f"[estimator] {message}", file=sys.stderr, flush=True)


def _memory_in_subprocess(variant: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "sdca_dist.bench", "estimator", "--memory-probe", variant],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mb"])


def main(argv: list[str]) -> int:
    parser = arguments.parser(
        "python -m sdca_dist.bench estimator", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=arguments.int_between(1, 1000), default=5, help="timed repetitions of our update"
    )
    parser.add_argument(
        "--ref-reps", type=arguments.int_between(1, 1000), default=2, help="timed repetitions of the reference"
    )
    parser.add_argument("--memory-probe", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:  # child: one update, print the extra peak
        _, step = build(args.memory_probe)
        print(json.dumps({"extra_peak_mb": peak_rss_delta_mb(step)}))
        return 0

    print(
        f"estimator update, N={N_PIXELS} pixels, C={NUM_CLASSES}, levels A={FEAT_DIM} + A={NUM_CLASSES}, "
        f"torch threads={torch.get_num_threads()}"
    )
    _progress("building inputs and warm state (both variants)")
    ours, ours_step = build("ours")
    ref, ref_step = build("reference")
    ours_step()  # one update each from the same state: compare results (and warm up)
    t0 = time.perf_counter()
    ref_step()
    t_first = time.perf_counter() - t0
    for name, a, b in (("feature", ours[0], ref[0]), ("output", ours[1], ref[1])):
        dm = ((a.mean.float() - b.mean).abs().max() / b.mean.abs().max()).item()
        dv = ((a.var.float() - b.var).abs().max() / b.var.abs().max()).item()
        assert torch.equal(a.count, b.count.long()), f"{name} counts differ"
        print(f"  agreement after one update ({name} level): max rel diff mean {dm:.1e}, var {dv:.1e}")
    _progress(f"timing ours x{args.reps}, then the reference x{args.ref_reps} (~{t_first:.0f} s each)")
    t_ours = _timed(ours_step, args.reps)
    t_ref = _timed(ref_step, args.ref_reps)
    print(
        f"  time per update  ours {t_ours * 1e3:9.1f} ms   reference {t_ref * 1e3:9.1f} ms "
        f"(median of {args.reps} / {args.ref_reps})"
    )
    del ours, ref, ours_step, ref_step
    _progress("peak memory: one fresh subprocess per variant")
    m_ours = _memory_in_subprocess("ours")
    m_ref = _memory_in_subprocess("reference")
    print(
        f"  extra peak RSS   ours {m_ours:9.1f} MB   reference {m_ref:9.1f} MB "
        f"(fresh subprocess each, VmHWM over inputs+state)"
    )
    print(f"speedup: {t_ref / t_ours:.1f}x")
    print(f"memory ratio: {m_ours / m_ref:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
