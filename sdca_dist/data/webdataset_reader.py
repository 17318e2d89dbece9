"""Read a shard set outside DALI with the ``webdataset`` library: ``iter_samples(manifest)``.

The tars are plain WebDataset shards (``key.jpg`` or ``key.img.png``, ``key.png`` label,
``key.json`` meta), so any WebDataset user can open them with ``webdataset.WebDataset``; this
module is that reader for our own tools (``python -m sdca_dist.shard --inspect``, prediction on a
shard set, tests). It streams each shard sequentially (no random access; use
``shard_set.ShardReader`` for that) and checks every sample against the manifest, so a tar that does
not belong to its manifest, or a damaged one, fails with one line naming the shard and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sdca_dist.data.errors import DataError
from sdca_dist.data.shard_set import Manifest, load_manifest


@dataclass(frozen=True)
class Sample:
    """One sample as stored: encoded bytes, never decoded here (callers choose the decoder)."""

    index: int  # manifest index
    key: str
    image: bytes  # JPEG or PNG bytes, see image_ext
    image_ext: str  # "jpg" or "img.png"
    label: bytes  # "L" PNG of trainIds, 255 = ignore
    meta: dict
    shard: str  # shard file name inside the set's folder


def _identity(src, group=None):  # every shard to this process: splitting is done by sample index below
    yield from src


def iter_samples(manifest: str | Path | Manifest, rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
    """Samples of a shard set in manifest order; with ``world_size`` > 1 each rank gets the
    indices ``i % world_size == rank``.

    Raises ``DataError`` naming the shard (and key) when a tar is missing, unreadable, or holds
    other samples than its manifest says.
    """
    import webdataset as wds

    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    by_shard: dict[int, list[int]] = {}
    for i, rec in enumerate(m.samples):
        by_shard.setdefault(int(rec["shard"]), []).append(i)
    for si, sh in enumerate(m.shards):
        path = m.folder / sh["name"]
        wanted = by_shard.get(si, [])
        if not any(i % world_size == rank for i in wanted):
            continue
        if not path.is_file():
            raise DataError(path, "shard is missing")
        ds = wds.WebDataset(
            str(path), shardshuffle=False, nodesplitter=_identity, workersplitter=_identity, empty_check=False
        )
        pos, key = 0, None
        try:
            for s in ds:
                key = s["__key__"]
                if pos >= len(wanted) or m.samples[wanted[pos]]["key"] != key:
                    raise DataError(
                        path,
                        f"sample {key!r} is not the manifest's sample #{pos} of this shard "
                        f"(a foreign or damaged tar; python -m sdca_dist.shard --verify)",
                    )
                i = wanted[pos]
                pos += 1
                if i % world_size != rank:
                    continue
                ext = m.samples[i]["image_ext"]
                missing = [e for e in (ext, "png", "json") if e not in s]
                if missing:
                    raise DataError(path, f"sample {key!r} lacks {', '.join(missing)}")
                try:
                    meta = json.loads(s["json"])
                except ValueError as e:
                    raise DataError(path, f"sample {key!r}: corrupt meta json ({e})") from None
                yield Sample(i, key, s[ext], ext, s["png"], meta, sh["name"])
        except DataError:
            raise
        except Exception as e:  # tarfile / webdataset errors on damaged bytes
            at = f" after sample {key!r}" if key else ""
            raise DataError(path, f"unreadable shard{at} ({type(e).__name__}: {e})".replace("\n", " ")) from None
        if pos != len(wanted):
            raise DataError(path, f"shard holds {pos} samples, the manifest lists {len(wanted)}")
