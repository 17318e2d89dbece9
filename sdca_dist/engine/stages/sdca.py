"""sdca: semantic distribution-aware contrastive adaptation (docs/method.md, "Stages").

The objective (source and target terms, pseudo labels, the estimator update) is method code:
``sdca_dist.method.objective``. This module keeps the engine's part: each step is two
micro-steps on one model, the source batch then the target batch, with gradients synchronised
once, after the second; plus logging and TensorBoard images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from sdca_dist.config.schema import MethodConfig
from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader, per_rank
from sdca_dist.engine.model_engine import ModelEngine
from sdca_dist.engine.observe import StageObserver
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.engine.stages.common import finish_training, make_engine
from sdca_dist.engine.stages.distributions import load_distributions, save_distributions
from sdca_dist.engine.training import TrainingPlan, run_training
from sdca_dist.method.objective import DistributionPair, SDCAObjective
from sdca_dist.run_folder import DISTRIBUTIONS_FINAL
from sdca_dist.stage_table import DISTRIBUTIONS, MODEL_FINAL


@dataclass
class SDCAStep:
    """One sdca training step (also driven directly by the step and scale benchmarks)."""

    dists: DistributionPair
    method: MethodConfig = None  # type: ignore[assignment] - the schema's defaults when omitted
    observer: Optional[StageObserver] = None
    image_every: int = 1000

    def __post_init__(self) -> None:
        self.objective = SDCAObjective(self.dists, self.method or MethodConfig())

    def __call__(self, engine: ModelEngine, batches: Mapping[str, dict], it: int) -> dict[str, torch.Tensor]:
        """The step's loss and its parts as detached tensors (no host read: see ``StepFn``)."""
        s, t = batches["source"], batches["target"]
        with engine.micro_step(0):
            feats, logits = engine(s["image"])
            src = self.objective.source(feats, logits, s["label"])
            engine.backward(src.loss)
        with engine.micro_step(1):
            feats_t, logits_t = engine(t["image"])
            tgt = self.objective.target(feats_t, logits_t)
            engine.backward(tgt.loss)
        if self.observer is not None and (it + 1) % self.image_every == 0:
            self.observer.images(it + 1, "sdca/source", s["image"][0], s["label"][0], pred=logits[0].detach().argmax(0))
            self.observer.images(
                it + 1, "sdca/target", t["image"][0], pred=logits_t[0].detach().argmax(0), pseudo=tgt.pseudo[0]
            )
        scalars = {"loss": (src.loss + tgt.loss).detach()}
        scalars.update({k: v.detach() for k, v in {**src.parts, **tgt.parts}.items()})
        return scalars


def run(sc: StageContext) -> dict:
    return _run(sc, sc.settings.method)


def run_no_align(sc: StageContext) -> dict:
    """The ablation: the same stage with the feature- and output-level contrastive terms off."""
    return _run(sc, dataclasses.replace(sc.settings.method, feat_weight=0.0, out_weight=0.0))


def _run(sc: StageContext, method: MethodConfig) -> dict:
    cfg, ctx = sc.cfg, sc.ctx
    sched = sc.schedule()
    src_batch = per_rank(sched.global_batch, ctx, "sdca.batch_size")
    tgt_batch = per_rank(sched.global_target_batch, ctx, "sdca.target_batch_size")
    model = sc.build_model(init_from=sc.required_input(MODEL_FINAL), freeze_bn=True)
    dists = DistributionPair(cfg.data.num_classes, model.feature_dim, ctx.device)
    load_distributions(dists, sc.required_input(DISTRIBUTIONS))
    engine = make_engine(sc, model, micro_steps=2, micro_batch=src_batch, freeze_bn=True)
    source = make_loader(
        cfg,
        ctx,
        manifest_path(shard_set(cfg, cfg.data.source)),
        src_batch,
        train=True,
        resize=list(cfg.data.source_resize),
        photometric=True,
        class_balanced=cfg.data.class_balanced,
        seed_offset=1,
    )
    target = make_loader(
        cfg,
        ctx,
        manifest_path(shard_set(cfg, cfg.data.target_train)),
        tgt_batch,
        train=True,
        resize=list(cfg.data.target_resize),
        seed_offset=2,
    )
    step = SDCAStep(dists, method, observer=sc.observer, image_every=sched.image_every)
    plan = TrainingPlan(
        schedule=sched,
        engine=engine,
        loaders={"source": source, "target": target},
        step=step,
        shared_state={"distributions": dists},
        extra_scalars=dists.statistics,
        images_per_step=src_batch + tgt_batch,
    )
    stats = run_training(sc, plan)
    if ctx.is_main:
        save_distributions(dists, sc.folder / DISTRIBUTIONS_FINAL)
    return finish_training(sc, engine, stats, sched.iters)
