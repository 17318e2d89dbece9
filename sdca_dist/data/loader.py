"""ShardLoader: one DALI pipeline for training and evaluation batches, from a shard manifest.

Every mode reads samples by manifest index (``ShardReader``: tar offsets from the manifest) and
feeds their encoded bytes to DALI through an external source; the order is ours:
- evaluation: rank r reads its contiguous part ``shard_bounds(n, W, r)`` in manifest order;
- uniform training: a FULL permutation of the set per epoch (``epoch_order``), the same on every
  rank, each rank its contiguous part of it (every sample once per epoch over the ranks; a
  reader's shuffle buffer would mix only ~1,000 neighbouring samples, so with 1-2 ranks
  batches would stay correlated with the on-disk order, i.e. with the city);
- class-balanced training: the reference's sampler (``ClassBalancedSampler``), one global draw
  sequence sliced per rank and batch.
Parts are padded to whole batches (``valid=False``) so every rank runs the same number of steps.

One augmentation graph serves every mode: decode (GPU "mixed" when CUDA is present; JPEG or PNG),
one resize for image (bicubic, as the reference's PIL transform) and label (nearest), crop, flip,
the method's photometric augmentation on images only, normalisation to NCHW float. Crops either
pad out of bounds (image 0, label 255: ``crop_policy="pad"``) or floor each sample's scale so
the scaled image covers the crop (``"fit"``: never pads; the ssl recipe, where the smallest zoom
1.0 of the 1024x512 evaluation size is exactly the 1024x512 crop).

Exact resume: every random draw is a pure function of (seed, rank, batch number) or of (seed,
draw number), so ``state_dict()`` after k batches + ``load_state_dict`` gives bitwise the same
following batches. A sample that DALI cannot decode is named: ``DataError`` "<shard>: sample
<key>: ...", one line.
"""

from __future__ import annotations

import io
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
    epoch_order,
    shard_bounds,
    steps_per_epoch,
)
from sdca_dist.data.shard_set import Manifest, ShardReader, load_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: luma weights of PIL's "L" conversion: ColorJitter's contrast blends with this grey level's mean
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_POLICIES = ("pad", "fit")
_PARAM_NAMES = ("scale", "crop_x", "crop_y", "flip", "brightness", "contrast", "saturation", "hue", "sigma")
_PHOTOMETRIC = ("brightness", "contrast", "saturation", "hue", "sigma")


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def pipeline_device_id(device: str, cuda_device: torch.device | None = None) -> int | None:
    """The GPU a DALI pipeline runs on: None for a CPU pipeline, else this rank's device.

    Every task of a node may see every GPU (the launcher asks for ``--gpus-per-node``), so GPU 0
    would carry every rank's DALI context and memory pool and each batch would cross GPUs. The
    rank's device is ``cuda_device`` (the DistContext's), else the one torch is bound to.
    """
    if device != "gpu":
        return None
    if cuda_device is not None and cuda_device.type == "cuda" and cuda_device.index is not None:
        return int(cuda_device.index)
    return torch.cuda.current_device()


def normalize(fn, types, image, mirror=0):
    """RGB uint8 HWC -> ImageNet-normalised float CHW (optionally mirrored)."""
    return fn.crop_mirror_normalize(
        image,
        mirror=mirror,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * v for v in IMAGENET_MEAN],
        std=[255 * v for v in IMAGENET_STD],
    )


def eval_image(fn, types, image, size):
    """The evaluation's image preprocessing, in ONE place for the loader's eval mode and
    ``sdca_dist.predict``: bicubic antialiased resize to ``size`` [H, W] (the reference's PIL
    bicubic), then ImageNet normalisation."""
    resized = fn.resize(image, size=list(size), interp_type=types.INTERP_CUBIC, antialias=True)
    return normalize(fn, types, resized)


