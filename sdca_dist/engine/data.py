"""The engine's side of the data path: the loader of a stage's shard set, and its per-rank sizes.

Where each shard set lives (and the synthetic benchmark) is ``sdca_dist.data.sets``, which
needs no torch: the launcher asks it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sdca_dist.classes import target_label_map
from sdca_dist.data.labelled import manifest_info, unlabelled_reason
from sdca_dist.data.sets import DataConfigError
from sdca_dist.engine.distributed import DistContext


def per_rank(global_batch: int, ctx: DistContext, key: str) -> int:
    """Split a global batch evenly; the same global batch on any number of ranks is the same run."""
    if global_batch < 1 or global_batch % ctx.world_size:
        raise DataConfigError(f"{key}={global_batch} does not split evenly over {ctx.world_size} ranks")
    return global_batch // ctx.world_size


def require_labels(manifest: Path, key: str, why: str) -> None:
    """One-line refusal when a stage needs labels the shard set does not have."""
    reason = unlabelled_reason(manifest, key, why)
    if reason:
        raise DataConfigError(reason)


def check_classes(cfg: DictConfig, manifest: Path) -> None:
    """A folder-layout shard set records its classes file's table; the run's must name the same
    classes in the same order (its label values were mapped onto those ids)."""
    recorded = (manifest_info(manifest).get("options") or {}).get("classes")
    if not recorded:
        return
    names = [c.get("name") for c in recorded.get("classes", [])]
    if not cfg.data.get("classes"):
        raise DataConfigError(
            f"{manifest}: packed with a classes file ({len(names)} classes: {', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); run with data.classes=FILE"
        )
    from sdca_dist.classes import load_classes

    mine = list(load_classes(cfg.data.classes).names)
    if mine != names:
        raise DataConfigError(
            f"{manifest}: packed with classes {names}, data.classes={cfg.data.classes} has {mine}; "
            "shard again with this classes file or run with the one the shards were packed with"
        )


def make_loader(
    cfg: DictConfig,
    ctx: DistContext,
    manifest: Path,
    batch_size: int,
    *,
    train: bool,
    resize: Optional[list[int]] = None,
    crop: Optional[list[int]] = None,
    scale: Optional[list[float]] = None,
    flip: bool = False,
    photometric: bool = False,
    class_balanced: bool = False,
    target_labels: bool = False,
    seed_offset: int = 0,
    crop_policy: str = "pad",
):
    """A ``ShardLoader`` for this rank. ``target_labels``: map Cityscapes 19 -> setting's classes.

    ``scale`` multiplies ``resize`` (``resize=None``: each image's own stored size);
    ``crop_policy="fit"`` floors each sample's scale so the image covers ``crop`` (never pads: the
    ssl recipe, ``supervised.ssl_augmentation``); ``"pad"`` pads with 0 / 255. The seed is the
    same on every rank (sample order is global; augmentation adds the rank).
    """
    from sdca_dist.data.loader import ShardLoader

    check_classes(cfg, Path(manifest))
    # a classes file's labels are already in the run's class space; the built-in targets are
    # Cityscapes 19-class labels, mapped onto the setting's classes (SYNTHIA's 16)
    label_map = target_label_map(cfg.data.num_classes) if target_labels and not cfg.data.get("classes") else None
    return ShardLoader(
        manifest,
        batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        train=train,
        resize=tuple(resize) if resize else None,
        crop_size=tuple(crop) if crop else None,
        scale_range=tuple(scale) if scale else None,
        flip=flip,
        photometric=photometric,
        class_balanced=class_balanced,
        label_map=label_map,
        seed=cfg.seed * 1000 + seed_offset,
        num_threads=cfg.data.num_threads,
        device="auto",
        crop_policy=crop_policy,
        cuda_device=ctx.device,
    )
