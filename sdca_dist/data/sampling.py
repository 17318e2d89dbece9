"""Randomness of the data path as pure functions of (seed, rank, batch number): exact resume.

Augmentation parameters are drawn here in NumPy and fed to DALI (external_source), so a loader
restored at batch g draws exactly what the uninterrupted one drew. Sample order is a pure function
of the seed too (a full permutation per epoch, or the class-balanced draw sequence), so a loader's
position is its batch count (plus a small sampler snapshot that saves regenerating draws).
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


#: draws between two resets of the class counts (the reference's SUB_EPOCH_SIZE)
SUB_EPOCH = 3000


class ClassBalancedSampler:
    """The reference's class-balanced source sampling (BIT-DA/SDCA core/datasets/gtav.py), exactly resumable.

    The rule, as the reference applies it: draw class k with weight ``1 / log(1.01 + f_k)`` (only
    classes present in some image), take the next image of k's list, then add 1 to the count of
    EVERY class present in that image (per-image presence: any pixel); ``f = counts / counts.sum()``
    (all zero at first: uniform). The counts reset every ``SUB_EPOCH`` (3,000) draws. Each class's
    list is walked in manifest order, then in a fresh permutation each time it is exhausted; the
    walk positions carry over the resets. The reference builds the whole draw list up front and the
    PyTorch DataLoader then shuffles it; here each 3,000-draw block is permuted instead, which gives
    every position the same marginal distribution without knowing the run length.

    Multiple ranks: ONE global sequence per seed. Global draw ``d`` is the same on every rank and
    for every world size; the loader gives rank r of W, batch g (local batch B) the draws
    ``g*B*W + r*B + [0, B)``. So the same global batch on any number of ranks draws the same images,
    and the counts are those of the global draw stream (the reference instead builds one list per
    process with its own randomness and lets DistributedSampler split each; per rank the
    statistics are the same).

    Everything is a pure function of (seed, draw number): block b's draws depend only on the walk
    state at its start, which ``walk_at`` caches (a few ints per class), so resuming needs at most
    the regeneration of one block.
    """

    def __init__(self, presence: list[list[int]], num_classes: int, seed: int, block: int = SUB_EPOCH):
        self.num_classes, self.seed, self.block = num_classes, int(seed) & 0xFFFFFFFF, int(block)
        n = len(presence)
        self.present = np.zeros((n, num_classes), dtype=np.int64)
        for idx, classes in enumerate(presence):
            for c in classes:
                if 0 <= c < num_classes:
                    self.present[idx, c] = 1
        self.images_of = [np.flatnonzero(self.present[:, c]) for c in range(num_classes)]
        self.available = np.array([len(v) > 0 for v in self.images_of])
        if not self.available.any():
            raise ValueError("class-balanced sampling needs per-image class presence; the manifest has none")
        #: block -> walk state at its start: per class (cycle, position in that cycle's order)
        self.walk_at: dict[int, tuple[tuple[int, int], ...]] = {0: tuple((0, 0) for _ in range(num_classes))}
        self._blocks: dict[int, np.ndarray] = {}
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @staticmethod
    def weights(counts: np.ndarray, available: np.ndarray) -> np.ndarray:
        """Class probabilities for the next draw from the counts since the last reset."""
        total = counts.sum()
        freq = counts / total if total else np.zeros(len(counts))
        w = 1.0 / np.log(1.01 + freq)
        w[~available] = 0.0
        return w / w.sum()

    def _order(self, k: int, cycle: int) -> np.ndarray:
        """Class k's image list in walk ``cycle``: manifest order first, then fresh permutations."""
        key = (k, cycle)
        if key not in self._orders:
            imgs = self.images_of[k]
            order = imgs if cycle == 0 else np.random.default_rng([self.seed, 3, k, cycle]).permutation(imgs)
            self._orders = {kk: v for kk, v in self._orders.items() if kk[0] != k}  # one cycle per class
            self._orders[key] = order
        return self._orders[key]

    def _generate(self, b: int) -> np.ndarray:
        walk = [list(x) for x in self.walk_state(b)]
        rng = np.random.default_rng([self.seed, 1, b])
        u = rng.random(self.block)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        out = np.empty(self.block, dtype=np.int64)
        for i in range(self.block):
            cdf = np.cumsum(self.weights(counts, self.available))
            k = min(int(np.searchsorted(cdf, u[i] * cdf[-1], side="right")), self.num_classes - 1)
            while not self.available[k]:  # u at a boundary of a zero-weight class: take the next one
                k -= 1
            cycle, pos = walk[k]
            order = self._order(k, cycle)
            idx = int(order[pos])
            walk[k] = [cycle + 1, 0] if pos + 1 == len(order) else [cycle, pos + 1]
            out[i] = idx
            counts += self.present[idx]
        self.walk_at[b + 1] = tuple((c, p) for c, p in walk)
        return out[rng.permutation(self.block)]

    def walk_state(self, b: int) -> tuple[tuple[int, int], ...]:
        """Walk state at the start of block b (generating the blocks before it if needed)."""
        while b not in self.walk_at:
            known = max(k for k in self.walk_at if k < b)
            self.block_draws(known)
        return self.walk_at[b]

    def block_draws(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            self._blocks[b] = self._generate(b)
            for old in [k for k in self._blocks if k < b - 1]:
                del self._blocks[old]
        return self._blocks[b]

    def draws(self, start: int, stop: int) -> np.ndarray:
        """Manifest indices of global draws ``[start, stop)``."""
        out = []
        d = start
        while d < stop:
            b, off = divmod(d, self.block)
            take = min(stop - d, self.block - off)
            out.append(self.block_draws(b)[off : off + take])
            d += take
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def state(self, draw: int) -> dict:
        """What restores the sampler for draws from ``draw`` on without regenerating earlier blocks."""
        b = draw // self.block
        return {"block": b, "walk": [list(x) for x in self.walk_state(b)]}

    def load_state(self, d: dict) -> None:
        walk = tuple((int(c), int(p)) for c, p in d["walk"])
        if len(walk) != self.num_classes:
            raise ValueError(f"sampler state has {len(walk)} classes, this manifest {self.num_classes}")
        self.walk_at[int(d["block"])] = walk


#: the command line's largest --draws: a key per line, 100 million lines (about 1.5 GB), takes
#: minutes; the sampler itself has no limit
MAX_CLI_DRAWS = 100_000_000


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Training order of epoch ``epoch``: a full permutation of all n samples, the same on every rank.

    Rank r then takes positions ``shard_bounds(n, W, r)`` of it (every sample once per epoch over
    the ranks). A full shuffle like the reference's DataLoader/DistributedSampler, whatever the
    number of ranks (a reader's shuffle buffer mixes only ~1,000 neighbouring samples).
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 2, epoch]).permutation(n)


