"""dist_init: one distributed pass of the src model over the whole source set.

Every rank reads its share of the shards; the per-class statistics are all-reduced at every
update, so at the end each rank holds the distributions of the entire source set. The forward
runs under ``engine.amp`` (bf16 autocast on CUDA by default); the statistics are accumulated from
its outputs in float32, as in training.
"""

from __future__ import annotations

import time

import torch

from sdca_dist.data.loader import own_size_rows
from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader
from sdca_dist.engine.health import TrainingHealth
from sdca_dist.engine.model_engine import inference_amp, inference_autocast
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.engine.stages.distributions import DistributionPair, save_distributions
from sdca_dist.method import flatten_pixels
from sdca_dist.run_folder import DISTRIBUTIONS
from sdca_dist.stage_table import MODEL_FINAL


@torch.no_grad()
def run(sc: StageContext) -> dict:
    cfg, ctx, obs = sc.cfg, sc.ctx, sc.observer
    model = sc.build_model(init_from=sc.required_input(MODEL_FINAL), freeze_bn=True)
    model.eval()
    loader = make_loader(
        cfg,
        ctx,
        manifest_path(shard_set(cfg, cfg.data.source)),
        cfg.train.eval_batch_size,
        train=False,
        resize=list(cfg.data.source_resize),
    )
    dists = DistributionPair(cfg.data.num_classes, model.feature_dim, ctx.device)
    obs.total = int(loader.steps_per_epoch)
    obs.restart_clock(0)
    health = TrainingHealth(sc.name, ctx, cfg.data.num_classes)  # out-of-range labels: one line, not an assert
    amp = inference_amp(cfg.engine, ctx.device)
    t0 = time.time()
    for step, batch in enumerate(loader, 1):
        image = batch["image"].to(ctx.device)
        label = batch["label"].to(ctx.device)  # padding samples arrive as 255 (the loader masks them)
        health.labels(step - 1, "source", label)
        with inference_autocast(amp, ctx.device):
            feats, logits = model(image)
        feats, logits = feats.float(), logits.float()  # no-ops in fp32
        # each label at its own size, resized to the features (a smaller image's label is not
        # stretched over the padding); rows then concatenated: one estimator update per batch
        parts = [
            (*flatten_pixels(feats[rows], own), flatten_pixels(logits[rows], own)[0])
            for rows, own in own_size_rows(label, batch.get("label_size"))
        ]
        f, y, o = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts))
        dists.update(f, o, y)  # one all-reduce for both levels; every rank calls it every step
        if step % cfg.train.log_every == 0 or step == obs.total:
            health.check()
            obs.progress(step, {})
    path = sc.folder / DISTRIBUTIONS
    if ctx.is_main:
        save_distributions(dists, path)
    ctx.barrier()
    stats = dists.statistics()
    obs.scalars(0, stats)
    obs.log(f"distributions of {int(dists.feat.count.sum())} labelled pixels saved to {path}")
    return {
        "distributions": str(path),
        "seconds": round(time.time() - t0, 2),
        "pixels_per_class": [int(c) for c in dists.feat.count.tolist()],
        **stats,
    }
