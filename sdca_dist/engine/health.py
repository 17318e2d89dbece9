"""Training health: non-finite losses and out-of-range labels, caught without a host sync per step.

On a GPU, ``float(loss)`` every step stalls the host until the step's kernels have run, and a
label outside the class range reaches ``cross_entropy`` as a device-side assert that surfaces
later at an unrelated call. So each step only RECORDS, on the device: for every named term, the
first iteration at which it was non-finite, and for every loader, the first iteration at which a
label lay outside ``[0, num_classes)`` and was not ``ignore_index`` (such labels are set to
``ignore_index`` at once, so no kernel ever sees them). :meth:`TrainingHealth.check` reads the
record (one small copy, agreed over all ranks with one MIN all-reduce so every rank stops at the
same step boundary) and raises :class:`TrainingHealthError`, one line naming the stage, the
iteration and the term or loader. The training loop calls it at log steps and before every
checkpoint (the last iteration always writes one), and checks the weights themselves
(:meth:`TrainingHealth.check_weights`) before each: a stopped run never leaves non-finite
weights on disk.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

from sdca_dist.classes import IGNORE_INDEX
from sdca_dist.engine.distributed import DistContext

#: "never": larger than any iteration, so a MIN over ranks keeps the earliest real one
_NEVER = 2**62


class TrainingHealthError(RuntimeError):
    """Training produced a non-finite loss or met an out-of-range label (one line)."""


class TrainingHealth:
    def __init__(self, stage: str, ctx: DistContext, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.stage = stage
        self.ctx = ctx
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        #: name -> device scalar: the first iteration at which it went wrong (``_NEVER`` if none)
        self._first: dict[str, torch.Tensor] = {}

    def _record(self, name: str, bad: torch.Tensor, iteration: int) -> None:
        current = self._first.get(name)
        if current is None:
            current = torch.full((), _NEVER, dtype=torch.int64, device=self.ctx.device)
        self._first[name] = torch.where(bad & (current == _NEVER), iteration, current)

    def observe(self, iteration: int, terms: Mapping[str, object]) -> None:
        """Record which tensor ``terms`` (the step's losses) are non-finite at ``iteration``."""
        named = [(k, v) for k, v in terms.items() if isinstance(v, torch.Tensor)]
        if not named:
            return
        bad = ~torch.isfinite(torch.stack([v.detach().reshape(()).float() for _, v in named]))
        for i, (k, _) in enumerate(named):
            self._record(f"loss term {k!r}", bad[i], iteration)

    def labels(self, iteration: int, loader: str, label: torch.Tensor) -> torch.Tensor:
        """``label`` with out-of-range values set to ``ignore_index`` (in place); records them."""
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        label.masked_fill_(bad, self.ignore_index)
        name = f"labels of {loader!r} outside [0, {self.num_classes}) and not {self.ignore_index}"
        self._record(name, bad.any(), iteration)
        return label

    def check_weights(self, state: Mapping[str, torch.Tensor], iteration: int) -> None:
        """Raise if any floating tensor of ``state`` (a model's state_dict) is non-finite: a finite
        loss can still take a step to inf weights. One host read; called before weights are written
        (every rank holds the same weights, so every rank decides the same)."""
        names = [k for k, v in state.items() if v.is_floating_point() and v.numel()]
        if not names:
            return
        finite = torch.stack([torch.isfinite(state[k]).all() for k in names])
        if bool(finite.all()):
            return
        first = names[int((~finite).nonzero()[0])]
        raise TrainingHealthError(
            f"stage {self.stage}: non-finite weights ({first!r}) after iteration {iteration}; stopped without "
            "writing a checkpoint or model_final.pt from them (lower the learning rate or check the inputs)"
        )

    def check(self) -> None:
        """Raise :class:`TrainingHealthError` if any rank recorded a problem. Collective: every
        rank calls it at the same step boundary."""
        if not self._first:
            return
        names = list(self._first)
        first = torch.stack([self._first[n] for n in names])
        if self.ctx.distributed and self.ctx.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        problems = [(it, name) for it, name in zip(first.tolist(), names) if it != _NEVER]
        if problems:
            it, name = min(problems)
            if name.startswith("loss term"):
                what, hint = "non-finite " + name, "lower the learning rate or check the inputs"
            else:
                what, hint = name, "the shard set's labels do not match data.num_classes"
            raise TrainingHealthError(
                f"stage {self.stage}: {what} at iteration {it + 1}; stopped without writing a checkpoint "
                f"or model_final.pt from it ({hint})"
            )
