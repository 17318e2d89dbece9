"""Pieces the training stages share: the segmentation loss, engine construction, the finish."""

from __future__ import annotations

import torch

from sdca_dist.engine.evaluation import evaluate
from sdca_dist.engine.model_engine import ModelEngine, build_engine
from sdca_dist.engine.stage_context import StageContext


def make_engine(
    sc: StageContext, model: torch.nn.Module, micro_steps: int, micro_batch: int, freeze_bn: bool
) -> ModelEngine:
    return build_engine(
        model,
        sc.ctx,
        sc.settings.engine,
        sc.settings.train,
        micro_steps=micro_steps,
        micro_batch=micro_batch,
        freeze_bn=freeze_bn,
    )


def finish_training(sc: StageContext, engine: ModelEngine, stats: dict, iters: int) -> dict:
    """model_final.pt, then mIoU on target val (metrics.json + per-class table).

    ``train.select=final``: the last iteration's weights, evaluated here. ``best_val``: the weights
    the selection kept (``sdca_dist.engine.selection``), already evaluated during training; their
    report becomes metrics.json, labelled ``selected`` (on the evaluation set) with the last
    iteration's mIoU beside it, and the summary (DONE) carries the same label."""
    from sdca_dist.engine.training import SELECTION_KEY

    stats = dict(stats)
    selection = stats.pop(SELECTION_KEY, None)
    engine.sync_buffers()  # the saved model and every rank's evaluation use the same statistics
    if selection is not None:
        return _finish_selected(sc, selection, stats, iters)
    path = sc.save_model_final(engine.final_state())
    summary = {"model_final": str(path), **stats}
    if sc.cfg.train.eval_at_end:
        report = evaluate(sc, engine.module, tag=sc.name, iteration=iters)
        sc.write_metrics(report, {"stage": sc.name, "iters": iters, **stats})
        if sc.ctx.is_main:
            sc.observer.log("per-class IoU:\n" + report["table"])
        summary["mIoU"] = report["mIoU"]
    return summary


def _finish_selected(sc: StageContext, selection, stats: dict, iters: int) -> dict:
    """best_val: the kept weights as model_final.pt (rank 0 holds them), their report as metrics."""
    if selection.best_report is None:  # cannot happen: the last iteration is always evaluated
        raise RuntimeError(f"stage {sc.name}: train.select=best_val made no evaluation")
    label = selection.label()
    last = selection.history[-1]
    path = sc.save_model_final(selection.best_weights if sc.ctx.is_main else {})
    sc.write_metrics(
        selection.best_report, {"stage": sc.name, "iters": iters, "selected": label, "last": dict(last), **stats}
    )
    if sc.ctx.is_main:
        sc.observer.log(
            f"selected (best_val, on target val = the evaluation set): iteration {label['iteration']} "
            f"mIoU {label['mIoU']:.2f} (last iteration {last['iteration']}: {last['mIoU']:.2f}); "
            "per-class IoU:\n" + selection.best_report["table"]
        )
    return {"model_final": str(path), **stats, "mIoU": label["mIoU"], "selected": label}
