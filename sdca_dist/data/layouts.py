"""Dataset layouts on disk -> (image, label) pairs, and label files -> trainId arrays.

Label ids map to trainIds exactly once, here: GTA5, Cityscapes, ACDC and Dark Zurich through the
cityscapesscripts table (19 classes), SYNTHIA through its 16-class table, BDD100K as stored (its
masks hold trainIds), Mapillary Vistas through its 66 -> 19 table, a user's ``folder`` through
the classes file (``sdca_dist.classes.load_classes``). Ids outside a dataset's table are counted;
by default such a label is an error (a corrupt or foreign file), optionally mapped to ignore.
Every problem is a ``DataError`` naming the file.

A pair without a label (``SamplePair.label is None``) belongs to an unlabelled split: Dark
Zurich's train set, a ``folder`` split without ``labels/<split>``. docs/datasets.md describes
every layout's tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sdca_dist.classes import (
    BDD100K_KNOWN_IDS,
    CITYSCAPES_ID_TO_TRAINID,
    MAPILLARY_ID_TO_TRAINID,
    MAPILLARY_KNOWN_IDS,
    SYNTHIA_ID_TO_TRAINID16,
    SYNTHIA_KNOWN_IDS,
    ClassTable,
    lookup_table,
)
from sdca_dist.data.errors import DataError
from sdca_dist.data.png16 import read_png16_rgb


@dataclass(frozen=True)
class SamplePair:
    key: str  # unique within a set, no dots (WebDataset splits names at the first dot)
    image: Path
    label: Path | None  # None: an unlabelled split
    rel: str  # image path relative to the dataset root (recorded in key.json as "path")


@dataclass(frozen=True)
class Layout:
    name: str
    num_classes: int
    known_ids: frozenset[int]
    lut: np.ndarray  # 256-entry (or 65536 for SYNTHIA) id -> trainId
    list_pairs: Callable[[Path, str, tuple[str, ...]], list[SamplePair]]  # (root, split, conditions)
    read_ids: Callable[[Path], np.ndarray]
    #: values of ``--condition`` (ACDC's weather, Dark Zurich's time of day); empty: none
    conditions: tuple[str, ...] = ()
    #: the splits it has; empty: any folder name (the folder layout)
    splits: tuple[str, ...] = ("train", "val")
    #: the table behind a ``folder`` layout (its manifest records it)
    classes: ClassTable | None = None


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        raise DataError(path, "input folder is missing")
    if not any(path.iterdir()):
        raise DataError(path, "input folder is empty")


def _pair_by_stem(
    images: dict[str, Path], labels: dict[str, Path], root: Path, img_dir: Path, pattern: str = "*.png"
) -> list[SamplePair]:
    if not images:  # an empty dataset is an error, never a 0-sample shard set
        raise DataError(img_dir, f"input folder holds no {pattern} images")
    for stem in sorted(images.keys() - labels.keys()):
        raise DataError(images[stem], "image without label")
    for stem in sorted(labels.keys() - images.keys()):
        raise DataError(labels[stem], "label without image")
    return [
        SamplePair(_key(stem), images[stem], labels[stem], images[stem].relative_to(root).as_posix())
        for stem in sorted(images)
    ]


def _key(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _gta5_pairs(root: Path, split: str) -> list[SamplePair]:
    img_dir, lbl_dir = root / "images", root / "labels"
    _require_dir(img_dir)
    _require_dir(lbl_dir)
    return _pair_by_stem(
        {p.stem: p for p in img_dir.glob("*.png")}, {p.stem: p for p in lbl_dir.glob("*.png")}, root, img_dir
    )


def _synthia_pairs(root: Path, split: str) -> list[SamplePair]:
    img_dir, lbl_dir = root / "RAND_CITYSCAPES" / "RGB", root / "RAND_CITYSCAPES" / "GT" / "LABELS"
    _require_dir(img_dir)
    _require_dir(lbl_dir)
    return _pair_by_stem(
        {p.stem: p for p in img_dir.glob("*.png")}, {p.stem: p for p in lbl_dir.glob("*.png")}, root, img_dir
    )


def _cityscapes_pairs(root: Path, split: str) -> list[SamplePair]:
    img_dir, lbl_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(img_dir)
    _require_dir(lbl_dir)
    images = {p.name[: -len("_leftImg8bit.png")]: p for p in img_dir.glob("*/*_leftImg8bit.png")}
    labels = {p.name[: -len("_gtFine_labelIds.png")]: p for p in lbl_dir.glob("*/*_gtFine_labelIds.png")}
    return _pair_by_stem(images, labels, root, img_dir, "*/*_leftImg8bit.png")


def _unlabelled(images: dict[str, Path], root: Path, img_dir: Path, pattern: str) -> list[SamplePair]:
    if not images:
        raise DataError(img_dir, f"input folder holds no {pattern} images")
    return [
        SamplePair(_key(stem), images[stem], None, images[stem].relative_to(root).as_posix()) for stem in sorted(images)
    ]


def _by_suffix(paths, suffix: str, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.name[: -len(suffix)]: p for p in paths}


def _condition_dirs(base: Path, conditions: tuple[str, ...], all_conditions: tuple[str, ...]) -> list[str]:
    """The condition sub-folders to read: the chosen ones, else every one that exists."""
    if conditions:
        for c in conditions:
            _require_dir(base / c)
        return list(conditions)
    found = [c for c in all_conditions if (base / c).is_dir()]
    if not found:
        raise DataError(base, f"holds none of the condition folders {', '.join(all_conditions)}")
    return found


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DARK_ZURICH_CONDITIONS = ("day", "night", "twilight")


def _acdc_pairs(root: Path, split: str, conditions: tuple[str, ...]) -> list[SamplePair]:
    """``rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png`` with
    ``gt/<condition>/<split>/<sequence>/*_gt_labelIds.png`` (Cityscapes label ids)."""
    _require_dir(root / "rgb_anon")
    _require_dir(root / "gt")
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for c in _condition_dirs(root / "rgb_anon", conditions, ACDC_CONDITIONS):
        img_dir, lbl_dir = root / "rgb_anon" / c / split, root / "gt" / c / split
        _require_dir(img_dir)
        _require_dir(lbl_dir)
        images.update(_by_suffix(img_dir.glob("*/*_rgb_anon.png"), "_rgb_anon.png", f"{c}_"))
        labels.update(_by_suffix(lbl_dir.glob("*/*_gt_labelIds.png"), "_gt_labelIds.png", f"{c}_"))
    return _pair_by_stem(images, labels, root, root / "rgb_anon", "<condition>/<split>/*/*_rgb_anon.png")


