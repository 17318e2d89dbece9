"""eval: mIoU on target val of an earlier stage's model_final.pt (``eval.model_from``)."""

from __future__ import annotations

from sdca_dist.engine.evaluation import evaluate
from sdca_dist.engine.stage_context import StageContext


def run(sc: StageContext) -> dict:
    source = str(sc.cfg.eval.model_from)
    model = sc.build_model(init_from=sc.run.model_of(source), freeze_bn=True)
    report = evaluate(sc, model, tag=f"eval_{source}")
    sc.write_metrics(report, {"stage": "eval", "model_from": source})
    sc.observer.log("per-class IoU:\n" + report["table"])
    return {"mIoU": report["mIoU"], "model_from": source}
