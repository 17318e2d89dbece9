"""Dataset layouts on disk -> (image, label) pairs, and label files -> trainId arrays.

Label ids map to trainIds exactly once, here: GTA5 and Cityscapes through the cityscapesscripts
table (19 classes), SYNTHIA through its 16-class table. Ids outside a dataset's table are
counted; by default such a label is an error (a corrupt or foreign file), optionally mapped to
ignore. Every problem is a ``DataError`` naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sdca_dist.classes import (
    CITYSCAPES_ID_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID16,
    SYNTHIA_KNOWN_IDS,
    lookup_table,
)
from sdca_dist.data.errors import DataError
from sdca_dist.data.png16 import read_png16_rgb


@dataclass(frozen=True)
class SamplePair:
    key: str  # unique within a set, no dots (WebDataset splits names at the first dot)
    image: Path
    label: Path
    rel: str  # image path relative to the dataset root (recorded in key.json as "path")


@dataclass(frozen=True)
class Layout:
    name: str
    num_classes: int
    known_ids: frozenset[int]
    lut: np.ndarray  # 256-entry (or 65536 for SYNTHIA) id -> trainId
    list_pairs: Callable[[Path, str], list[SamplePair]]
    read_ids: Callable[[Path], np.ndarray]


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


LAYOUTS: dict[str, Layout] = {
    "gta5": Layout(
        "gta5",
        19,
        frozenset(CITYSCAPES_ID_TO_TRAINID),
        lookup_table(CITYSCAPES_ID_TO_TRAINID),
        _gta5_pairs,
        _indexed_ids,
    ),
    "cityscapes": Layout(
        "cityscapes",
        19,
        frozenset(CITYSCAPES_ID_TO_TRAINID),
        lookup_table(CITYSCAPES_ID_TO_TRAINID),
        _cityscapes_pairs,
        _indexed_ids,
    ),
    "synthia": Layout(
        "synthia",
        16,
        SYNTHIA_KNOWN_IDS,
        lookup_table(SYNTHIA_ID_TO_TRAINID16, size=65536),
        _synthia_pairs,
        _synthia_ids,
    ),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise DataError(name, f"unknown layout (choose one of {', '.join(LAYOUTS)})")
    return LAYOUTS[name]


def list_pairs(layout: str, root: str | Path, split: str = "train") -> list[SamplePair]:
    """All (image, label) pairs of a layout + split, sorted; raises on unpaired files or empty folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "input folder is missing")
    return get_layout(layout).list_pairs(root, split)


def read_image(path: Path) -> Image.Image:
    """RGB image, fully decoded (so truncation is detected here, not later)."""
    return _open_checked(path).convert("RGB")


def read_label(layout: str, path: Path, unknown: str = "error") -> tuple[np.ndarray, int]:
    """(HxW uint8 trainIds with 255 = ignore, number of pixels whose id is outside the table)."""
    lay = get_layout(layout)
    ids = lay.read_ids(path)
    known = np.zeros(lay.lut.shape[0], dtype=bool)
    known[list(lay.known_ids)] = True
    bad = ~known[ids]
    n_bad = int(bad.sum())
    if n_bad and unknown == "error":
        shown = ", ".join(str(int(i)) for i in np.unique(ids[bad])[:5])
        raise DataError(
            path,
            f"{n_bad} pixels with ids outside the {layout} table (ids {shown}); "
            f"rerun with --unknown-ids ignore to map them to 255 (the same --out continues)",
        )
    return lay.lut[ids], n_bad
