"""eval: mIoU on target val of an earlier stage's model_final.pt, or of a weights file
(``eval.model_from=src|sdca|ssl|oracle`` or ``eval.model_from=PATH.pt``, e.g. a converted
official checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from sdca_dist.engine.evaluation import evaluate
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.run_folder import METRICS
from sdca_dist.stage_table import MODEL_FINAL


def run(sc: StageContext) -> dict:
    source = sc.cfg.eval.model_from
    weights = sc.input_file(MODEL_FINAL) or Path(source)  # an earlier stage (stage_table.inputs_of), or a file
    model = sc.build_model(init_from=weights, freeze_bn=True)
    tag = f"eval_{Path(source).stem if source.endswith('.pt') else source}"
    report = evaluate(sc, model, tag=tag)
    extra = {"stage": sc.name, "model_from": source}
    if not source.endswith(".pt"):  # a model chosen on the evaluation set stays labelled as such
        scored = sc.run.stage(source) / METRICS
        selected = json.loads(scored.read_text()).get("selected") if scored.is_file() else None
        if selected:
            extra["selected"] = selected
    sc.write_metrics(report, extra)
    sc.observer.log("per-class IoU:\n" + report["table"])
    return {"mIoU": report["mIoU"], "model_from": source}
