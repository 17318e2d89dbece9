"""The data path: dataset layouts -> WebDataset shards (+ manifest) -> DALI batches.

Modules: ``layouts`` (read GTA5 / SYNTHIA / Cityscapes folders into trainId labels),
``png16`` (16-bit RGB PNG without FreeImage), ``shards`` (ShardWriter, manifest, ShardReader,
DALI index files), ``packing`` (the parallel, resumable ``python -m sdca_dist.shard`` job),
``sampling`` (class-balanced draws and augmentation parameters), ``loader`` (ShardLoader),
``sets`` (where each named shard set lives, the synthetic benchmark's sets; no torch).
"""

from sdca_dist.data.errors import DataError

__all__ = ["DataError"]
