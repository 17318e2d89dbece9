"""Checkpoint selection (``train.select``): which weights a training stage keeps as model_final.pt.

``final`` (the default) keeps the last iteration's weights: nothing here runs. ``best_val`` is
the reference code's protocol (it evaluates every 1,000 iterations on Cityscapes val and chains
``model_best.pth``): every ``select_every`` (scaled) iterations and at the last one, all ranks
evaluate on target val together; the weights with the highest mIoU (the earliest on a tie) are
kept and become model_final.pt, so the next stage chains them. The selection uses the
evaluation set itself, so the reported number is optimistic: every record of it says so
(``"selected": {"rule": "best_val", "iteration": N, "on": SELECTED_ON}``).

Contracts:
* evaluating leaves training untouched: the RNG states and every rank's own BN buffers are
  restored afterwards, so a best_val run's weights at each iteration equal a final run's;
* the best-so-far state (every evaluation, the best iteration, mIoU, report and weights) is
  checkpoint state (``state_dict``), so a resumed run selects exactly what an uninterrupted one
  does;
* ``<stage>/selection.json`` lists every evaluation as it happens (rank 0, atomic writes).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch

from sdca_dist.engine.checkpoint import atomic_write_text, rng_state, set_rng_state
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.run_folder import SELECTION as SELECTION_FILE

SELECTED_ON = "target val (the evaluation set)"


class BestValSelection:
    """The best_val rule's state for one training stage (checkpointed with the stage)."""

    def __init__(self, sc: StageContext, every: int, iters: int) -> None:
        self.sc = sc
        self.every = max(1, int(every))
        self.iters = int(iters)
        #: every evaluation so far: [{"iteration": N, "mIoU": x}, ...] in iteration order
        self.history: list[dict[str, Any]] = []
        self.best_iteration: Optional[int] = None
        self.best_miou: Optional[float] = None
        self.best_report: Optional[dict] = None
        #: rank 0 only (it alone writes model_final.pt): CPU copy of the best weights
        self.best_weights: Optional[dict[str, torch.Tensor]] = None

    # --- when -----------------------------------------------------------------------------------
    def due(self, done: int) -> bool:
        """Whether iteration ``done`` (1-based, completed) is evaluated; the same on every rank."""
        return done % self.every == 0 or done == self.iters

    # --- evaluate and keep ----------------------------------------------------------------------
    def evaluate(self, engine, iteration: int) -> dict:
        """Collective: every rank calls it at the same iteration. Scores the current weights on
        target val and keeps them if they beat the best so far; training state is left as it was."""
        from sdca_dist.engine.evaluation import evaluate

        sc = self.sc
        rng = rng_state()
        own_buffers = [b.detach().clone() for b in engine.module.buffers()]
        # the ranks evaluate (and rank 0 keeps) one model: rank 0's BN statistics, as the final
        # model and the checkpoints have them
        engine.sync_buffers()
        try:
            report = evaluate(sc, engine.module, tag=sc.name, iteration=iteration)
            miou = float(report["mIoU"])
            self.history.append({"iteration": int(iteration), "mIoU": miou})
            if self.best_miou is None or miou > self.best_miou:
                self.best_iteration, self.best_miou, self.best_report = int(iteration), miou, report
                # the published weights (bf16: the fp32 master); gathering that master is collective,
                # so under mixed precision every rank takes part and rank 0 keeps the result
                if sc.ctx.is_main or engine.dtype != torch.float32:
                    weights = engine.final_state()
                    if sc.ctx.is_main:
                        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        finally:
            with torch.no_grad():
                for buf, saved in zip(engine.module.buffers(), own_buffers):
                    buf.copy_(saved)
            set_rng_state(rng)
        sc.observer.scalars(iteration, {"best_mIoU": float(self.best_miou)}, prefix=f"{sc.name}/selection/")
        sc.observer.log(
            f"selection (best_val): iteration {iteration} mIoU {miou:.2f}; "
            f"best so far iteration {self.best_iteration} mIoU {self.best_miou:.2f}"
        )
        self.write()
        return report

    # --- records --------------------------------------------------------------------------------
    def label(self) -> dict[str, Any]:
        """The ``selected`` record carried by metrics.json, DONE and selection.json."""
        return {"rule": "best_val", "iteration": self.best_iteration, "on": SELECTED_ON, "mIoU": self.best_miou}

    def write(self) -> None:
        if not self.sc.ctx.is_main:
            return
        payload = {
            "rule": "best_val",
            "on": SELECTED_ON,
            "every": self.every,
            "iters": self.iters,
            "evaluations": self.history,
            "selected": self.label() if self.history else None,
        }
        atomic_write_text(self.sc.folder / SELECTION_FILE, json.dumps(payload, indent=1) + "\n")

    # --- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain types and tensors only (checkpoints are loaded with ``weights_only=True``)."""
        return {
            "history": [dict(h) for h in self.history],
            "best_iteration": self.best_iteration,
            "best_miou": self.best_miou,
            "best_report": self.best_report,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.best_iteration = state["best_iteration"]
        self.best_miou = state["best_miou"]
        self.best_report = state["best_report"]
        self.best_weights = state["best_weights"] if self.sc.ctx.is_main else None
        self.write()  # drop evaluations past the checkpoint that a killed run may have listed


def selection_for(sc: StageContext, schedule) -> Optional[BestValSelection]:
    """The stage's selection rule: None for ``train.select=final`` (nothing changes)."""
    if sc.cfg.train.select != "best_val":
        return None
    return BestValSelection(sc, schedule.select_every, schedule.iters)
