"""The engine's side of the data path: the loader of a stage's shard set, and its per-rank sizes.

Where each shard set lives (and the synthetic benchmark) is ``sdca_dist.data.sets``, which
needs no torch: the launcher asks it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sdca_dist.classes import target_label_map
from sdca_dist.data.sets import DataConfigError
from sdca_dist.engine.distributed import DistContext


def per_rank(global_batch: int, ctx: DistContext, key: str) -> int:
    """Split a global batch evenly; the same global batch on any number of ranks is the same run."""
    if global_batch < 1 or global_batch % ctx.world_size:
        raise DataConfigError(f"{key}={global_batch} does not split evenly over {ctx.world_size} ranks")
    return global_batch // ctx.world_size


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

    label_map = target_label_map(cfg.data.num_classes) if target_labels else None
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