def shard_bounds(n: int, num_shards: int, shard: int) -> tuple[int, int]:
    """DALI readers' split of n samples into shards: [n*s//S, n*(s+1)//S)."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """With pad_last_batch every DALI shard is padded to ceil(n/S) samples, then to whole batches."""
    return math.ceil(math.ceil(n / world_size) / batch_size)


def main(argv: list[str] | None = None) -> int:
    """``python -m sdca_dist.data.sampling MANIFEST --draws N --seed S``: the sampler's first N keys.

    Rank 0 of 1 (global draws 0..N-1), one sample key per line; ``--summary`` prints instead, per
    class, the share of draws whose image contains it. Bad input: one line, exit 2.
    """
    import sys

    from sdca_dist.arguments import int_at_least, int_between, parser
    from sdca_dist.data.errors import DataError
    from sdca_dist.data.shard_set import load_manifest

    ap = parser("python -m sdca_dist.data.sampling", main.__doc__.split("\n")[0])
    ap.add_argument("manifest", help="manifest.json of a shard set, or its folder")
    ap.add_argument(
        "--draws", type=int_between(1, MAX_CLI_DRAWS), required=True, help=f"number of draws (1 to {MAX_CLI_DRAWS:,})"
    )
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--summary", action="store_true", help="per-class share of draws instead of keys")
    a = ap.parse_args(argv)
    try:
        m = load_manifest(a.manifest)
        sampler = ClassBalancedSampler(m.presence(), m.num_classes, a.seed)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = np.zeros(m.num_classes, dtype=np.int64)
    chunk = 100 * sampler.block  # streamed: memory stays bounded and keys appear as they are drawn
    try:
        for start in range(0, a.draws, chunk):
            idx = sampler.draws(start, min(a.draws, start + chunk))
            if a.summary:
                counts += sampler.present[idx].sum(axis=0, dtype=np.int64)
            else:
                sys.stdout.write("".join(m.samples[int(i)]["key"] + "\n" for i in idx))
        if a.summary:
            for c in range(m.num_classes):
                print(f"{c}\t{counts[c] / a.draws:.4f}")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. | head
        sys.stdout = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
