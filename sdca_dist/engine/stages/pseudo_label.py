"""pseudo_label: per-class confidence thresholds on the target train set, then new shards.

Pass 1 streams max-softmax histograms (all-reduced once) to get each class's median confidence
(capped); pass 2 labels every image with those thresholds and writes it, with its original image
bytes, as WebDataset shards + manifest in the same format as ``python -m sdca_dist.shard``, so
the ssl stage reads them through the same loader. Each rank writes its own part files; rank 0
writes the manifest last, so the shard set appears complete or not at all.
"""

from __future__ import annotations

import shutil
import time

import torch

from sdca_dist.data.loader import own_size_rows
from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader
from sdca_dist.engine.distributed import all_gather_object, all_reduce_sum
from sdca_dist.engine.run_dir import PSEUDO_SHARDS, THRESHOLDS
from sdca_dist.engine.stage_context import StageContext


def _loader(sc: StageContext):
    cfg = sc.cfg
    return make_loader(
        cfg,
        sc.ctx,
        manifest_path(shard_set(cfg, cfg.data.target_train)),
        cfg.train.eval_batch_size,
        train=False,
        resize=list(cfg.data.target_resize),
        target_labels=True,
    )


def _probabilities(model, batch: dict, device) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(batch rows, softmax probabilities on ``device``, labels as loaded)``, both at those
    labels' OWN size (``own_size_rows``: a smaller image's prediction is never stretched over
    padding)."""
    from sdca_dist.method import upsample_logits

    _, logits = model(batch["image"].to(device))
    return [
        (rows, upsample_logits(logits[rows].float(), tuple(own.shape[-2:])).softmax(dim=1), own)
        for rows, own in own_size_rows(batch["label"], batch.get("label_size"))
    ]


@torch.no_grad()
def run(sc: StageContext) -> dict:
    from sdca_dist.classes import class_names
    from sdca_dist.data.shard_set import ShardReader, ShardWriter, write_manifest
    from sdca_dist.method import ClassThresholds, ConfusionMatrix, apply_thresholds, miou_report

    cfg, ctx, obs = sc.cfg, sc.ctx, sc.observer
    num_classes = cfg.data.num_classes
    model = sc.build_model(init_from=sc.run.model_of("sdca"), freeze_bn=True)
    model.eval()
    t0 = time.time()

    # pass 1: thresholds
    loader = _loader(sc)
    obs.total = 2 * int(loader.steps_per_epoch)
    obs.restart_clock(0)
    thresholds = ClassThresholds(num_classes, bins=cfg.method.threshold_bins, device=ctx.device)
    step = 0
    for batch in loader:
        for rows, probs, _ in _probabilities(model, batch, ctx.device):
            valid = batch["valid"][rows]
            if bool(valid.any()):
                thresholds.update(probs[valid.to(ctx.device)])
        step += 1
        if step % cfg.train.log_every == 0:
            obs.progress(step, {})
    thr = thresholds.compute(cap=cfg.method.pseudo_label_cap).cpu()
    names = class_names(num_classes)
    sc.write_json(
        THRESHOLDS,
        {"thresholds": {n: float(v) for n, v in zip(names, thr.tolist())}, "cap": cfg.method.pseudo_label_cap},
    )
    obs.log("class thresholds: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, thr.tolist())))

    # pass 2: label and write this rank's part files
    out = sc.folder / PSEUDO_SHARDS
    if ctx.is_main:
        if out.exists():  # a crashed earlier attempt: its parts are stale
            shutil.rmtree(out)
        out.mkdir(parents=True)
    ctx.barrier()
    reader = ShardReader(manifest_path(shard_set(cfg, cfg.data.target_train)))
    writer = ShardWriter(out, prefix=f"part-r{ctx.rank:05d}")
    quality = ConfusionMatrix(num_classes, device=ctx.device)  # pseudo label vs the held-back GT
    kept = total = 0
    for batch in _loader(sc):
        per_image = []  # (batch row, pseudo label at its own size, ground truth at its own size)
        for rows, probs, gts in _probabilities(model, batch, ctx.device):
            labels = apply_thresholds(probs, thr.to(ctx.device))
            gts = gts.to(ctx.device)
            per_image += [(rows.start + j, labels[j], gts[j]) for j in range(labels.shape[0])]
        for i, label_i, gt_i in per_image:
            if not bool(batch["valid"][i]):
                continue
            sample = reader.read(int(batch["index"][i]))
            lab = label_i.to(torch.uint8).cpu().numpy()
            writer.add(
                sample["key"],
                sample["image"],
                sample["image_ext"],
                lab,
                {"path": sample["meta"].get("path"), "source_index": int(batch["index"][i])},
            )
            confident = label_i != 255
            # only confident pixels are scored: elsewhere the GT is masked to ignore
            quality.update(
                torch.where(confident, label_i, torch.zeros_like(label_i))[None],
                torch.where(confident, gt_i, torch.full_like(gt_i, 255))[None],
            )
            kept += int(confident.sum())
            total += int(lab.size)
        step += 1
        if step % cfg.train.log_every == 0:
            obs.progress(step, {})
    infos = writer.close()
    gathered = all_gather_object(infos, ctx)
    counts = torch.tensor([kept, total], dtype=torch.float64, device=ctx.device)
    all_reduce_sum(counts, ctx)
    quality.all_reduce()
    if ctx.is_main:
        all_infos = [info for part in gathered for info in part]
        write_manifest(out, all_infos, num_classes)
    ctx.barrier()
    report = miou_report(quality, num_classes)
    share = float(counts[0] / max(float(counts[1]), 1.0))
    obs.log(
        f"pseudo labels: {100 * share:.1f}% of pixels kept; mIoU of kept pixels vs ground truth "
        f"{report['mIoU']:.2f} (diagnostic only: ground truth is never used for training)"
    )
    summary = {
        "thresholds": [float(v) for v in thr.tolist()],
        "kept_pixel_share": share,
        "pseudo_label_mIoU_vs_gt": report["mIoU"],
        "manifest": str(out / "manifest.json"),
        "seconds": round(time.time() - t0, 2),
    }
    sc.write_json("pseudo_label_quality.json", {**summary, "per_class": report["per_class"]})
    return summary
