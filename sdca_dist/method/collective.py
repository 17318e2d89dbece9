"""The one seam between the method's tensor math and torch.distributed.

Everything in ``sdca_dist.method`` that must agree across ranks (semantic distributions,
threshold histograms, confusion matrices) takes an optional ``all_reduce`` callable that sums a
tensor in place over all ranks. Unit tests pass their own (or none); training code passes nothing
and gets :func:`default_all_reduce`, which is a SUM all-reduce on the default process group when
one is initialised and the identity otherwise, so the same code runs single-process.

:func:`start_all_reduce` is the same sum, launched without waiting where the seam allows it (the
process-group default, or an injected object with a ``start(tensor)`` method): the caller does
other work while the collective is in flight and calls ``wait()`` before reading the tensor. The
sdca step hides its estimator all-reduce behind the segmentation loss this way; an injected plain
callable simply runs at once.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.distributed as dist

#: In-place SUM over all ranks of one tensor.
AllReduce = Callable[[torch.Tensor], None]


def _in_group() -> bool:
    """A process group of more than one rank exists (looked up at call time)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_all_reduce(tensor: torch.Tensor) -> None:
    """SUM-all-reduce ``tensor`` in place when a process group exists, else leave it as is.

    Looked up at call time (not at construction) so an estimator built before
    ``init_process_group`` still reduces once the group exists.
    """
    if _in_group():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


class Pending(Protocol):
    """An all-reduce in flight: ``wait()`` returns once the tensor holds the sum."""

    def wait(self) -> object: ...


class _Done:
    """A collective that already finished (single process, or a synchronous seam)."""

    def wait(self) -> None:
        return None


def start_all_reduce(all_reduce: AllReduce | None, tensor: torch.Tensor) -> Pending:
    """Launch the SUM all-reduce of ``tensor`` in place; ``wait()`` before reading ``tensor``.

    ``None`` (the process-group default) launches an asynchronous collective when a group of more
    than one rank exists; an injected seam with a ``start(tensor)`` method is asked to start it;
    any other callable runs synchronously. Every rank must start the same collectives in the same
    order, as with the synchronous seam.
    """
    if all_reduce is None:
        if _in_group():
            return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        return _Done()
    start = getattr(all_reduce, "start", None)
    if callable(start):
        return start(tensor)
    all_reduce(tensor)
    return _Done()


def resolve_all_reduce(all_reduce: AllReduce | None) -> AllReduce:
    """The callable to use: the injected one, or the process-group default."""
    return default_all_reduce if all_reduce is None else all_reduce
