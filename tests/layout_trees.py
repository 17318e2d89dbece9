"""Small generated data sets in the layouts of the field's benchmarks and of a user's own folders.

Each writer lays out a few random images with random labels in one data set's published tree
and label encoding, and returns the trainIds every label must become: the expected maps are
computed here from the data sets' own descriptions (written out by hand below), not from
``sdca_dist.classes``, so a wrong table in the package fails the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Cityscapes label id -> trainId for the ids the trees use (cityscapesscripts' labels.py)
CS_IDS = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18, 0: 255, 1: 255, 4: 255}
#: Mapillary Vistas v1.2 id -> Cityscapes trainId for the ids the trees use (docs/datasets.md)
MAPILLARY_IDS = {13: 0, 15: 1, 17: 2, 27: 10, 55: 13, 52: 18, 8: 255, 65: 255, 63: 255}

#: the 5-class classes file the folder tests use; label values: grey levels
FIVE_CLASSES = """\
classes:
  - {name: road, color: [128, 64, 128], values: [1]}
  - {name: sidewalk, color: [244, 35, 232], values: [2]}
  - {name: building, color: [70, 70, 70], values: [3]}
  - {name: nature, color: [107, 142, 35], values: [9, 10]}
  - {name: vehicle, color: [0, 0, 142], values: [14, 15]}