def _dark_zurich_pairs(root: Path, split: str, conditions: tuple[str, ...]) -> list[SamplePair]:
    """``rgb_anon/<split>/<time of day>/<sequence>/*_rgb_anon.png``; labels
    ``gt/<split>/<time of day>/<sequence>/*_gt_labelIds.png`` exist for val only (train is unlabelled)."""
    img_base = root / "rgb_anon" / split
    _require_dir(img_base)
    images: dict[str, Path] = {}
    chosen = _condition_dirs(img_base, conditions, DARK_ZURICH_CONDITIONS)
    for c in chosen:
        images.update(_by_suffix((img_base / c).glob("*/*_rgb_anon.png"), "_rgb_anon.png"))
    pattern = "<time of day>/*/*_rgb_anon.png"
    lbl_base = root / "gt" / split
    if not lbl_base.exists():
        return _unlabelled(images, root, img_base, pattern)
    labels: dict[str, Path] = {}
    for c in chosen:
        _require_dir(lbl_base / c)
        labels.update(_by_suffix((lbl_base / c).glob("*/*_gt_labelIds.png"), "_gt_labelIds.png"))
    return _pair_by_stem(images, labels, root, img_base, pattern)


def _bdd100k_pairs(root: Path, split: str, conditions: tuple[str, ...]) -> list[SamplePair]:
    """``images/10k/<split>/*.jpg`` with ``labels/sem_seg/masks/<split>/*.png`` (trainIds)."""
    img_dir, lbl_dir = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
    _require_dir(img_dir)
    _require_dir(lbl_dir)
    return _pair_by_stem(
        {p.stem: p for p in img_dir.glob("*.jpg")}, {p.stem: p for p in lbl_dir.glob("*.png")}, root, img_dir, "*.jpg"
    )


