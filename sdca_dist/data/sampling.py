"""Randomness of the data path as pure functions of (seed, rank, batch number): exact resume.

Augmentation parameters are drawn here in NumPy and fed to DALI (external_source), so a loader
restored at batch g draws exactly what the uninterrupted one drew. The class-balanced sampler's
only state is its per-class draw counts, snapshotted per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# the method's source colour augmentation: ColorJitter(0.5, 0.5, 0.5, 0.2) always, grayscale p=0.2,
# 3x3 Gaussian blur with sigma in torchvision's default range
JITTER = (0.5, 0.5, 0.5, 0.2)
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)


@dataclass(frozen=True)
class AugmentSpec:
    scale_range: tuple[float, float] | None = None
    flip: bool = False
    photometric: bool = False


def batch_rng(seed: int, rank: int, batch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, rank, batch, stream])


def augment_params(spec: AugmentSpec, seed: int, rank: int, batch: int, n: int) -> dict[str, np.ndarray]:
    """Per-sample parameters of batch ``batch`` (float32/int32 arrays of length n)."""
    rng = batch_rng(seed, rank, batch, 0)
    u = rng.random((n, 10), dtype=np.float64)  # fixed draw layout: every knob has its own column
    lo, hi = spec.scale_range or (1.0, 1.0)
    b, c, s, h = JITTER
    p = {
        "scale": (lo + (hi - lo) * u[:, 0]).astype(np.float32),
        "crop_x": u[:, 1].astype(np.float32),
        "crop_y": u[:, 2].astype(np.float32),
        "flip": ((u[:, 3] < 0.5) & spec.flip).astype(np.int32),
    }
    if spec.photometric:
        gray = u[:, 8] < GRAYSCALE_P
        p["brightness"] = (1 - b + 2 * b * u[:, 4]).astype(np.float32)
        p["contrast"] = (1 - c + 2 * c * u[:, 5]).astype(np.float32)
        p["saturation"] = np.where(gray, 0.0, 1 - s + 2 * s * u[:, 6]).astype(np.float32)
        p["hue"] = ((-h + 2 * h * u[:, 7]) * 360.0).astype(np.float32)  # DALI takes degrees
        p["sigma"] = (BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 9]).astype(np.float32)
    return p


class ClassBalancedSampler:
    """The reference's source sampling: class k with weight 1/log(1.01 + freq_k), then an image with k.

    freq_k is the share of draws so far that picked class k. Only classes present in some image
    are drawn. Draws for batch g use an RNG keyed by (seed, rank, g) and the counts before g.
    """

    def __init__(self, presence: list[list[int]], num_classes: int, seed: int, rank: int):
        self.num_classes = num_classes
        self.seed, self.rank = seed, rank
        by_class: list[list[int]] = [[] for _ in range(num_classes)]
        for idx, classes in enumerate(presence):
            for c in classes:
                if 0 <= c < num_classes:
                    by_class[c].append(idx)
        self.images_of = [np.asarray(v, dtype=np.int64) for v in by_class]
        self.available = np.array([len(v) > 0 for v in by_class])
        if not self.available.any():
            raise ValueError("class-balanced sampling needs per-image class presence; the manifest has none")
        self.counts = np.zeros(num_classes, dtype=np.int64)

    def weights(self) -> np.ndarray:
        total = self.counts.sum()
        freq = self.counts / total if total else np.zeros(self.num_classes)
        w = 1.0 / np.log(1.01 + freq)
        w[~self.available] = 0.0
        return w / w.sum()

    def draw_batch(self, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(manifest indices, drawn classes) of batch ``batch``; advances the counts."""
        rng = batch_rng(self.seed, self.rank, batch, 1)
        idx = np.empty(n, dtype=np.int64)
        cls = np.empty(n, dtype=np.int64)
        for i in range(n):
            k = int(rng.choice(self.num_classes, p=self.weights()))
            imgs = self.images_of[k]
            idx[i] = imgs[int(rng.integers(len(imgs)))]
            cls[i] = k
            self.counts[k] += 1
        return idx, cls


def shard_bounds(n: int, num_shards: int, shard: int) -> tuple[int, int]:
    """DALI readers' split of n samples into shards: [n*s//S, n*(s+1)//S)."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """With pad_last_batch every DALI shard is padded to ceil(n/S) samples, then to whole batches."""
    return math.ceil(math.ceil(n / world_size) / batch_size)