def own_size_rows(label: torch.Tensor, sizes: torch.Tensor | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(batch rows, their labels at their OWN size)`` for an eval batch (see ``ShardLoader``).

    Eval labels are padded with 255 to the largest in the batch, while every image is resized to
    one size: a prediction must be upsampled to ITS label's size, never to the padded one (that
    would stretch a smaller image's prediction over padding). When every label fills the padded
    batch (one image size, e.g. Cityscapes) this is the whole batch at once; otherwise one row at
    a time. ``sizes`` int64 [B, 2] (H, W); None = the batch is uniform.
    """
    height, width = label.shape[-2:]
    if sizes is None or bool(((sizes[:, 0] == height) & (sizes[:, 1] == width)).all()):
        yield slice(0, label.shape[0]), label
        return
    for i, (h, w) in enumerate(sizes.tolist()):
        yield slice(i, i + 1), label[i : i + 1, :h, :w]


class ShardLoader:
    """Batches ``{"image": float [B,3,H,W], "label": int64 [B,H,W], "valid": bool [B], "index": int64 [B]}``.

    ``train=True`` iterates forever (epoch after epoch, reshuffled); ``train=False`` makes one
    pass. Eval labels stay at their original resolution (padded with 255 to the largest in the
    batch; ``"label_size"`` int64 [B, 2] gives each one's (H, W): use :func:`own_size_rows`) while
    images are resized to ``resize``. Training: ``resize`` (or, if None, the image's
    own size) times a random scale from ``scale_range``, then ``crop_size`` under ``crop_policy``.
    """

    def __init__(
        self,
        manifest: str | Path | Manifest,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        train: bool,
        resize: tuple[int, int] | None = None,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] | None = None,
        flip: bool = False,
        photometric: bool = False,
        class_balanced: bool = False,
        label_map: np.ndarray | None = None,
        seed: int = 0,
        num_threads: int = 2,
        device: str = "auto",
        prefetch: int = 2,
        crop_policy: str = "pad",
        cuda_device: torch.device | None = None,
    ):
        self.manifest: Manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if self.manifest.num_samples < world_size:
            raise DataError(self.manifest.path, f"{self.manifest.num_samples} samples cannot feed {world_size} ranks")
        if class_balanced and not train:
            raise ValueError("class_balanced sampling is a training mode (train=True)")
        if crop_policy not in CROP_POLICIES:
            raise ValueError(f"crop_policy must be one of {CROP_POLICIES}, got {crop_policy!r}")
        if crop_policy == "fit" and not crop_size:
            raise ValueError("crop_policy='fit' needs a crop_size")
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        self.resize = tuple(resize) if resize else None
        self.crop_size = tuple(crop_size) if crop_size else None
        self.crop_policy = crop_policy
        self.spec = AugmentSpec(tuple(scale_range) if scale_range else None, bool(flip), bool(photometric))
        self.class_balanced = class_balanced
        self.label_map = None if label_map is None else torch.as_tensor(np.asarray(label_map, dtype=np.uint8))
        if self.label_map is not None and self.label_map.numel() != 256:
            raise ValueError("label_map must be a 256-entry uint8 lookup table")
        self.seed, self.num_threads, self.prefetch = int(seed), int(num_threads), int(prefetch)
        if device == "auto":
            device = "gpu" if cuda_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
        self.device = device
        self.device_id = pipeline_device_id(device, cuda_device)
        self._lut: torch.Tensor | None = None  # label_map on the labels' device, copied once
        self.steps_per_epoch = steps_per_epoch(self.manifest.num_samples, world_size, batch_size)
        self._reader = ShardReader(self.manifest)
        self._sampler = (
            ClassBalancedSampler(self.manifest.presence(), self.manifest.num_classes, self.seed)
            if class_balanced
            else None
        )
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)
        self._consumed = 0  # batches handed out
        self._produced = 0  # batches fed to DALI (runs ahead by the prefetch depth)
        self._pipe = None
        self._source_error: BaseException | None = None

    # ------------------------------------------------------------------ order
    def batch_indices(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(manifest indices, valid) of this rank's batch ``g``: a pure function of the settings."""
        n, b = self.manifest.num_samples, self.batch_size
        if self._sampler is not None:
            start = (g * self.world_size + self.rank) * b
            return self._sampler.draws(start, start + b), np.ones(b, dtype=bool)
        epoch, step = divmod(g, self.steps_per_epoch)
        lo, hi = shard_bounds(n, self.world_size, self.rank)
        if self.train:
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, epoch_order(n, self.seed, epoch))
            mine = self._perm[1][lo:hi]
        else:
            mine = np.arange(lo, hi, dtype=np.int64)
        pos = step * b + np.arange(b)
        return mine[pos % len(mine)].astype(np.int64), pos < len(mine)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-able position: batches consumed (+ a sampler snapshot that saves regenerating draws)."""
        d: dict = {
            "batches": self._consumed,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.manifest.num_samples,
            "batch_size": self.batch_size,
        }
        if self._sampler is not None:
            d["sampler"] = self._sampler.state(self._consumed * self.world_size * self.batch_size)
        return d

    def load_state_dict(self, d: dict) -> None:
        for k in ("seed", "rank", "world_size", "num_samples", "batch_size"):
            mine = self.manifest.num_samples if k == "num_samples" else getattr(self, k)
            if k in d and d[k] != mine:
                raise ValueError(f"loader state for {k}={d[k]} does not match this loader ({mine})")
        self._pipe = None
        self._consumed = int(d["batches"])
        if self._sampler is not None and "sampler" in d:
            self._sampler.load_state(d["sampler"])

    # ------------------------------------------------------------------ pipeline
    def _param_names(self) -> list[str]:
        return [n for n in _PARAM_NAMES if n not in _PHOTOMETRIC or self.spec.photometric]

    def _external(self):
        """Callback feeding per-batch params and encoded samples in batch order."""
        names = self._param_names()

        def source():
            try:
                g = self._produced
                self._produced += 1
                p = augment_params(self.spec, self.seed, self.rank, g, self.batch_size)
                idx, _ = self.batch_indices(g)
                recs = [self._reader.read(int(i)) for i in idx]
                return tuple(
                    [p[n] for n in names]
                    + [
                        [np.frombuffer(r["image"], np.uint8) for r in recs],
                        [np.frombuffer(r["label"], np.uint8) for r in recs],
                        idx.copy(),
                    ]
                )
            except BaseException as e:  # DALI may wrap it: keep the original (a one-line DataError)
                self._source_error = e
                raise

        return source

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        names = self._param_names()
        gpu = self.device == "gpu"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=(self.seed * 7919 + self.rank) & 0x7FFFFFFF,
            prefetch_queue_depth=self.prefetch,
        )
        def pipeline():
            ext = fn.external_source(source=self._external(), num_outputs=len(names) + 3, batch=True, parallel=False)
            prm = dict(zip(names, ext[: len(names)]))
            enc_img, enc_lbl, index = ext[len(names) :]
            image, label = self._graph(fn, types, enc_img, enc_lbl, prm, gpu)
            return image, label, index

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*external source.*")  # its state is ours (batch number)
            pipe = pipeline()
            pipe.build()
        return pipe

    def _graph(self, fn, types, enc_img, enc_lbl, prm, gpu: bool):
        """The augmentation graph shared by every mode: image and label from ONE set of draws."""
        from nvidia.dali import math as dmath

        image = fn.decoders.image(enc_img, device="mixed" if gpu else "cpu", output_type=types.RGB)
        label = fn.decoders.image(enc_lbl, device="cpu", output_type=types.GRAY)  # PNG: CPU decode, byte-exact
        if gpu:
            label = label.gpu()
        if self.train:
            if self.resize is not None:
                base = types.Constant(np.asarray(self.resize, dtype=np.float32), device="cpu")
            else:
                base = fn.cast(fn.peek_image_shape(enc_img), dtype=types.FLOAT)[0:2]
            scale = prm["scale"]
            if self.crop_policy == "fit":
                # the smallest scale at which the image covers the crop (+1e-6: rounding never drops a row)
                ch, cw = (float(v) for v in self.crop_size)
                scale = dmath.max(scale, dmath.max(ch / base[0], cw / base[1]) * (1.0 + 1e-6))
            size = base * scale
            if self.resize is not None or self.spec.scale_range is not None or self.crop_policy == "fit":
                image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
                label = fn.resize(label, size=size, interp_type=types.INTERP_NN, antialias=False)
            if self.crop_size is not None:
                image = fn.crop(
                    image,
                    crop=self.crop_size,
                    crop_pos_x=prm["crop_x"],
                    crop_pos_y=prm["crop_y"],
                    out_of_bounds_policy="pad",
                    fill_values=0,
                )
                label = fn.crop(
                    label,
                    crop=self.crop_size,
                    crop_pos_x=prm["crop_x"],
                    crop_pos_y=prm["crop_y"],
                    out_of_bounds_policy="pad",
                    fill_values=255,
                )
            if self.spec.photometric:
                image = self._photometric(fn, types, dmath, image, prm, gpu)
            label = fn.flip(label, horizontal=prm["flip"])
            mirror = prm["flip"]
        else:
            label = fn.pad(label, fill_value=255)  # original resolution; sizes may differ inside a batch
            if self.resize is not None:
                return eval_image(fn, types, image, self.resize), label
            image = fn.pad(image, fill_value=0)
            mirror = 0
        return normalize(fn, types, image, mirror), label

    @staticmethod
    def _photometric(fn, types, dmath, image, prm, gpu: bool):
        """torchvision ColorJitter(0.5, 0.5, 0.5, 0.2) + grayscale + 3x3 blur, as the reference applies them.

        Brightness and contrast as torchvision/PIL define them: ``b * (m + c * (x - m))`` with m the
        mean grey level of the image (DALI's own contrast pivots on 128, mid-range). Saturation
        blends with the per-pixel grey level (``color_twist`` in YIQ: the same up to rounding); hue
        is DALI's rotation about the grey axis (torchvision shifts HSV hue: see
        docs/differences.md). Written as arithmetic so it runs on the GPU, where DALI takes no tensor
        arguments from GPU data.
        """
        b, c = prm["brightness"], prm["contrast"]
        if gpu:
            b, c = b.gpu(), c.gpu()
        x = fn.cast(image, dtype=types.FLOAT)
        mean_rgb = fn.reductions.mean(x, axes=[0, 1])
        m = mean_rgb[0] * GRAY_WEIGHTS[0] + mean_rgb[1] * GRAY_WEIGHTS[1] + mean_rgb[2] * GRAY_WEIGHTS[2]
        x = dmath.clamp(x * (b * c) + m * (b * (1.0 - c)), 0.0, 255.0)
        image = fn.cast(x, dtype=types.UINT8)  # DALI's cast rounds to nearest
        image = fn.color_twist(image, saturation=prm["saturation"], hue=prm["hue"])
        return fn.gaussian_blur(image, window_size=3, sigma=prm["sigma"])

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if not self.train:
            self._start(0)
            try:
                for step in range(self.steps_per_epoch):
                    yield self._next(step)
            finally:
                self._pipe = None
            return
        if self._pipe is None:
            self._start(self._consumed)
        while True:
            g = self._consumed
            batch = self._next(g)
            self._consumed = g + 1
            yield batch

    def _start(self, first_batch: int) -> None:
        self._produced = first_batch
        self._source_error = None
        self._pipe = self._build()

    def _next(self, g: int) -> dict:
        assert self._pipe is not None
        try:
            image, label, index = self._pipe.run()
        except Exception as e:
            self._pipe = None
            raise self._explain(g, e) from None
        n = self.batch_size
        img = _to_torch(image)
        lbl = _to_torch(label)
        if lbl.dim() == 4:
            lbl = lbl[..., 0]
        if self.label_map is not None:
            if self._lut is None or self._lut.device != lbl.device:
                self._lut = self.label_map.to(lbl.device)
            lbl = self._lut[lbl.long()]
        lbl = lbl.long()
        want, valid = self.batch_indices(g)
        got = np.asarray(index.as_tensor()).reshape(n)
        assert np.array_equal(got, want), f"loader order out of step at batch {g}"
        valid = torch.as_tensor(valid)
        if not bool(valid.all()):  # padding samples carry no label: no consumer can count them by mistake
            lbl[~valid.to(lbl.device)] = 255
        batch = {"image": img, "label": lbl, "valid": valid, "index": torch.as_tensor(got, dtype=torch.int64)}
        if not self.train:  # image and label sizes are equal in a shard set (packing checks it)
            wh = [self.manifest.samples[int(i)]["size"] for i in got]
            batch["label_size"] = torch.tensor([[h, w] for w, h in wh], dtype=torch.int64)
        return batch

    def _explain(self, g: int, err: Exception) -> Exception:
        """The one-line error for a failed batch: the sample (shard + key) that does not decode."""
        if isinstance(self._source_error, DataError):
            return self._source_error
        for batch in range(g, max(self._produced, g + 1)):
            for i in self.batch_indices(batch)[0]:
                problem = self._undecodable(int(i))
                if problem:
                    rec = self.manifest.samples[int(i)]
                    shard = self.manifest.folder / self.manifest.shards[rec["shard"]]["name"]
                    return DataError(shard, f"sample {rec['key']!r}: {problem}")
        return err

    def _undecodable(self, i: int) -> str | None:
        """Why sample i's image or label does not decode (PIL), or None."""
        from PIL import Image

        try:
            rec = self._reader.read(i)
        except DataError as e:
            return e.problem
        for member, ext in (("image", rec["image_ext"]), ("label", "png")):
            try:
                with Image.open(io.BytesIO(rec[member])) as im:
                    im.load()
            except Exception as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if msg.startswith("cannot identify image file"):
                    msg = "not a recognisable image"
                return f"{member} ({rec['key']}.{ext}) does not decode: {msg}"
        return None


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
