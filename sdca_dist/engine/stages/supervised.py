"""Supervised training stages: src (source labels), oracle (target labels), ssl (pseudo labels).

They differ only in the shard set, the augmentation, the loss (ssl: CE only) and the BN mode
(ssl trains BN, converted to SyncBN across ranks); the loop is shared.
"""

from __future__ import annotations

from pathlib import Path

from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader, per_rank
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.engine.stages.common import finish_training, make_engine
from sdca_dist.engine.training import TrainingPlan, run_training
from sdca_dist.stage_table import MODEL_FINAL, PSEUDO_MANIFEST


def _run_supervised(
    sc: StageContext,
    manifest,
    *,
    init_from=None,
    freeze_bn: bool,
    lovasz_weight: float,
    resize,
    crop=None,
    scale=None,
    flip=False,
    photometric=False,
    class_balanced=False,
    target_labels=False,
    crop_policy: str = "pad",
) -> dict:
    sched = sc.schedule()
    batch = per_rank(sched.global_batch, sc.ctx, f"{sc.name}.batch_size")
    model = sc.build_model(init_from=init_from, freeze_bn=freeze_bn)
    if not freeze_bn and sc.ctx.world_size > 1 and sc.ctx.device.type == "cuda":
        model = model.to_sync_bn()  # SyncBN needs a GPU backend; on CPU each rank keeps its own BN stats
    engine = make_engine(sc, model, micro_steps=1, micro_batch=batch, freeze_bn=freeze_bn)
    loader = make_loader(
        sc.cfg,
        sc.ctx,
        manifest,
        batch,
        train=True,
        resize=resize,
        crop=crop,
        scale=scale,
        flip=flip,
        photometric=photometric,
        class_balanced=class_balanced,
        target_labels=target_labels,
        crop_policy=crop_policy,
    )

    from sdca_dist.method import segmentation_loss

    image_every = sched.image_every

    def step(engine, batches, it):
        b = batches["train"]
        with engine.micro_step(0):
            _, logits = engine(b["image"])
            loss = segmentation_loss(logits, b["label"], lovasz_weight)
            engine.backward(loss)
        if (it + 1) % image_every == 0:  # input, (pseudo) label and prediction, Cityscapes palette
            sc.observer.images(
                it + 1, f"{sc.name}/train", b["image"][0], b["label"][0], pred=logits[0].detach().argmax(0)
            )
        return {"loss": loss.detach()}  # read on the host at log steps only

    plan = TrainingPlan(schedule=sched, engine=engine, loaders={"train": loader}, step=step, images_per_step=batch)
    stats = run_training(sc, plan)
    return finish_training(sc, engine, stats, sched.iters)


def _freeze_bn_from_scratch(cfg) -> bool:
    """Frozen BN keeps the PRETRAINED statistics (the method's src stage). A randomly initialised
    backbone (``model.pretrained: null``, e.g. the synthetic preset) has none: frozen, its BN is the
    identity (mean 0, var 1), and ssl's unfrozen BN would then rescale every activation of a net
    trained without normalisation. So a from-scratch src/oracle learns its BN statistics; sdca and
    later stages freeze those as usual."""
    return cfg.model.get("pretrained") is not None


def run_src(sc: StageContext) -> dict:
    cfg = sc.cfg
    if cfg.init.src:
        return _import_src(sc, Path(cfg.init.src))
    return _run_supervised(
        sc,
        manifest_path(shard_set(cfg, cfg.data.source)),
        freeze_bn=_freeze_bn_from_scratch(cfg),
        lovasz_weight=cfg.method.lovasz_weight,
        resize=list(cfg.data.source_resize),
        class_balanced=cfg.data.class_balanced,
    )


def run_oracle(sc: StageContext) -> dict:
    """Reference upper bound: the same recipe on the target's own labels."""
    from sdca_dist.engine.data import require_labels

    cfg = sc.cfg
    manifest = manifest_path(shard_set(cfg, cfg.data.target_train))
    require_labels(manifest, "data.target_train", "the oracle trains on target labels (leave with_oracle off)")
    return _run_supervised(
        sc,
        manifest,
        freeze_bn=_freeze_bn_from_scratch(cfg),
        lovasz_weight=cfg.method.lovasz_weight,
        resize=list(cfg.data.target_resize),
        target_labels=True,
    )


def ssl_augmentation(cfg) -> dict:
    """ssl's image sizing, for ``make_loader``: a random zoom of ``data.ssl_scale`` times the
    EVALUATION size (``data.eval_resize``), then an ``ssl_crop`` crop that never pads.

    Zooming relative to the evaluation size rather than to the stored image makes the recipe the
    same for data stored at any resolution (``sdca_dist.image_scale``); on Cityscapes (stored
    2048x1024, evaluated 1024x512) [1.0, 3.0] of the evaluation size is the reference's [0.5, 1.5]
    of the stored image."""
    return dict(
        resize=list(cfg.data.eval_resize),
        crop=list(cfg.data.ssl_crop),
        scale=list(cfg.data.ssl_scale),
        flip=True,
        photometric=True,
        crop_policy="fit",
    )


def run_ssl(sc: StageContext) -> dict:
    """The published ssl recipe: ImageNet weights (``ssl.init=imagenet``) trained on the pseudo
    labels with a random zoom of the target image and a crop that never pads (``ssl_augmentation``)."""
    cfg = sc.cfg
    init_from = sc.input_file(MODEL_FINAL)  # none with ssl.init=imagenet (stage_table.inputs_of)
    return _run_supervised(
        sc,
        sc.required_input(PSEUDO_MANIFEST),
        init_from=init_from,
        freeze_bn=False,
        lovasz_weight=0.0,
        **ssl_augmentation(cfg),
    )


def _import_src(sc: StageContext, weights: Path) -> dict:
    """``init.src=PATH``: the chain starts from weights made elsewhere (an official checkpoint
    converted by ``python -m sdca_dist.models.convert``); src scores them instead of training."""
    from sdca_dist.engine.evaluation import evaluate

    model = sc.build_model(init_from=weights, freeze_bn=True)
    path = sc.save_model_final(model.state_dict())
    summary = {"model_final": str(path), "imported_from": str(weights)}
    if sc.cfg.train.eval_at_end:
        report = evaluate(sc, model, tag="src", iteration=0)
        sc.write_metrics(report, {"stage": "src", "iters": 0, "imported_from": str(weights)})
        summary["mIoU"] = report["mIoU"]
    return summary
