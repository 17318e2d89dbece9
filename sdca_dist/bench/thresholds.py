"""``python -m sdca_dist.bench thresholds``: streaming class thresholds vs keep-all-maps-and-sort.

200 softmax maps of 19 x 512 x 1024 (Cityscapes pseudo-labelling resolution), smooth random
logits (bilinearly upsampled from 1/8 resolution, like a DeepLab output).

* reference: the reference code's approach, rewritten here: per image store the max-softmax and
  argmax maps in preallocated ``np.zeros((n_images, 512, 1024))`` arrays (float64, as it does:
  16 bytes per pixel, ~25 GB on the 2,975 Cityscapes train images), then per class select the
  pixels predicted as that class, ``np.sort`` them and take the middle element.
* ours: ``sdca_dist.method.ClassThresholds`` (per-class histograms, fixed C x bins counts).

Time: same process, same maps, summed over the stream (map generation excluded). Memory: peak
resident memory of each variant over the whole stream in a fresh subprocess, minus that of a
subprocess that only generates the maps (so both are charged only for what they keep and
compute). See ``estimator.peak_rss_delta_mb`` for the method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sdca_dist import arguments
from sdca_dist.bench.estimator import peak_rss_delta_mb
from sdca_dist.method import ClassThresholds

NUM_CLASSES, HEIGHT, WIDTH = 19, 512, 1024
MAX_IMAGES = 2975
CAP = 0.9


def probability_maps(n_images: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Deterministic stream of [1, C, H, W] softmax maps."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_images):
        logits = torch.randn(1, NUM_CLASSES, HEIGHT // 8, WIDTH // 8, generator=g).mul_(3.0)
        yield F.interpolate(logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=True).softmax(dim=1)


class ReferenceThresholds:
    """Keep every map (float64 arrays, as the reference), sort per class at the end."""

    def __init__(self, n_images: int) -> None:
        self.label = np.zeros((n_images, HEIGHT, WIDTH))
        self.prob = np.zeros((n_images, HEIGHT, WIDTH))
        self.index = 0

    def update(self, probs: torch.Tensor) -> None:
        conf, pred = probs.max(dim=1)
        for c, p in zip(conf.numpy(), pred.numpy()):
            self.label[self.index] = p
            self.prob[self.index] = c
            self.index += 1

    def compute(self, cap: float = CAP) -> np.ndarray:
        out = []
        for k in range(NUM_CLASSES):
            x = self.prob[self.label == k]
            if len(x) == 0:
                out.append(0.0)
                continue
            x = np.sort(x)
            out.append(x[min(int(np.round(len(x) * 0.5)), len(x) - 1)])
        return np.minimum(np.array(out), cap)


def _make(variant: str, n_images: int):
    return ClassThresholds(NUM_CLASSES) if variant == "ours" else ReferenceThresholds(n_images)


def _consume(variants: list[str], n_images: int) -> dict[str, tuple[np.ndarray, float]]:
    """Feed each map of ONE stream to every variant; per variant (thresholds, seconds spent in it)."""
    ests = {v: _make(v, n_images) for v in variants}
    spent = dict.fromkeys(variants, 0.0)
    for probs in probability_maps(n_images):
        for v, est in ests.items():
            t0 = time.perf_counter()
            est.update(probs)
            spent[v] += time.perf_counter() - t0
    out = {}
    for v, est in ests.items():
        t0 = time.perf_counter()
        th = est.compute(cap=CAP)
        spent[v] += time.perf_counter() - t0
        out[v] = (np.asarray(th, dtype=np.float64), spent[v])
    return out


def _progress(message: str) -> None:
    print(f"[thresholds] {message}", file=sys.stderr, flush=True)


def _memory_in_subprocess(variant: str, n_images: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "sdca_dist.bench", "thresholds", "--images", str(n_images), "--memory-probe", variant],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def main(argv: list[str]) -> int:
    parser = arguments.parser(
        "python -m sdca_dist.bench thresholds", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # at most the Cityscapes train set: the reference then keeps ~25 GB (16 bytes per pixel)
    parser.add_argument("--images", type=arguments.int_between(1, MAX_IMAGES), default=200)
    parser.add_argument("--memory-probe", choices=("null", "ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n = args.images

    if args.memory_probe:
        variants = [] if args.memory_probe == "null" else [args.memory_probe]
        print(json.dumps({"peak_mb": peak_rss_delta_mb(lambda: _consume(variants, n))}))
        return 0

    print(f"class thresholds over {n} maps of {NUM_CLASSES}x{HEIGHT}x{WIDTH}, torch threads={torch.get_num_threads()}")
    _progress(f"timing ours and the reference on one stream of {n} maps (~{n * 0.15:.0f} s)")
    results = _consume(["ours", "reference"], n)
    (th_ours, t_ours), (th_ref, t_ref) = results["ours"], results["reference"]
    diff = float(np.abs(th_ours - th_ref).max())
    print(
        f"  max |ours - reference| threshold: {diff:.2e} (reference = upper middle element; "
        f"ours = histogram median, <= {0.5 / 2000:.1e} from numpy's median)"
    )
    print(f"  time  ours {t_ours:8.2f} s   reference {t_ref:8.2f} s (map generation excluded)")
    _progress("peak memory: generate-only, ours, reference, each in a fresh subprocess (~1 min)")
    base = _memory_in_subprocess("null", n)
    m_ours = _memory_in_subprocess("ours", n) - base
    m_ref = _memory_in_subprocess("reference", n) - base
    print(
        f"  extra peak RSS  ours {m_ours:9.1f} MB   reference {m_ref:9.1f} MB "
        f"(fresh subprocess each, minus {base:.1f} MB of a generate-only run)"
    )
    print(f"speedup: {t_ref / t_ours:.1f}x")
    print(f"memory ratio: {max(m_ours, 0.0) / m_ref:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
