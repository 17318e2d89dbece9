"""The one seam between the method's tensor math and torch.distributed.

Everything in ``sdca_dist.method`` that must agree across ranks (semantic distributions,
threshold histograms, confusion matrices) takes an optional ``all_reduce`` callable that sums a
tensor in place over all ranks. Unit tests pass their own (or none); training code passes nothing
and gets :func:`default_all_reduce`, which is a SUM all-reduce on the default process group when
one is initialised and the identity otherwise, so the same code runs single-process.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

#: In-place SUM over all ranks of one tensor.
AllReduce = Callable[[torch.Tensor], None]


def default_all_reduce(tensor: torch.Tensor) -> None:
    """SUM-all-reduce ``tensor`` in place when a process group exists, else leave it as is.

    Looked up at call time (not at construction) so an estimator built before
    ``init_process_group`` still reduces once the group exists.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def resolve_all_reduce(all_reduce: AllReduce | None) -> AllReduce:
    """The callable to use: the injected one, or the process-group default."""
    return default_all_reduce if all_reduce is None else all_reduce
