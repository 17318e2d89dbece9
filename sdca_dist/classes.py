"""Class tables: the one home for label ids, trainIds, class names, subsets and colours.

The Cityscapes/GTA5 label-id -> trainId table comes from ``cityscapesscripts`` (the dataset
authors' own ``labels.py``) rather than a hand copy, so there is a single source of truth.
SYNTHIA's ids are not covered by cityscapesscripts; its table is the one the SDCA method
uses (docs/method.md, "Classes").
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255

#: The 19 Cityscapes evaluation classes, index = trainId.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    lbl.name for lbl in sorted((l for l in _CS_LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)
)
assert len(CITYSCAPES_CLASSES) == 19, CITYSCAPES_CLASSES

#: Cityscapes palette (RGB) per trainId, used to colour predictions in TensorBoard.
CITYSCAPES_PALETTE: np.ndarray = np.array(
    [lbl.color for lbl in sorted((l for l in _CS_LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)],
    dtype=np.uint8,
)

#: Cityscapes (and GTA5, whose palette indices are Cityscapes ids) label id -> trainId.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    l.id: (l.trainId if 0 <= l.trainId < 255 else IGNORE_INDEX) for l in _CS_LABELS if l.id >= 0
}

#: SYNTHIA-RAND-CITYSCAPES class id (channel 0 of GT/LABELS) -> 16-class trainId.
SYNTHIA_ID_TO_TRAINID16: dict[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 9,
    10: 10,
    17: 11,
    8: 12,
    19: 13,
    12: 14,
    11: 15,
}
#: SYNTHIA's ids that exist in its table but are not evaluated (void, lanemarking, ...).
SYNTHIA_KNOWN_IDS: frozenset[int] = frozenset(range(0, 23))

#: The 16 SYNTHIA classes expressed as Cityscapes trainIds (16-class index -> 19-class trainId).
SYNTHIA16_TO_CS19: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_CLASSES: tuple[str, ...] = tuple(CITYSCAPES_CLASSES[i] for i in SYNTHIA16_TO_CS19)
#: 13-class subset used by papers: the 16 without wall, fence, pole (indices in the 16-class space).
SYNTHIA13_IN_16: tuple[int, ...] = tuple(i for i, n in enumerate(SYNTHIA_CLASSES) if n not in ("wall", "fence", "pole"))
assert len(SYNTHIA13_IN_16) == 13


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names of the evaluated classes for a 19- or 16-class setting."""
    if num_classes == 19:
        return CITYSCAPES_CLASSES
    if num_classes == 16:
        return SYNTHIA_CLASSES
    raise ValueError(f"no class table for num_classes={num_classes} (expected 19 or 16)")


def lookup_table(mapping: Mapping[int, int], size: int = 256, fill: int = IGNORE_INDEX) -> np.ndarray:
    """Dense uint8 LUT for ``lut[label_ids]`` mapping; unmapped ids -> ``fill``."""
    lut = np.full(size, fill, dtype=np.uint8)
    for src, dst in mapping.items():
        if 0 <= src < size:
            lut[src] = dst
    return lut


def palette_for(num_classes: int) -> np.ndarray:
    """RGB colours per class index (16-class indices use the Cityscapes colour of their class)."""
    if num_classes == 19:
        return CITYSCAPES_PALETTE
    if num_classes == 16:
        return CITYSCAPES_PALETTE[list(SYNTHIA16_TO_CS19)]
    raise ValueError(f"no palette for num_classes={num_classes}")


def colorize(label: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """HxW trainIds -> HxWx3 uint8 colour image (ignore = black)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:num_classes] = palette_for(num_classes)
    return pal[label.astype(np.int64)]


#: 19-class Cityscapes trainId -> 16-class (SYNTHIA) index; the 3 classes SYNTHIA lacks -> ignore.
CS19_TO_SYNTHIA16: dict[int, int] = {cs: i for i, cs in enumerate(SYNTHIA16_TO_CS19)}


def target_label_map(num_classes: int) -> np.ndarray | None:
    """LUT that turns a Cityscapes 19-class label into the setting's class space (None = identity)."""
    if num_classes == 19:
        return None
    if num_classes == 16:
        return lookup_table(CS19_TO_SYNTHIA16)
    raise ValueError(f"no class table for num_classes={num_classes} (expected 19 or 16)")


# --- inverse tables, used to WRITE dataset-style labels (the synthetic benchmark) -------------

#: 19-class trainId -> the Cityscapes/GTA5 label id that carries it (first id in labels.py).
CITYSCAPES_TRAINID_TO_ID: dict[int, int] = {}
for _l in sorted(_CS_LABELS, key=lambda l: l.id):
    if 0 <= _l.trainId < 255 and _l.id >= 0:
        CITYSCAPES_TRAINID_TO_ID.setdefault(_l.trainId, _l.id)
#: Cityscapes label ids of unlabelled pixels and of the ego vehicle (both ignored).
CITYSCAPES_UNLABELED_ID = 0
CITYSCAPES_EGO_VEHICLE_ID = 1

#: Colour per Cityscapes label id (index = id), the palette of GTA5's "P" label PNGs.
CITYSCAPES_ID_PALETTE: np.ndarray = np.zeros((256, 3), dtype=np.uint8)
for _l in _CS_LABELS:
    if 0 <= _l.id < 256:
        CITYSCAPES_ID_PALETTE[_l.id] = _l.color

#: 19-class trainId -> SYNTHIA class id. Terrain (16), truck (18) and train (20) exist in
#: SYNTHIA's id table but are not among its 16 evaluated classes, so they map back to ignore.
SYNTHIA_ID_OF_CS19: dict[int, int] = {
    **{cs: sid for sid, t16 in SYNTHIA_ID_TO_TRAINID16.items() for cs in [SYNTHIA16_TO_CS19[t16]]},
    9: 16,
    14: 18,
    16: 20,
}
SYNTHIA_VOID_ID = 0
assert len(SYNTHIA_ID_OF_CS19) == 19
