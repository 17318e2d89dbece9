"""Pieces the training stages share: the segmentation loss, engine construction, the finish."""

from __future__ import annotations

import torch

from sdca_dist.engine.evaluation import evaluate
from sdca_dist.engine.model_engine import ModelEngine, build_engine
from sdca_dist.engine.stage_context import StageContext


def make_engine(sc: StageContext, model: torch.nn.Module, micro_steps: int, micro_batch: int,
                freeze_bn: bool) -> ModelEngine:
    return build_engine(model, sc.ctx, sc.settings.engine, sc.settings.train, micro_steps=micro_steps,
                        micro_batch=micro_batch, freeze_bn=freeze_bn)


def finish_training(sc: StageContext, engine: ModelEngine, stats: dict, iters: int) -> dict:
    """model_final.pt, then mIoU on target val (metrics.json + per-class table)."""
    engine.sync_buffers()  # the saved model and every rank's evaluation use the same statistics
    path = sc.save_model_final(engine.model_state())
    summary = {"model_final": str(path), **stats}
    if sc.cfg.train.eval_at_end:
        report = evaluate(sc, engine.module, tag=sc.name, iteration=iters)
        sc.write_metrics(report, {"stage": sc.name, "iters": iters, **stats})
        if sc.ctx.is_main:
            sc.observer.log("per-class IoU:\n" + report["table"])
        summary["mIoU"] = report["mIoU"]
    return summary
