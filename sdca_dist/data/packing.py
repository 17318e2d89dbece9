"""Pack a dataset layout into WebDataset shards: parallel, atomic, resumable with identical bytes.

Workers decode + re-encode samples in parallel (ordered), one writer appends them in sorted key
order and cuts shards at a byte size: shard boundaries therefore depend only on the inputs and
options. A rerun keeps the complete shards (those with sidecars), skips their samples and writes
the rest, so the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import io
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sdca_dist.data.errors import DataError
from sdca_dist.data.layouts import SamplePair, get_layout, list_pairs, read_image, read_label
from sdca_dist.data.shards import (
    DEFAULT_SHARD_SIZE,
    Manifest,
    ShardWriter,
    encode_label,
    load_manifest,
    read_sidecars,
    write_manifest,
)


@dataclass(frozen=True)
class PackOptions:
    layout: str
    root: Path
    out: Path
    split: str = "train"
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 1
    jpeg_quality: int = 90
    lossless: bool = False
    skip_mismatched: bool = False
    unknown_ids: str = "error"  # or "ignore": map ids outside the table to 255 (counted in the manifest)
    progress: bool = True

    def recorded(self) -> dict:
        """What must match for a resumed run to continue an earlier one."""
        return {"layout": self.layout, "split": self.split, "shard_size": self.shard_size,
                "jpeg_quality": self.jpeg_quality, "lossless": self.lossless, "unknown_ids": self.unknown_ids,
                "skip_mismatched": self.skip_mismatched}


def _mismatch(pair: SamplePair, image_wh: tuple[int, int], label_wh: tuple[int, int]) -> str:
    return (f"image/label size mismatch: image {image_wh[0]}x{image_wh[1]}, label {label_wh[0]}x{label_wh[1]} "
            f"({pair.label.name})")


def encode_sample(job: tuple) -> dict:
    """Worker: read + check one pair, return encoded bytes (or a 'skipped' record)."""
    layout, pair, root, quality, lossless, unknown, skip_mismatched = job
    image = read_image(pair.image)
    label, n_unknown = read_label(layout, pair.label, unknown)
    if image.size != (label.shape[1], label.shape[0]):
        msg = _mismatch(pair, image.size, (label.shape[1], label.shape[0]))
        if skip_mismatched:
            return {"skipped": {"path": pair.rel, "reason": msg}}
        raise DataError(pair.image, msg)
    buf = io.BytesIO()
    if lossless:
        image.save(buf, format="PNG", compress_level=3)
        ext = "img.png"
    else:
        image.save(buf, format="JPEG", quality=quality)
        ext = "jpg"
    label_png, pixels = encode_label(label, get_layout(layout).num_classes)
    meta = {"path": pair.rel, "label_path": pair.label.relative_to(root).as_posix(), "size": list(image.size)}
    if n_unknown:
        meta["unknown_id_pixels"] = n_unknown
    return {"key": pair.key, "image": buf.getvalue(), "ext": ext, "label_png": label_png, "pixels": pixels,
            "size": image.size, "meta": meta}


def _ordered(jobs: list, workers: int) -> Iterator[dict]:
    if workers <= 1:
        for j in jobs:
            yield encode_sample(j)
        return
    # spawn: the caller may hold DALI/torch threads, which do not survive fork
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(encode_sample, jobs, chunksize=4)


class _Progress:
    def __init__(self, total: int, on: bool):
        self.total, self.on, self.t0, self.last = total, on, time.time(), 0.0

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.time()
        if not self.on or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0
        bar = "#" * int(30 * done / max(self.total, 1))
        print(f"\r[{bar:<30}] {done}/{self.total} {rate:.1f} img/s ETA {eta:.0f}s {extra}", end="",
              file=sys.stderr, flush=True)
        if done >= self.total:
            print(file=sys.stderr)


def pack(opts: PackOptions) -> Manifest:
    """Shard ``opts.root`` (layout + split) into ``opts.out``; returns the written manifest."""
    lay = get_layout(opts.layout)
    pairs = list_pairs(opts.layout, opts.root, opts.split)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # leftovers of an interrupted run: never complete
        stale.unlink()
    done = read_sidecars(out)
    for info in done:
        if info.options != opts.recorded():
            raise DataError(out / info.name, f"was written with other options {info.options}; "
                                             f"remove {out} or rerun with the same options")
    # keep only the contiguous prefix shard-000000.. of complete shards
    kept = []
    for i, info in enumerate(sorted(done, key=lambda s: s.name)):
        if info.name != f"shard-{i:06d}.tar":
            break
        kept.append(info)
    keys_done = {rec["key"] for info in kept for rec in info.samples}
    remaining = [p for p in pairs if p.key not in keys_done]
    if len(pairs) - len(remaining) != len(keys_done):
        raise DataError(out, "existing shards hold samples that are not in the input; remove the folder")
    writer = ShardWriter(out, prefix="shard", shard_size=opts.shard_size, num_classes=lay.num_classes,
                         start_index=len(kept), options=opts.recorded())
    jobs = [(opts.layout, p, opts.root, opts.jpeg_quality, opts.lossless, opts.unknown_ids, opts.skip_mismatched) for p in remaining]
    progress = _Progress(len(pairs), opts.progress)
    skipped: list[dict] = []
    unknown: list[dict] = []  # labels whose ids outside the table were mapped to 255 (--unknown-ids ignore)
    n = len(pairs) - len(remaining)
    try:
        for res in _ordered(jobs, opts.workers):
            n += 1
            if "skipped" in res:
                skipped.append(res["skipped"])
            else:
                if res["meta"].get("unknown_id_pixels"):
                    unknown.append({"path": res["meta"]["label_path"], "pixels": res["meta"]["unknown_id_pixels"]})
                writer.add_encoded(res["key"], res["image"], res["ext"], res["label_png"], res["pixels"],
                                   tuple(res["size"]), res["meta"])
            progress(n, f"shards {writer.next_index}")
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    if kept:  # pairs skipped before the resume point: found again from their headers
        skipped += _skipped_before(pairs, keys_done)
    return write_manifest(out, kept + written, lay.num_classes, skipped=sorted(skipped, key=lambda s: s["path"]),
                          info={"layout": opts.layout, "split": opts.split, "root": str(opts.root),
                                "options": opts.recorded(), "unknown_ids": unknown})


def _skipped_before(pairs: list[SamplePair], keys_done: set[str]) -> list[dict]:
    """Pairs inside the kept shards' range but not in them were skipped (size mismatch) earlier."""
    from PIL import Image

    last = max((i for i, p in enumerate(pairs) if p.key in keys_done), default=-1)
    out = []
    for p in pairs[: last + 1]:
        if p.key not in keys_done:
            with Image.open(p.image) as a, Image.open(p.label) as b:
                out.append({"path": p.rel, "reason": _mismatch(p, a.size, b.size)})
    return out


def verify(manifest_path: Path) -> list[str]:
    """Re-hash every shard against the manifest; returns one line per problem (empty = all good)."""
    m = load_manifest(manifest_path)
    problems = []
    for s in m.shards:
        p = m.folder / s["name"]
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != s["sha256"]:
            problems.append(f"{p}: sha256 {h.hexdigest()[:16]}... != manifest {s['sha256'][:16]}...")
        if not (m.folder / s["index"]).is_file():
            problems.append(f"{m.folder / s['index']}: DALI index missing")
    return problems
