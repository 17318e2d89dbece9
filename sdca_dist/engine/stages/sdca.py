"""sdca: semantic distribution-aware contrastive adaptation (method doc, stage 3).

Each step is two micro-steps on one model: the source batch (segmentation loss, estimator update
with the global batch, contrastive losses with true labels) and the target batch (contrastive
losses with confident pseudo labels). Gradients are synchronised once, after the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from sdca_dist.engine.data import make_loader, manifest_path, per_rank, shard_set
from sdca_dist.engine.model_engine import ModelEngine
from sdca_dist.engine.observe import StageObserver
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.engine.stages.common import finish_training, make_engine
from sdca_dist.engine.stages.distributions import DistributionPair
from sdca_dist.engine.training import TrainingPlan, run_training


@dataclass
class SDCAStep:
    """One sdca training step (also driven directly by ``python -m sdca_dist.bench step``)."""

    dists: DistributionPair
    tau: float = 100.0
    delta: float = 0.9
    feat_weight: float = 1.0
    out_weight: float = 1.0
    lovasz_weight: float = 0.75
    observer: Optional[StageObserver] = None
    image_every: int = 1000

    def _contrastive(self, f: torch.Tensor, o: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature- and output-level losses of one domain's pixels against the distributions."""
        from sdca_dist.method import pixel_contrastive_loss

        d = self.dists
        return (pixel_contrastive_loss(f, y, d.feat.mean, d.feat.var, tau=self.tau),
                pixel_contrastive_loss(o, y, d.out.mean, d.out.var, tau=self.tau))

    def __call__(self, engine: ModelEngine, batches: Mapping[str, dict], it: int) -> dict[str, float]:
        from sdca_dist.method import confidence_pseudo_labels, flatten_pixels, segmentation_loss

        s, t = batches["source"], batches["target"]
        wf, wo = self.feat_weight, self.out_weight
        with engine.micro_step(0):
            feats, logits = engine(s["image"])
            seg = segmentation_loss(logits, s["label"], self.lovasz_weight)
            f, y = flatten_pixels(feats, s["label"])
            o, _ = flatten_pixels(logits, s["label"])
            # estimators first (global batch, one all-reduce for both levels), then the losses
            self.dists.update(f, o, y)
            lfs, los = self._contrastive(f, o, y)
            loss_s = seg + wf * lfs + wo * los
            engine.backward(loss_s)
        with engine.micro_step(1):
            feats_t, logits_t = engine(t["image"])
            pseudo = confidence_pseudo_labels(logits_t.detach(), delta=self.delta)
            ft, yt = flatten_pixels(feats_t, pseudo)
            ot, _ = flatten_pixels(logits_t, pseudo)
            lft, lot = self._contrastive(ft, ot, yt)
            loss_t = wf * lft + wo * lot
            engine.backward(loss_t)
        if self.observer is not None and (it + 1) % self.image_every == 0:
            self.observer.images(it + 1, "sdca/source", s["image"][0], s["label"][0], pred=logits[0].detach().argmax(0))
            self.observer.images(it + 1, "sdca/target", t["image"][0], pred=logits_t[0].detach().argmax(0),
                                 pseudo=pseudo[0])
        return {"loss": float((loss_s + loss_t).detach()), "seg": float(seg.detach()),
                "feat_src": float(lfs.detach()), "out_src": float(los.detach()),
                "feat_tgt": float(lft.detach()), "out_tgt": float(lot.detach()),
                "pseudo_label_share": float((yt != 255).float().mean())}


def run(sc: StageContext) -> dict:
    cfg, ctx = sc.cfg, sc.ctx
    m = cfg.method
    sched = sc.schedule()
    src_batch = per_rank(sched.global_batch, ctx, "sdca.batch_size")
    tgt_batch = per_rank(sched.global_target_batch, ctx, "sdca.target_batch_size")
    model = sc.build_model(init_from=sc.run.model_of("src"), freeze_bn=True)
    dists = DistributionPair(int(cfg.data.num_classes), model.feature_dim, ctx.device)
    dists.load(sc.run.distributions_of("dist_init"))
    engine = make_engine(sc, model, micro_steps=2, micro_batch=src_batch, freeze_bn=True)
    source = make_loader(cfg, ctx, manifest_path(shard_set(cfg, cfg.data.source)), src_batch, train=True,
                         resize=list(cfg.data.source_resize), photometric=True,
                         class_balanced=bool(cfg.data.class_balanced), seed_offset=1)
    target = make_loader(cfg, ctx, manifest_path(shard_set(cfg, cfg.data.target_train)), tgt_batch, train=True,
                         resize=list(cfg.data.target_resize), seed_offset=2)
    step = SDCAStep(dists, tau=float(m.tau), delta=float(m.delta), feat_weight=float(m.feat_weight),
                    out_weight=float(m.out_weight), lovasz_weight=float(m.lovasz_weight), observer=sc.observer,
                    image_every=sched.image_every)
    plan = TrainingPlan(schedule=sched, engine=engine, loaders={"source": source, "target": target}, step=step,
                        shared_state={"distributions": dists}, extra_scalars=dists.statistics,
                        images_per_step=src_batch + tgt_batch)
    stats = run_training(sc, plan)
    if ctx.is_main:
        dists.save(sc.folder / "distributions_final.pt")
    return finish_training(sc, engine, stats, sched.iters)
