"""mIoU on the target val shards: every rank evaluates its share, one all-reduce of the confusion."""

from __future__ import annotations

import time

import torch

from sdca_dist.data.loader import own_size_rows
from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.method.segmentation_loss import upsample_logits


@torch.no_grad()
def evaluate(sc: StageContext, module: torch.nn.Module, tag: str = "eval", iteration: int = 0) -> dict:
    """Evaluate ``module`` (unwrapped) on target val; returns the report written to metrics.json."""
    from sdca_dist.method import ConfusionMatrix, miou_report

    cfg, ctx = sc.cfg, sc.ctx
    num_classes = cfg.data.num_classes
    loader = make_loader(
        cfg,
        ctx,
        manifest_path(shard_set(cfg, cfg.data.target_val)),
        cfg.train.eval_batch_size,
        train=False,
        resize=list(cfg.data.eval_resize),
        target_labels=True,
    )
    was_training = module.training
    module.eval()
    cm = ConfusionMatrix(num_classes, device=ctx.device)
    t0 = time.time()
    images = 0
    shown = False
    for batch in loader:
        image = batch["image"].to(ctx.device)
        label = batch["label"].to(ctx.device)
        valid = batch["valid"].to(ctx.device)
        dtype = next(module.parameters()).dtype
        _, logits = module(image.to(dtype))
        label = torch.where(valid[:, None, None], label, torch.full_like(label, 255))
        for rows, own in own_size_rows(label, batch.get("label_size")):
            up = upsample_logits(logits[rows].float(), tuple(own.shape[-2:]))
            pred = up.argmax(1)
            cm.update(pred, own)
            if not shown:
                sc.observer.images(iteration, f"{tag}/val", image[rows][0], own[0], pred[0])
                shown = True
        images += int(valid.sum())
    cm.all_reduce()
    from sdca_dist.classes import class_names

    report = miou_report(cm, num_classes)
    # strict JSON: a class with empty union (absent and never predicted) is null, not NaN
    report["per_class"] = {k: (None if v != v else v) for k, v in report["per_class"].items()}
    report["table"] = cm.table(class_names(num_classes))
    report["images_rank0"] = int(images)
    report["eval_seconds"] = round(time.time() - t0, 2)
    sc.observer.log(
        f"{tag}: mIoU {report['mIoU']:.2f}" + (f" (13-class {report['mIoU13']:.2f})" if "mIoU13" in report else "")
    )
    sc.observer.scalars(
        iteration,
        {"mIoU": report["mIoU"], **{f"IoU/{k}": v for k, v in report["per_class"].items() if v is not None}},
        prefix=f"{tag}/",
    )
    module.train(was_training)
    return report
