"""ShardLoader: one DALI pipeline for training and evaluation batches, from a shard manifest.

Uniform modes read with ``fn.readers.webdataset`` (sharded across ranks, shuffled per epoch,
``pad_last_batch`` so every rank runs the same number of steps; padding flagged ``valid=False``).
Class-balanced source sampling feeds encoded bytes picked by ``ClassBalancedSampler`` through an
external source instead. Both go through the same augmentation graph: decode (GPU "mixed" when
CUDA is present), one resize for image and label (linear / nearest), crop with label padding 255,
flip, the method's photometric augmentation on images only, normalisation to NCHW float.

Exact resume: every random draw except the reader's shuffle is made in Python from (seed, rank,
batch number) and fed to DALI; the reader's position and shuffle state travel in a DALI pipeline
checkpoint (``enable_checkpointing``). ``state_dict()`` after k batches + ``load_state_dict``
gives bitwise the same following batches.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sdca_dist.data.errors import DataError
from sdca_dist.data.sampling import (
    AugmentSpec,
    ClassBalancedSampler,
    augment_params,
    shard_bounds,
    steps_per_epoch,
)
from sdca_dist.data.shards import IMAGE_EXTS, Manifest, ShardReader, load_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PARAM_NAMES = ("scale", "crop_x", "crop_y", "flip", "brightness", "contrast", "saturation", "hue", "sigma")


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


class ShardLoader:
    """Batches ``{"image": float [B,3,H,W], "label": int64 [B,H,W], "valid": bool [B], "index": int64 [B]}``.

    ``train=True`` iterates forever (epoch after epoch, reshuffled); ``train=False`` makes one
    pass. Eval labels stay at their original resolution (padded with 255 to the largest in the
    batch) while images are resized to ``resize``.
    """

    def __init__(self, manifest: str | Path, batch_size: int, *, rank: int = 0, world_size: int = 1, train: bool,
                 resize: tuple[int, int] | None = None, crop_size: tuple[int, int] | None = None,
                 scale_range: tuple[float, float] | None = None, flip: bool = False, photometric: bool = False,
                 class_balanced: bool = False, label_map: np.ndarray | None = None, seed: int = 0,
                 num_threads: int = 2, device: str = "auto", prefetch: int = 2, shuffle_buffer: int = 1024):
        self.manifest: Manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if self.manifest.num_samples < world_size:
            raise DataError(self.manifest.path, f"{self.manifest.num_samples} samples cannot feed {world_size} ranks")
        if class_balanced and not train:
            raise ValueError("class_balanced sampling is a training mode (train=True)")
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        self.resize = tuple(resize) if resize else None
        self.crop_size = tuple(crop_size) if crop_size else None
        self.spec = AugmentSpec(tuple(scale_range) if scale_range else None, bool(flip), bool(photometric))
        self.class_balanced = class_balanced
        self.label_map = None if label_map is None else torch.as_tensor(np.asarray(label_map, dtype=np.uint8))
        if self.label_map is not None and self.label_map.numel() != 256:
            raise ValueError("label_map must be a 256-entry uint8 lookup table")
        self.seed, self.num_threads, self.prefetch = int(seed), int(num_threads), int(prefetch)
        self.shuffle_buffer = shuffle_buffer
        if device == "auto":
            device = "gpu" if cuda_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        self.device = device
        self.steps_per_epoch = steps_per_epoch(self.manifest.num_samples, world_size, batch_size)
        self._key_to_index = {s["key"]: i for i, s in enumerate(self.manifest.samples)}
        # resumable state: batches consumed, reader checkpoint, sampler counts
        self._consumed = 0
        self._restore_ckpt: str | None = None
        self._restore_counts: np.ndarray | None = None
        self._pipe = None
        self._produced = 0  # batches requested from the external source (runs ahead by the prefetch depth)
        self._count_snapshots: dict[int, np.ndarray] = {}
        self._sampler: ClassBalancedSampler | None = None
        self._reader: ShardReader | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-able position: batches consumed, DALI reader checkpoint, sampler counts."""
        d: dict = {"batches": self._consumed, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                   "num_samples": self.manifest.num_samples, "batch_size": self.batch_size}
        if self.class_balanced:
            counts = self._count_snapshots.get(self._consumed)
            if counts is None:
                counts = self._restore_counts if self._restore_counts is not None else np.zeros(self.manifest.num_classes, np.int64)
            d["class_counts"] = [int(c) for c in counts]
        else:
            d["dali"] = self._pipe.checkpoint() if self._pipe is not None else self._restore_ckpt
        return d

    def load_state_dict(self, d: dict) -> None:
        for k in ("seed", "rank", "world_size", "num_samples", "batch_size"):
            if k in d and d[k] != getattr(self, k if k != "num_samples" else "_num_samples"):
                raise ValueError(f"loader state for {k}={d[k]} does not match this loader ({getattr(self, k if k != 'num_samples' else '_num_samples')})")
        self._close_pipe()
        self._consumed = int(d["batches"])
        self._restore_ckpt = d.get("dali")
        self._restore_counts = np.asarray(d["class_counts"], np.int64) if "class_counts" in d else None

    @property
    def _num_samples(self) -> int:
        return self.manifest.num_samples

    # ------------------------------------------------------------------ pipeline
    def _external(self):
        """Callback feeding per-batch params (and, class-balanced, encoded samples) in batch order."""
        names = self._param_names()

        def source():
            g = self._produced
            self._produced += 1
            p = augment_params(self.spec, self.seed, self.rank, g, self.batch_size)
            out = [p[n] for n in names]
            if self.class_balanced:
                assert self._sampler is not None and self._reader is not None
                self._count_snapshots[g] = self._sampler.counts.copy()
                for old in [k for k in self._count_snapshots if k < g - 4 * self.prefetch - 8]:
                    del self._count_snapshots[old]
                idx, _ = self._sampler.draw_batch(g, self.batch_size)
                recs = [self._reader.read(int(i)) for i in idx]
                out += [[np.frombuffer(r["image"], np.uint8) for r in recs],
                        [np.frombuffer(r["label"], np.uint8) for r in recs],
                        idx.copy()]
            return tuple(out)

        return source

    def _param_names(self) -> list[str]:
        return [n for n in _PARAM_NAMES if n not in ("brightness", "contrast", "saturation", "hue", "sigma")
                or self.spec.photometric]

    def _build(self, checkpoint: str | None):
        from nvidia.dali import fn, pipeline_def, types

        names = self._param_names()
        gpu = self.device == "gpu"
        m = self.manifest

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=0 if gpu else None,
                      seed=(self.seed * 7919 + self.rank) & 0x7FFFFFFF, prefetch_queue_depth=self.prefetch,
                      enable_checkpointing=True)
        def pipeline():
            n_out = len(names) + (3 if self.class_balanced else 0)
            ext = fn.external_source(source=self._external(), num_outputs=n_out, batch=True, parallel=False)
            prm = dict(zip(names, ext[: len(names)]))
            if self.class_balanced:
                enc_img, enc_lbl, index = ext[len(names):]
                meta = None
            else:
                enc_img, enc_lbl, meta = fn.readers.webdataset(
                    paths=[str(p) for p in m.shard_paths()], index_paths=[str(p) for p in m.index_paths()],
                    ext=[";".join(IMAGE_EXTS), "png", "json"], missing_component_behavior="error",
                    random_shuffle=self.train, initial_fill=self.shuffle_buffer, shard_id=self.rank,
                    num_shards=self.world_size, pad_last_batch=True, stick_to_shard=False, name="reader")
                index = None
            image, label = self._graph(fn, types, enc_img, enc_lbl, prm, gpu)
            outs = [image, label]
            outs.append(index if index is not None else meta)
            return tuple(outs)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*external source.*")  # its state is ours (batch number)
            pipe = pipeline(checkpoint=checkpoint) if checkpoint else pipeline()
            pipe.build()
        return pipe

    def _graph(self, fn, types, enc_img, enc_lbl, prm, gpu: bool):
        """The augmentation graph shared by every mode: image and label from ONE set of draws."""
        image = fn.decoders.image(enc_img, device="mixed" if gpu else "cpu", output_type=types.RGB)
        label = fn.decoders.image(enc_lbl, device="cpu", output_type=types.GRAY)  # PNG: CPU decode, byte-exact
        if gpu:
            label = label.gpu()
        if self.train:
            if self.resize is not None:
                base = types.Constant(np.asarray(self.resize, dtype=np.float32), device="cpu")
            else:
                base = fn.cast(fn.peek_image_shape(enc_img), dtype=types.FLOAT)[0:2]
            size = base * prm["scale"]
            if self.resize is not None or self.spec.scale_range is not None:
                image = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
                label = fn.resize(label, size=size, interp_type=types.INTERP_NN, antialias=False)
            if self.crop_size is not None:
                image = fn.crop(image, crop=self.crop_size, crop_pos_x=prm["crop_x"], crop_pos_y=prm["crop_y"],
                                out_of_bounds_policy="pad", fill_values=0)
                label = fn.crop(label, crop=self.crop_size, crop_pos_x=prm["crop_x"], crop_pos_y=prm["crop_y"],
                                out_of_bounds_policy="pad", fill_values=255)
            if self.spec.photometric:
                image = fn.color_twist(image, brightness=prm["brightness"], contrast=prm["contrast"],
                                       saturation=prm["saturation"], hue=prm["hue"])
                image = fn.gaussian_blur(image, window_size=3, sigma=prm["sigma"])
            label = fn.flip(label, horizontal=prm["flip"])
            mirror = prm["flip"]
        else:
            if self.resize is not None:
                image = fn.resize(image, size=list(self.resize), interp_type=types.INTERP_LINEAR, antialias=True)
            else:
                image = fn.pad(image, fill_value=0)
            label = fn.pad(label, fill_value=255)  # original resolution; sizes may differ inside a batch
            mirror = 0
        image = fn.crop_mirror_normalize(image, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                         mean=[255 * v for v in IMAGENET_MEAN], std=[255 * v for v in IMAGENET_STD])
        return image, label

    def _close_pipe(self) -> None:
        self._pipe = None
        self._count_snapshots.clear()

    def _start(self, consumed: int, checkpoint: str | None, counts: np.ndarray | None) -> None:
        self._produced = consumed
        if self.class_balanced:
            self._reader = self._reader or ShardReader(self.manifest)
            self._sampler = ClassBalancedSampler(self.manifest.presence(), self.manifest.num_classes, self.seed, self.rank)
            if counts is not None:
                self._sampler.counts[:] = counts
        self._pipe = self._build(checkpoint)

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if not self.train:
            self._close_pipe()
            self._start(0, None, None)
            for step in range(self.steps_per_epoch):
                yield self._next(epoch=0, step=step)
            self._close_pipe()
            return
        if self._pipe is None:
            self._start(self._consumed, self._restore_ckpt, self._restore_counts)
        while True:
            g = self._consumed
            batch = self._next(epoch=g // self.steps_per_epoch, step=g % self.steps_per_epoch)
            self._consumed = g + 1
            yield batch

    def _next(self, epoch: int, step: int) -> dict:
        assert self._pipe is not None
        image, label, third = self._pipe.run()
        n = self.batch_size
        img = _to_torch(image)
        lbl = _to_torch(label)
        if lbl.dim() == 4:
            lbl = lbl[..., 0]
        if self.label_map is not None:
            lut = self.label_map.to(lbl.device)
            lbl = lut[lbl.long()]
        lbl = lbl.long()
        if self.class_balanced:
            index = torch.as_tensor(np.asarray(third.as_tensor()).reshape(n), dtype=torch.int64)
            valid = torch.ones(n, dtype=torch.bool)
        else:
            keys = [json.loads(bytes(np.asarray(third[i])))["key"] for i in range(n)]
            index = torch.as_tensor([self._key_to_index[k] for k in keys], dtype=torch.int64)
            shard = (self.rank + epoch) % self.world_size
            lo, hi = shard_bounds(self.manifest.num_samples, self.world_size, shard)
            pos = step * n + np.arange(n)
            valid = torch.as_tensor(pos < (hi - lo))
        return {"image": img, "label": lbl, "valid": valid, "index": index}


def _to_torch(tl) -> torch.Tensor:
    """A dense DALI TensorList -> torch tensor (a copy: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device="cuda")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.array(tl.as_tensor()))
