"""pseudo_label: per-class confidence thresholds on the target train set, then new shards.

Pass 1 streams max-softmax histograms (all-reduced once) to get each class's median confidence
(capped); pass 2 labels every image with those thresholds and writes it, with its original image
bytes, as WebDataset shards + manifest in the same format as ``python -m sdca_dist.shard``, so
the ssl stage reads them through the same loader. Each rank writes its own part files; rank 0
writes the manifest last, so the shard set appears complete or not at all.

The forward runs under ``engine.amp`` (bf16 autocast on CUDA by default; the softmax is taken in
float32). Statistics stay on the device: the histograms, the kept-pixel count and the quality
confusion matrix are read once at the end; pass 2 copies each batch's labels to the host once,
to write them.
"""

from __future__ import annotations

import shutil
import time

import torch

from sdca_dist.data.labelled import is_labelled
from sdca_dist.data.loader import own_size_rows
from sdca_dist.data.sets import manifest_path, shard_set
from sdca_dist.engine.data import make_loader
from sdca_dist.engine.distributed import all_gather_object, all_reduce_sum
from sdca_dist.engine.model_engine import inference_amp, inference_autocast
from sdca_dist.engine.stage_context import StageContext
from sdca_dist.run_folder import PSEUDO_LABEL_QUALITY, PSEUDO_SHARDS, THRESHOLDS
from sdca_dist.stage_table import MODEL_FINAL


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


def _probabilities(model, batch: dict, device, amp=None) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(batch rows, softmax probabilities on ``device``, labels as loaded)``, both at those
    labels' OWN size (``own_size_rows``: a smaller image's prediction is never stretched over
    padding). ``amp``: the forward's autocast dtype (None: fp32)."""
    from sdca_dist.method import upsample_logits

    with inference_autocast(amp, device):
        _, logits = model(batch["image"].to(device))
    return [
        (rows, upsample_logits(logits[rows].float(), tuple(own.shape[-2:])).softmax(dim=1), own)
        for rows, own in own_size_rows(batch["label"], batch.get("label_size"))
    ]


@torch.no_grad()
def run(sc: StageContext) -> dict:
    from sdca_dist.classes import run_classes
    from sdca_dist.data.shard_set import ShardReader, ShardWriter, write_manifest
    from sdca_dist.method import ClassThresholds, ConfusionMatrix, apply_thresholds, miou_report

    cfg, ctx, obs = sc.cfg, sc.ctx, sc.observer
    num_classes = cfg.data.num_classes
    model = sc.build_model(init_from=sc.required_input(MODEL_FINAL), freeze_bn=True)
    model.eval()
    amp = inference_amp(cfg.engine, ctx.device)
    t0 = time.time()

    # pass 1: thresholds
    loader = _loader(sc)
    obs.total = 2 * int(loader.steps_per_epoch)
    obs.restart_clock(0)
    thresholds = ClassThresholds(num_classes, bins=cfg.method.threshold_bins, device=ctx.device)
    step = 0
    for batch in loader:
        for rows, probs, _ in _probabilities(model, batch, ctx.device, amp):
            thresholds.update(probs, rows=batch["valid"][rows])
        step += 1
        if step % cfg.train.log_every == 0:
            obs.progress(step, {})
    thr = thresholds.compute(cap=cfg.method.pseudo_label_cap).cpu()
    names = run_classes(cfg.data).names
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
    kept = torch.zeros((), dtype=torch.int64, device=ctx.device)  # confident pixels, read once at the end
    total = 0
    thr_device = thr.to(ctx.device)
    for batch in _loader(sc):
        valid, index = batch["valid"].tolist(), batch["index"].tolist()  # the loader's host-side records
        for rows, probs, gts in _probabilities(model, batch, ctx.device, amp):
            labels = apply_thresholds(probs, thr_device)
            gts = gts.to(ctx.device)
            host = labels.to(torch.uint8).cpu().numpy()  # one copy per batch: shards are written from the host
            for j in range(labels.shape[0]):
                i = rows.start + j
                if not valid[i]:
                    continue
                sample = reader.read(int(index[i]))
                lab = host[j]
                writer.add(
                    sample["key"],
                    sample["image"],
                    sample["image_ext"],
                    lab,
                    {"path": sample["meta"].get("path"), "source_index": int(index[i])},
                )
                label_i, gt_i = labels[j], gts[j]
                confident = label_i != 255
                # only confident pixels are scored: elsewhere the GT is masked to ignore
                quality.update(
                    torch.where(confident, label_i, torch.zeros_like(label_i))[None],
                    torch.where(confident, gt_i, torch.full_like(gt_i, 255))[None],
                )
                kept += confident.sum()
                total += int(lab.size)
        step += 1
        if step % cfg.train.log_every == 0:
            obs.progress(step, {})
    infos = writer.close()
    gathered = all_gather_object(infos, ctx)
    counts = torch.stack([kept.to(torch.float64), torch.tensor(float(total), dtype=torch.float64, device=ctx.device)])
    all_reduce_sum(counts, ctx)
    quality.all_reduce()
    if ctx.is_main:
        all_infos = [info for part in gathered for info in part]
        write_manifest(out, all_infos, num_classes)
    ctx.barrier()
    report = miou_report(quality, num_classes, names)
    share = float(counts[0] / max(float(counts[1]), 1.0))
    labelled = is_labelled(manifest_path(shard_set(cfg, cfg.data.target_train)))
    obs.log(
        f"pseudo labels: {100 * share:.1f}% of pixels kept; "
        + (
            f"mIoU of kept pixels vs ground truth {report['mIoU']:.2f} (diagnostic only: ground truth is never "
            "used for training)"
            if labelled
            else "no ground truth to compare with (an unlabelled target train set)"
        )
    )
    if not labelled:  # every GT pixel is ignore: no numbers, rather than NaN that looks like one
        report = {"mIoU": None, "per_class": {n: None for n in names}}
    summary = {
        "thresholds": [float(v) for v in thr.tolist()],
        "kept_pixel_share": share,
        "pseudo_label_mIoU_vs_gt": report["mIoU"],
        "manifest": str(out / "manifest.json"),
        "seconds": round(time.time() - t0, 2),
    }
    sc.write_json(PSEUDO_LABEL_QUALITY, {**summary, "per_class": report["per_class"]})
    return summary
