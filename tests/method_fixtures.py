"""Shared helpers for the method tests: float64 references and a real multi-process gloo runner."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

IGNORE = 255


def reference_running_merge(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/method.md's running merge, literally, in float64 with two-pass batch statistics."""
    dim = batches[0][0].shape[1]
    count = torch.zeros(num_classes, dtype=torch.float64)
    mean = torch.zeros(num_classes, dim, dtype=torch.float64)
    var = torch.zeros(num_classes, dim, dtype=torch.float64)
    for feats, labels in batches:
        x = feats.double()
        for k in range(num_classes):
            sel = x[labels == k]
            n_b = sel.shape[0]
            if n_b == 0:
                continue
            m_b = sel.mean(0)
            v_b = ((sel - m_b) ** 2).mean(0)
            w = n_b / (n_b + count[k])
            var[k] = (1 - w) * var[k] + w * v_b + w * (1 - w) * (mean[k] - m_b) ** 2
            mean[k] = (1 - w) * mean[k] + w * m_b
            count[k] += n_b
    return count, mean, var


def pooled_statistics(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean, biased variance per class of all pixels at once (float64, two-pass)."""
    x = feats.double()
    dim = x.shape[1]
    count = torch.zeros(num_classes, dtype=torch.float64)
    mean = torch.zeros(num_classes, dim, dtype=torch.float64)
    var = torch.zeros(num_classes, dim, dtype=torch.float64)
    for k in range(num_classes):
        sel = x[labels == k]
        if sel.shape[0]:
            count[k] = sel.shape[0]
            mean[k] = sel.mean(0)
            var[k] = ((sel - mean[k]) ** 2).mean(0)
    return count, mean, var


def random_batches(
    seed: int,
    num_batches: int,
    num_classes: int,
    dim: int,
    max_pixels: int = 60,
    offset: float = 0.0,
    scale: float = 1.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float32 pixel batches with class-dependent means, 20% ignored pixels, some batches where a
    class is absent, one all-ignored batch and one empty batch."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3.0 + offset
    out = []
    for b in range(num_batches):
        n = int(torch.randint(0, max_pixels + 1, (), generator=g))
        if b == 2:
            n = 0
        allowed = torch.randperm(num_classes, generator=g)[: max(1, num_classes - 2)]  # some classes absent
        labels = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
        labels[torch.rand(n, generator=g) < 0.2] = IGNORE
        if b == 4:
            labels[:] = IGNORE
        safe = labels.clamp(max=num_classes - 1)
        feats = (centres[safe] + scale * torch.randn(n, dim, generator=g)).float()
        out.append((feats, labels))
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, init_method: str, fn: Callable, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        tmp = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` real spawned processes joined by a gloo group
    (TCP on 127.0.0.1, free port); returns each rank's return value (via torch.save)."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        mp.spawn(_entry, args=(world, init_method, fn, out_dir, args), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


#: Uneven split points so ranks see different amounts (small batches give some ranks nothing).
_SPLITS = {1: [0.0, 1.0], 2: [0.0, 0.3, 1.0], 3: [0.0, 0.15, 0.55, 1.0]}


def shard(global_batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous, uneven slice of a global batch."""
    feats, labels = global_batch
    n = feats.shape[0]
    fractions = _SPLITS.get(world) or [r / world for r in range(world + 1)]
    lo, hi = int(round(n * fractions[rank])), int(round(n * fractions[rank + 1]))
    return feats[lo:hi], labels[lo:hi]