def _mapillary_pairs(root: Path, split: str, conditions: tuple[str, ...]) -> list[SamplePair]:
    """``training|validation/images/*.jpg`` with ``.../v1.2/labels/*.png`` (the v1.2 + v2.0 release)
    or ``.../labels/*.png`` (the v1.2 release)."""
    part = root / {"train": "training", "val": "validation"}[split]
    img_dir = part / "images"
    lbl_dir = part / "v1.2" / "labels" if (part / "v1.2" / "labels").is_dir() else part / "labels"
    _require_dir(img_dir)
    _require_dir(lbl_dir)
    return _pair_by_stem(
        {p.stem: p for p in img_dir.glob("*.jpg")}, {p.stem: p for p in lbl_dir.glob("*.png")}, root, img_dir, "*.jpg"
    )


#: image suffixes the folder layout reads (any case)
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _relative_stems(base: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """relative path without suffix -> file, for every file under ``base`` with one of ``suffixes``."""
    out: dict[str, Path] = {}
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            rel = p.relative_to(base).with_suffix("").as_posix()
            if rel in out:
                raise DataError(p, f"has the same relative path and stem as {out[rel].name} (one image per stem)")
            out[rel] = p
    return out


def _folder_pairs(root: Path, split: str, conditions: tuple[str, ...]) -> list[SamplePair]:
    """``images/<split>/**`` matched with ``labels/<split>/**`` by relative path and stem (any image
    suffix; grey label PNGs). No ``labels/<split>`` folder: an unlabelled split."""
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    _require_dir(img_dir)
    images = _relative_stems(img_dir, FOLDER_IMAGE_SUFFIXES)
    pattern = "**/*{" + ",".join(FOLDER_IMAGE_SUFFIXES) + "}"
    keyed: dict[str, str] = {}
    for rel in images:
        key = _key(rel)
        if key in keyed:
            raise DataError(images[rel], f"gives the same sample key {key!r} as {images[keyed[key]]}; rename one")
        keyed[key] = rel
    if not lbl_dir.exists():
        return _unlabelled(images, root, img_dir, pattern)
    _require_dir(lbl_dir)
    return _pair_by_stem(images, _relative_stems(lbl_dir, (".png",)), root, img_dir, pattern)


def _open_checked(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(path, f"unreadable or truncated image ({type(e).__name__}: {e})") from None


def _indexed_ids(path: Path) -> np.ndarray:
    """Palette indices (GTA5, never the colours) or grey values (Cityscapes labelIds)."""
    im = _open_checked(path)
    if im.mode not in ("P", "L"):
        raise DataError(path, f"label PNG has mode {im.mode!r}, expected palette ('P') or grey ('L') ids")
    return np.asarray(im)


def _synthia_ids(path: Path) -> np.ndarray:
    try:
        arr = read_png16_rgb(path)
    except Exception as e:
        raise DataError(path, f"unreadable or truncated image ({type(e).__name__}: {e})") from None
    return arr[..., 0]


def _fixed(pairs: Callable[[Path, str], list[SamplePair]]) -> Callable[[Path, str, tuple[str, ...]], list[SamplePair]]:
    return lambda root, split, conditions: pairs(root, split)


_CS_LUT = lookup_table(CITYSCAPES_ID_TO_TRAINID)
_CS_IDS = frozenset(CITYSCAPES_ID_TO_TRAINID)

LAYOUTS: dict[str, Layout] = {
    "gta5": Layout("gta5", 19, _CS_IDS, _CS_LUT, _fixed(_gta5_pairs), _indexed_ids),
    "cityscapes": Layout("cityscapes", 19, _CS_IDS, _CS_LUT, _fixed(_cityscapes_pairs), _indexed_ids),
    "synthia": Layout(
        "synthia",
        16,
        SYNTHIA_KNOWN_IDS,
        lookup_table(SYNTHIA_ID_TO_TRAINID16, size=65536),
        _fixed(_synthia_pairs),
        _synthia_ids,
    ),
    "acdc": Layout("acdc", 19, _CS_IDS, _CS_LUT, _acdc_pairs, _indexed_ids, conditions=ACDC_CONDITIONS),
    "dark_zurich": Layout(
        "dark_zurich", 19, _CS_IDS, _CS_LUT, _dark_zurich_pairs, _indexed_ids, conditions=DARK_ZURICH_CONDITIONS
    ),
    "bdd100k": Layout(
        "bdd100k", 19, BDD100K_KNOWN_IDS, lookup_table({i: i for i in range(19)}), _bdd100k_pairs, _indexed_ids
    ),
    "mapillary": Layout(
        "mapillary", 19, MAPILLARY_KNOWN_IDS, lookup_table(MAPILLARY_ID_TO_TRAINID), _mapillary_pairs, _indexed_ids
    ),
    # the user's own data: its table comes from the classes file (``folder_layout``)
    "folder": Layout("folder", 0, frozenset(), lookup_table({}), _folder_pairs, _indexed_ids, splits=()),
}


def folder_layout(classes: ClassTable) -> Layout:
    """The ``folder`` layout with a classes file's values -> class ids."""
    return Layout(
        "folder",
        classes.num_classes,
        classes.known_values(),
        classes.value_lut(),
        _folder_pairs,
        _indexed_ids,
        splits=(),
        classes=classes,
    )


def get_layout(name: str, classes: ClassTable | None = None) -> Layout:
    """A layout by name; ``folder`` needs its classes file's table."""
    if name not in LAYOUTS:
        raise DataError(name, f"unknown layout (choose one of {', '.join(LAYOUTS)})")
    if name == "folder":
        if classes is None:
            raise DataError(name, "the folder layout needs --classes FILE (docs/datasets.md, 'The classes file')")
        return folder_layout(classes)
    return LAYOUTS[name]


def check_split(layout: str, split: str) -> None:
    """A split the layout has (``folder``: any plain folder name)."""
    lay = LAYOUTS.get(layout)
    if lay is None or not lay.splits:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split):
            raise DataError(split, "a split is a plain folder name (letters, digits, _ . -)")
    elif split not in lay.splits:
        raise DataError(split, f"is not a split of {layout} ({', '.join(lay.splits)})")


def check_conditions(layout: str, conditions: tuple[str, ...]) -> None:
    lay = LAYOUTS[layout]
    if conditions and not lay.conditions:
        raise DataError(layout, "has no conditions; leave --condition out")
    for c in conditions:
        if c not in lay.conditions:
            raise DataError(c, f"is not a condition of {layout} ({', '.join(lay.conditions)})")


def list_pairs(
    layout: str,
    root: str | Path,
    split: str = "train",
    conditions: tuple[str, ...] = (),
) -> list[SamplePair]:
    """All (image, label) pairs of a layout + split (+ conditions), sorted; raises on unpaired files or
    empty folders. A pair's label is None in an unlabelled split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "input folder is missing")
    check_split(layout, split)
    check_conditions(layout, tuple(conditions))
    return LAYOUTS[layout].list_pairs(root, split, tuple(conditions))


def read_image(path: Path) -> Image.Image:
    """RGB image, fully decoded (so truncation is detected here, not later)."""
    return _open_checked(path).convert("RGB")


def read_label(
    layout: str, path: Path, unknown: str = "error", classes: ClassTable | None = None
) -> tuple[np.ndarray, int]:
    """(HxW uint8 trainIds with 255 = ignore, number of pixels whose id is outside the table)."""
    lay = get_layout(layout, classes)
    ids = lay.read_ids(path)
    known = np.zeros(lay.lut.shape[0], dtype=bool)
    known[list(lay.known_ids)] = True
    bad = ~known[ids]
    n_bad = int(bad.sum())
    if n_bad and unknown == "error":
        shown = ", ".join(str(int(i)) for i in np.unique(ids[bad])[:5])
        table = f"the classes file {lay.classes.source}" if lay.classes is not None else f"the {layout} table"
        raise DataError(
            path,
            f"{n_bad} pixels with ids outside {table} (ids {shown}); "
            f"rerun with --unknown-ids ignore to map them to 255 (the same --out continues)",
        )
    return lay.lut[ids], n_bad