ignore: [0, 255]
"""
FIVE_VALUES = {1: 0, 2: 1, 3: 2, 9: 3, 10: 3, 14: 4, 15: 4, 0: 255, 255: 255}


def _pick(rng, table: dict[int, int], h: int, w: int) -> np.ndarray:
    ids = np.array(sorted(table), dtype=np.uint8)
    cells = rng.choice(ids, size=(h // 4 + 1, w // 4 + 1))
    return np.kron(cells, np.ones((4, 4), np.uint8))[:h, :w].astype(np.uint8)


def _expect(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, 255, np.uint8)
    for k, v in table.items():
        out[ids == k] = v
    return out


def _image(rng, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def acdc_tree(root: Path, seed: int = 0, size=(24, 40)) -> dict[str, np.ndarray]:
    """``rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png`` + ``gt/.../*_gt_labelIds.png``; {rel image: trainIds}."""
    rng = np.random.default_rng(seed)
    h, w = size
    want = {}
    for cond, seq in (("fog", "GOPR0475"), ("night", "GOPR0351")):
        for split, n in (("train", 2), ("val", 1)):
            for i in range(n):
                stem = f"{seq}_frame_{i:06d}"
                img = root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png"
                lbl = root / "gt" / cond / split / seq / f"{stem}_gt_labelIds.png"
                img.parent.mkdir(parents=True, exist_ok=True)
                lbl.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, h, w).save(img)
                ids = _pick(rng, CS_IDS, h, w)
                Image.fromarray(ids, mode="L").save(lbl)
                # the data set also ships trainIds and colours beside the ids: never read as pairs
                Image.fromarray(_expect(ids, CS_IDS), mode="L").save(lbl.with_name(f"{stem}_gt_labelTrainIds.png"))
                want[img.relative_to(root).as_posix()] = _expect(ids, CS_IDS)
    # the reference images of the same scenes (train_ref) are not part of the split
    ref = root / "rgb_anon" / "fog" / "train_ref" / "GOPR0475"
    ref.mkdir(parents=True)
    _image(rng, h, w).save(ref / "GOPR0475_frame_000000_ref_rgb_anon.png")
    return want


def dark_zurich_tree(root: Path, seed: int = 0, size=(24, 40)) -> dict[str, np.ndarray | None]:
    """Unlabelled ``rgb_anon/train/<time>/<seq>/*_rgb_anon.png``, labelled val (night); {rel: trainIds or None}."""
    rng = np.random.default_rng(seed)
    h, w = size
    want: dict[str, np.ndarray | None] = {}
    for time, seq, n in (("day", "GOPR0227", 2), ("night", "GOPR0364", 3), ("twilight", "GOPR0348", 1)):
        d = root / "rgb_anon" / "train" / time / seq
        d.mkdir(parents=True)
        for i in range(n):
            img = d / f"{seq}_frame_{i:06d}_rgb_anon.png"
            _image(rng, h, w).save(img)
            want[img.relative_to(root).as_posix()] = None
    for i in range(2):
        stem = f"GOPR0356_frame_{i:06d}"
        img = root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png"
        lbl = root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lbl.parent.mkdir(parents=True, exist_ok=True)
        _image(rng, h, w).save(img)
        ids = _pick(rng, CS_IDS, h, w)
        Image.fromarray(ids, mode="L").save(lbl)
        want[img.relative_to(root).as_posix()] = _expect(ids, CS_IDS)
    return want


def bdd100k_tree(root: Path, seed: int = 0, size=(24, 40)) -> dict[str, np.ndarray]:
    """``images/10k/<split>/*.jpg`` + ``labels/sem_seg/masks/<split>/*.png`` (trainIds as stored)."""
    rng = np.random.default_rng(seed)
    h, w = size
    want = {}
    for split, n in (("train", 3), ("val", 1)):
        (root / "images" / "10k" / split).mkdir(parents=True)
        (root / "labels" / "sem_seg" / "masks" / split).mkdir(parents=True)
        for i in range(n):
            stem = f"{7 + i:04x}d1b4-{split}"
            img = root / "images" / "10k" / split / f"{stem}.jpg"
            _image(rng, h, w).save(img, quality=95)
            ids = _pick(rng, {**{k: k for k in range(19)}, 255: 255}, h, w)
            Image.fromarray(ids, mode="L").save(root / "labels" / "sem_seg" / "masks" / split / f"{stem}.png")
            want[img.relative_to(root).as_posix()] = ids.copy()
    return want


def mapillary_tree(root: Path, seed: int = 0, size=(24, 40), v12_folder: bool = False) -> dict[str, np.ndarray]:
    """``training|validation/images/*.jpg`` + ``.../labels/*.png`` (palette PNGs, index = v1.2 class id);
    ``v12_folder``: the labels under ``.../v1.2/labels`` as the v1.2 + v2.0 release ships them."""
    rng = np.random.default_rng(seed)
    h, w = size
    want = {}
    for part, n in (("training", 3), ("validation", 1)):
        lbl_dir = root / part / ("v1.2/labels" if v12_folder else "labels")
        (root / part / "images").mkdir(parents=True)
        lbl_dir.mkdir(parents=True)
        for i in range(n):
            stem = f"-{i}x{seed}Ab_cD{part[:3]}"
            img = root / part / "images" / f"{stem}.jpg"
            _image(rng, h, w).save(img, quality=95)
            ids = _pick(rng, MAPILLARY_IDS, h, w)
            im = Image.fromarray(ids, mode="P")
            im.putpalette(list(rng.integers(0, 256, size=768, dtype=np.uint8)))  # colours must not matter
            im.save(lbl_dir / f"{stem}.png")
            want[img.relative_to(root).as_posix()] = _expect(ids, MAPILLARY_IDS)
    return want


def folder_tree(
    root: Path,
    split: str,
    n: int,
    seed: int = 0,
    size=(24, 40),
    labelled: bool = True,
    suffixes=(".png", ".jpg"),
) -> dict[str, np.ndarray | None]:
    """A user's ``images/<split>/**`` (sub-folders, mixed suffixes) and grey ``labels/<split>/**.png``
    with the label values of ``FIVE_CLASSES``; {rel image: class ids or None}."""
    rng = np.random.default_rng(seed)
    h, w = size
    want: dict[str, np.ndarray | None] = {}
    for i in range(n):
        sub = f"cam{i % 2}"
        suffix = suffixes[i % len(suffixes)]
        img = root / "images" / split / sub / f"img.{i:03d}{suffix}"
        img.parent.mkdir(parents=True, exist_ok=True)
        _image(rng, h, w).save(img)
        if labelled:
            ids = _pick(rng, FIVE_VALUES, h, w)
            lbl = root / "labels" / split / sub / f"img.{i:03d}.png"
            lbl.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, mode="L").save(lbl)
            want[img.relative_to(root).as_posix()] = _expect(ids, FIVE_VALUES)
        else:
            want[img.relative_to(root).as_posix()] = None
    return want
