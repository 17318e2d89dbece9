"""ShardLoader (real DALI, CPU): byte-exact labels, alignment, exactly-once over ranks, class balance, resume."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import write_colour_set
from PIL import Image

from sdca_dist.classes import CITYSCAPES_PALETTE, colorize, target_label_map
from sdca_dist.data.loader import IMAGENET_MEAN, IMAGENET_STD, ShardLoader
from sdca_dist.data.shard_set import ShardReader, ShardWriter, load_manifest, write_manifest

AUG = dict(resize=(40, 64), crop_size=(32, 48), scale_range=(0.5, 1.5), flip=True)


def _labels(manifest) -> dict[int, np.ndarray]:
    r = ShardReader(manifest)
    return {i: np.asarray(Image.open(io.BytesIO(r.read(i)["label"]))) for i in range(len(r))}


def test_eval_labels_byte_exact_and_each_sample_once(shard_sets):
    m = shard_sets["cityscapes_val"]
    want = _labels(m)
    seen = []
    loader = ShardLoader(m, 4, train=False, resize=(16, 32), device="cpu", num_threads=1)
    for b in loader:
        assert b["image"].shape[1:] == (3, 16, 32) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64
        for j in range(4):
            if b["valid"][j]:
                i = int(b["index"][j])
                seen.append(i)
                assert np.array_equal(b["label"][j].numpy().astype(np.uint8), want[i])  # original resolution
    assert sorted(seen) == list(range(len(want)))


def test_padding_samples_carry_no_label(shard_sets):
    """The loader masks the samples that pad the last batch, so no consumer (dist_init's
    estimator, evaluation) has to mask them by hand, and none can forget to."""
    m = shard_sets["gta5"]  # 14 samples, batch 4 over 1 rank: the last batch has 2 padding samples
    batches = list(ShardLoader(m, 4, train=False, resize=(16, 32), device="cpu", num_threads=1))
    padded = [(b, j) for b in batches for j in range(4) if not b["valid"][j]]
    assert padded, "the set no longer needs padding: pick a batch size that does not divide it"
    for b, j in padded:
        assert bool((b["label"][j] == 255).all())
    assert all(bool((b["label"][j] != 255).any()) for b in batches for j in range(4) if b["valid"][j])


def test_label_map_is_applied(shard_sets):
    m = shard_sets["cityscapes_val"]
    lut = target_label_map(16)
    want = _labels(m)
    b = next(iter(ShardLoader(m, 2, train=False, label_map=lut, device="cpu", num_threads=1)))
    assert np.array_equal(b["label"][0].numpy(), lut[want[int(b["index"][0])]].astype(np.int64))


@pytest.mark.parametrize("world", [2, 3])
def test_exactly_once_per_epoch_across_ranks(shard_sets, world):
    m = shard_sets["gta5"]  # 14 samples over several shards, batch 3 divides neither
    n = load_manifest(m).num_samples
    for train in (False, True):
        per_epoch = [Counter() for _ in range(2)]
        steps = set()
        for rank in range(world):
            loader = ShardLoader(
                m,
                3,
                rank=rank,
                world_size=world,
                train=train,
                device="cpu",
                num_threads=1,
                seed=5,
                **(AUG if train else {"resize": (16, 32)}),
            )
            steps.add(loader.steps_per_epoch)
            it = iter(loader)
            for epoch in range(2 if train else 1):
                for _ in range(loader.steps_per_epoch):
                    b = next(it)
                    per_epoch[epoch].update(int(i) for i, v in zip(b["index"], b["valid"]) if v)
            if not train:
                with pytest.raises(StopIteration):
                    next(it)
        assert len(steps) == 1
        for epoch in range(2 if train else 1):
            assert sorted(per_epoch[epoch].elements()) == list(range(n)), (train, epoch)


def _class_of_colour(img: torch.Tensor) -> np.ndarray:
    """Denormalise a [3,H,W] image and map every pixel to the nearest palette colour (255 = black)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    rgb = (img * std + mean).permute(1, 2, 0).numpy()
    pal = np.concatenate([CITYSCAPES_PALETTE.astype(np.float64), [[0, 0, 0]]])
    d = ((rgb[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    cls = d.argmin(-1)
    return np.where(cls == 19, 255, cls)


def test_image_and_label_stay_aligned_after_augmentation(tmp_path):
    m = write_colour_set(tmp_path / "colour", n=10, size_hw=(48, 80))
    loader = ShardLoader(
        m,
        5,
        train=True,
        resize=(48, 80),
        crop_size=(40, 56),
        scale_range=(0.6, 1.6),
        flip=True,
        seed=1,
        device="cpu",
        num_threads=1,
    )
    it = iter(loader)
    for _ in range(4):
        b = next(it)
        for j in range(5):
            lbl = b["label"][j].numpy()
            cls = _class_of_colour(b["image"][j])
            # away from class edges (where linear resizing mixes colours) colour and label must agree;
            # a flip, crop or scale applied differently to the two would break this almost everywhere
            pad = np.pad(lbl, 1, mode="edge")
            interior = np.ones_like(lbl, dtype=bool)
            for dy in range(3):
                for dx in range(3):
                    interior &= pad[dy : dy + lbl.shape[0], dx : dx + lbl.shape[1]] == lbl
            agree = (cls[interior] == lbl[interior]).mean()
            assert interior.mean() > 0.5 and agree > 0.99, (interior.mean(), agree)
            assert (cls == lbl).mean() > 0.8
            assert set(np.unique(lbl)) <= set(range(19)) | {255}  # nearest: never interpolated ids


@pytest.mark.parametrize("flip", [True, False])
def test_flips_are_seen_in_the_pixels(tmp_path, flip):
    """At the stored size with no crop or scale, every training sample is a stored label or its
    mirror image, with the image mirrored with it. flip=True mirrors some and not others (24 valid
    samples: all alike has probability 2**-23); flip=False mirrors none (the control)."""
    m = write_colour_set(tmp_path / "colour", n=6, size_hw=(48, 80))
    common = dict(resize=(48, 80), seed=3, device="cpu", num_threads=1)
    stored = [lbl.numpy() for b in ShardLoader(m, 6, train=False, **common) for lbl in b["label"]]
    assert len(stored) == 6
    loader = ShardLoader(m, 4, train=True, flip=flip, **common)
    it = iter(loader)
    kinds = []
    for _ in range(8):
        b = next(it)
        for img, lbl, valid in zip(b["image"], b["label"], b["valid"]):
            if not valid:  # the padding of an epoch's last batch
                continue
            lbl = lbl.numpy()
            plain = any(np.array_equal(lbl, s) for s in stored)
            mirrored = any(np.array_equal(lbl, s[:, ::-1]) for s in stored)
            assert plain or mirrored, "a sample is neither a stored label nor its mirror"
            kinds.append("mirrored" if mirrored and not plain else "plain")
            # the image went with its label (a random blocky label and its mirror agree on ~10%)
            assert (_class_of_colour(img) == lbl).mean() > 0.8
    if flip:
        assert 0 < kinds.count("mirrored") < len(kinds), kinds
    else:
        assert kinds.count("mirrored") == 0, kinds


def test_class_balanced_raises_rare_class_frequency(tmp_path):
    """40 images: classes 0-2 everywhere, class 18 in only 2 images (5%)."""
    w = ShardWriter(tmp_path, prefix="cb", shard_size=50_000, num_classes=19)
    for i in range(40):
        label = np.zeros((8, 8), np.uint8)
        label[:, 3:] = 1
        label[:, 6:] = 2
        if i in (7, 29):
            label[:2, :2] = 18
        buf = io.BytesIO()
        Image.fromarray(colorize(label)).save(buf, format="PNG")
        w.add(f"k{i}", buf.getvalue(), "img.png", label, {"path": f"{i}.png"})
    m = write_manifest(tmp_path, w.close(), 19)

    def share(balanced: bool) -> float:
        loader = ShardLoader(m.path, 4, train=True, class_balanced=balanced, seed=2, device="cpu", num_threads=1)
        it = iter(loader)
        idx = [int(i) for _ in range(20) for i in next(it)["index"]]
        return float(np.mean([18 in m.samples[i]["classes"] for i in idx]))

    uniform, balanced = share(False), share(True)
    assert uniform == pytest.approx(0.05, abs=0.001)  # 20 batches of 4 = two epochs, each image twice
    assert balanced > 0.15, (uniform, balanced)  # ~1/4 of the draws pick the rare class


@pytest.mark.parametrize("balanced", [False, True])
def test_resume_is_bitwise_exact(shard_sets, balanced):
    m = shard_sets["gta5"]
    kw = dict(train=True, seed=11, photometric=True, class_balanced=balanced, device="cpu", num_threads=1, **AUG)
    ref = ShardLoader(m, 3, **kw)
    it = iter(ref)
    k = ref.steps_per_epoch + 1  # the checkpoint falls after an epoch boundary
    for _ in range(k):
        next(it)
    state = ref.state_dict()
    want = [next(it) for _ in range(4)]
    again = ShardLoader(m, 3, **kw)
    again.load_state_dict(state)
    it2 = iter(again)
    for w in want:
        g = next(it2)
        for key in ("image", "label", "valid", "index"):
            assert torch.equal(w[key], g[key]), key
    # a different seed really changes the stream (the check above can fail)
    other = ShardLoader(m, 3, **{**kw, "seed": 12})
    assert not torch.equal(next(iter(other))["image"], next(iter(ShardLoader(m, 3, **kw)))["image"])


def _no_void_set(tmp_path, size_hw=(48, 80), n=6):
    """Labels without 255 anywhere: any 255 in a batch was introduced by padding."""
    from sdca_dist.data.shard_set import ShardWriter, write_manifest

    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, prefix="nv", shard_size=1 << 20, num_classes=19)
    for i in range(n):
        label = np.kron(rng.integers(0, 19, (size_hw[0] // 8, size_hw[1] // 8)), np.ones((8, 8))).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(colorize(label)).save(buf, format="PNG")
        w.add(f"nv{i}", buf.getvalue(), "img.png", label, {"path": f"{i}.png"})
    return write_manifest(tmp_path, w.close(), 19).path


@pytest.mark.parametrize("policy,scale", [("fit", (0.5, 1.5)), ("fit", (0.2, 0.9)), ("pad", (0.2, 0.9))])
def test_ssl_crop_of_the_original_never_pads(tmp_path, policy, scale):
    """The reference's ssl recipe: scale the ORIGINAL image, crop half its size, never pad
    (crop_policy="fit" floors the scale where the image would not cover the crop)."""
    m = _no_void_set(tmp_path)
    loader = ShardLoader(
        m,
        3,
        train=True,
        resize=None,
        crop_size=(24, 40),
        scale_range=scale,
        flip=True,
        photometric=True,
        crop_policy=policy,
        seed=4,
        device="cpu",
        num_threads=1,
    )
    it = iter(loader)
    void = [float((next(it)["label"] == 255).float().mean()) for _ in range(4)]
    if policy == "fit":
        assert max(void) == 0.0, void
    else:  # "pad" with scales below the crop: padded pixels
        assert max(void) > 0.05, void


def _photometric_once(img: np.ndarray, b: float, c: float) -> np.ndarray:
    """ShardLoader's photometric graph on one image with saturation 1, hue 0, a negligible blur."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [img], batch=True)

        def const(v):  # no parameters: DALI would pass the iteration to a callback that takes one
            return lambda: [np.float32(v)]

        prm = {
            k: fn.external_source(source=const(v), batch=True)
            for k, v in dict(brightness=b, contrast=c, saturation=1.0, hue=0.0, sigma=0.1).items()
        }
        return ShardLoader._photometric(fn, types, dmath, x, prm, gpu=False)

    p = pipe()
    p.build()
    return np.asarray(p.run()[0].as_tensor())[0].astype(np.float64)


def test_contrast_pivots_on_the_image_mean_as_torchvision():
    """torchvision/PIL ColorJitter: brightness blends with black, contrast with the mean grey level
    (DALI's color_twist pivots on 128: up to ~10 grey levels off on a dark image)."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(1)
    img = np.asarray(Image.fromarray(rng.integers(0, 120, (6, 10, 3)).astype(np.uint8)).resize((80, 48)))
    for b, c in ((1.3, 0.6), (0.7, 1.4), (1.0, 0.5)):
        pil = ImageEnhance.Contrast(ImageEnhance.Brightness(Image.fromarray(img)).enhance(b)).enhance(c)
        diff = np.abs(_photometric_once(img, b, c) - np.asarray(pil, np.float64))
        # PIL truncates after each blend (about one grey level low); a pivot at 128 is ~20-35 levels off here
        assert diff.mean() < 1.5 and diff.max() <= 3, (b, c, diff.mean(), diff.max())


def test_image_resize_is_bicubic_as_the_reference(tmp_path):
    """Eval and train resize images with a bicubic filter (PIL BICUBIC in the reference), labels nearest."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (60, 100, 3)).astype(np.uint8)
    w = ShardWriter(tmp_path, prefix="bc", shard_size=1 << 20, num_classes=19)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    w.add("bc0", buf.getvalue(), "img.png", np.zeros((60, 100), np.uint8), {"path": "0.png"})
    m = write_manifest(tmp_path, w.close(), 19).path
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    for size in ((24, 40), (90, 150)):
        b = next(iter(ShardLoader(m, 1, train=False, resize=size, device="cpu", num_threads=1)))
        got = (b["image"][0] * std + mean).permute(1, 2, 0).numpy()
        diff = {
            f: np.abs(got - np.asarray(Image.fromarray(img).resize(size[::-1], f), np.float64)).mean()
            for f in (Image.BICUBIC, Image.BILINEAR)
        }
        assert diff[Image.BICUBIC] < 0.6 * diff[Image.BILINEAR], (size, diff)


@pytest.mark.parametrize("member", ["label", "image"])
@pytest.mark.parametrize("train", [False, True])
def test_corrupt_sample_names_its_shard_and_key(tmp_path, member, train):
    from sdca_dist.data.errors import DataError

    m = load_manifest(write_colour_set(tmp_path / "c", n=10, size_hw=(48, 80)))
    rec = m.samples[6]
    shard = m.folder / m.shards[rec["shard"]]["name"]
    off, size = rec[member]
    with open(shard, "r+b") as f:  # damage the middle of the member's PNG data
        f.seek(off + size // 2)
        f.write(b"\xff" * 16)
    loader = ShardLoader(m, 4, train=train, resize=(24, 40), device="cpu", num_threads=1, seed=1)
    with pytest.raises(DataError) as e:
        it = iter(loader)
        for _ in range(2 * loader.steps_per_epoch):
            next(it)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and shard.name in msg and repr(rec["key"]) in msg and member in msg, msg


def test_truncated_shard_names_the_shard(tmp_path):
    from sdca_dist.data.errors import DataError

    m = load_manifest(write_colour_set(tmp_path / "t", n=6, size_hw=(32, 48)))
    shard = m.folder / m.shards[-1]["name"]
    with open(shard, "r+b") as f:
        f.truncate(600)
    with pytest.raises(DataError, match="truncated") as e:
        for _ in ShardLoader(m, 3, train=False, resize=(16, 24), device="cpu", num_threads=1):
            pass
    assert shard.name in str(e.value) and len(str(e.value).splitlines()) == 1


def test_gpu_pipeline_runs_on_the_ranks_device_not_gpu_0(shard_sets):
    """Rank 3 of a node whose tasks all see every GPU must decode on cuda:3 (its DistContext
    device). The pipeline is built lazily, so its device is checked without a GPU."""
    from sdca_dist.data.loader import pipeline_device_id

    m = shard_sets["cityscapes_val"]
    rank3 = torch.device("cuda", 3)
    assert ShardLoader(m, 2, train=False, device="gpu", cuda_device=rank3).device_id == 3
    assert ShardLoader(m, 2, train=False, device="cpu", cuda_device=rank3).device_id is None
    assert pipeline_device_id("gpu", torch.device("cuda", 5)) == 5
    assert pipeline_device_id("cpu", torch.device("cuda", 5)) is None
