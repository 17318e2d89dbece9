"""``python -m sdca_dist.bench loader``: images/s of shards + DALI vs PIL-from-PNG in a torch DataLoader.

Both loaders: same synthetic GTA5-style data (generated into a temp dir), same batch size, same
worker/thread count, same process and machine, same augmentations:
  decode+resize: decode image + label, resize (linear / nearest), normalise;
  full: + random scale, crop (label pad 255), flip, colour jitter, grayscale, 3x3 blur.
Prints both rates per mode; the last line is the smaller of the two speedups. ``--image-format png``
stores the images losslessly (the Cityscapes default) instead of JPEG q90: the cost of pixel-exact
images on the DALI side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from sdca_dist.arguments import int_at_least, parser, size_wh
from sdca_dist.data.layouts import list_pairs, read_label
from sdca_dist.data.loader import IMAGENET_MEAN, IMAGENET_STD, ShardLoader
from sdca_dist.data.packing import PackOptions, pack
from sdca_dist.data.sampling import AugmentSpec, augment_params
from sdca_dist.synth import SynthConfig, generate


class PilPngDataset(torch.utils.data.Dataset):
    """The baseline: original PNG files, PIL decode, the same augmentations in PIL/NumPy."""

    def __init__(self, root: Path, resize: tuple[int, int], crop: tuple[int, int] | None, spec: AugmentSpec):
        self.pairs = list_pairs("gta5", root)
        self.resize, self.crop, self.spec = resize, crop, spec
        self.mean = np.array(IMAGENET_MEAN, np.float32) * 255
        self.std = np.array(IMAGENET_STD, np.float32) * 255

    def __len__(self) -> int:
        return 10**9  # sampled with replacement by index modulo, like an infinite training stream

    def __getitem__(self, i: int):
        pair = self.pairs[i % len(self.pairs)]
        p = {k: v[0] for k, v in augment_params(self.spec, 0, 0, i, 1).items()}
        img = Image.open(pair.image).convert("RGB")
        lbl, _ = read_label("gta5", pair.label)
        lab = Image.fromarray(lbl)
        h, w = self.resize
        h, w = int(round(h * p["scale"])), int(round(w * p["scale"]))
        img = img.resize((w, h), Image.BILINEAR)
        lab = lab.resize((w, h), Image.NEAREST)
        if self.crop is not None:
            ch, cw = self.crop
            x0 = int(round(p["crop_x"] * (w - cw)))
            y0 = int(round(p["crop_y"] * (h - ch)))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))  # PIL pads out-of-bounds with 0
            lab_arr = np.full((ch, cw), 255, np.uint8)
            la = np.asarray(lab)
            ys, xs = max(0, y0), max(0, x0)
            ye, xe = min(h, y0 + ch), min(w, x0 + cw)
            lab_arr[ys - y0 : ye - y0, xs - x0 : xe - x0] = la[ys:ye, xs:xe]
            lab = Image.fromarray(lab_arr)
        if self.spec.photometric:
            img = ImageEnhance.Brightness(img).enhance(float(p["brightness"]))
            img = ImageEnhance.Contrast(img).enhance(float(p["contrast"]))
            img = ImageEnhance.Color(img).enhance(float(p["saturation"]))
            hsv = np.asarray(img.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(p["hue"] / 360 * 255)) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
            img = img.filter(ImageFilter.GaussianBlur(radius=float(p["sigma"])))
        if p["flip"]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lab = lab.transpose(Image.FLIP_LEFT_RIGHT)
        x = (np.asarray(img, np.float32) - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(np.asarray(lab).astype(np.int64))


def _rate(batches, n_batches: int, batch_size: int, warmup: int = 2) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    ap = parser("python -m sdca_dist.bench loader")
    ap.add_argument("--images", type=int_at_least(1), default=48)
    ap.add_argument("--size", type=size_wh(8), default=(1024, 512), help="WxH of the generated source images")
    ap.add_argument("--batch-size", type=int_at_least(1), default=8)
    ap.add_argument("--threads", type=int_at_least(1), default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batches", type=int_at_least(1), default=12)
    ap.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg", help="how the shards store images")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    w, h = a.size
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        generate(
            tmp / "raw",
            SynthConfig(
                seed=0,
                num_source=a.images,
                num_target_train=0,
                num_target_val=0,
                source_size=(w, h),
                synthia_size=(32, 16),
            ),
        )
        m = pack(
            PackOptions(
                layout="gta5",
                root=tmp / "raw" / "gta5",
                out=tmp / "shards",
                workers=a.threads,
                image_format=a.image_format,
                progress=False,
            )
        )
        mb = sum(s["bytes"] for s in m.shards) / 1e6
        print(
            f"data: {a.images} GTA5-style PNGs {w}x{h} -> {len(m.shards)} shard(s), {a.image_format}, {mb:.1f} MB, "
            f"in {time.time() - t0:.1f}s; "
            f"batch {a.batch_size}, {a.threads} DALI threads / DataLoader workers, {a.batches} timed batches"
        )
        modes = {
            "decode+resize": dict(resize=(h // 2, w // 2), crop=None, spec=AugmentSpec()),
            "full augmentation": dict(
                resize=(h // 2, w // 2), crop=(h // 4, w // 4), spec=AugmentSpec((0.5, 1.5), True, True)
            ),
        }
        speedups = {}
        for name, mode in modes.items():
            dali = ShardLoader(
                m.path,
                a.batch_size,
                train=True,
                resize=mode["resize"],
                crop_size=mode["crop"],
                scale_range=mode["spec"].scale_range,
                flip=mode["spec"].flip,
                photometric=mode["spec"].photometric,
                num_threads=a.threads,
                device="cpu",
            )
            r_dali = _rate(dali, a.batches, a.batch_size)
            ds = PilPngDataset(tmp / "raw" / "gta5", mode["resize"], mode["crop"], mode["spec"])
            dl = torch.utils.data.DataLoader(
                ds,
                batch_size=a.batch_size,
                num_workers=a.threads,
                shuffle=False,
                persistent_workers=False,
                prefetch_factor=2,
            )
            r_pil = _rate(dl, a.batches, a.batch_size)
            speedups[name] = r_dali / r_pil
            print(
                f"{name}: shards+DALI {r_dali:.1f} img/s, PIL+DataLoader {r_pil:.1f} img/s, "
                f"ratio {speedups[name]:.2f}x",
                flush=True,
            )
            del dali, dl
        for name, s in speedups.items():
            print(f"speedup ({name}): {s:.2f}x")
        print(f"speedup: {min(speedups.values()):.2f}x")
    return 0
