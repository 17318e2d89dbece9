"""Class tables: the one home for label ids, trainIds, class names, subsets and colours.

The Cityscapes/GTA5 label-id -> trainId table comes from ``cityscapesscripts`` (the dataset
authors' own ``labels.py``) rather than a hand copy, so there is a single source of truth.
SYNTHIA's ids are not covered by cityscapesscripts; its table is the one the SDCA method
uses (docs/method.md, "Classes").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


def colorize(label: np.ndarray, num_classes: int = 19, palette: np.ndarray | None = None) -> np.ndarray:
    """HxW trainIds -> HxWx3 uint8 colour image (ignore = black); ``palette`` (Cx3, a run's
    ``ClassTable.palette()``) replaces the built-in colours of ``num_classes``."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    colours = palette_for(num_classes) if palette is None else np.asarray(palette, dtype=np.uint8)
    pal[: len(colours)] = colours
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


#: Mapillary Vistas v1.2 class id (the index of its label PNGs, 66 classes: config.json) ->
#: Cityscapes 19-class trainId; every other id is ignored. The mapping of Kerssies et al., "How to
#: Benchmark Vision Foundation Models for Semantic Segmentation?" (CVPR 2024 workshops), file
#: datasets/mappings.py of github.com/tue-mps/benchmark-vfm-ss (docs/datasets.md cites it).
MAPILLARY_ID_TO_TRAINID: dict[int, int] = {
    13: 0,  # construction--flat--road
    24: 0,  # marking--general
    41: 0,  # object--manhole
    2: 1,  # construction--barrier--curb
    15: 1,  # construction--flat--sidewalk
    17: 2,  # construction--structure--building
    6: 3,  # construction--barrier--wall
    3: 4,  # construction--barrier--fence
    45: 5,  # object--support--pole
    47: 5,  # object--support--utility-pole
    48: 6,  # object--traffic-light
    50: 7,  # object--traffic-sign--front
    30: 8,  # nature--vegetation
    29: 9,  # nature--terrain
    27: 10,  # nature--sky
    19: 11,  # human--person
    20: 12,  # human--rider--bicyclist
    21: 12,  # human--rider--motorcyclist
    22: 12,  # human--rider--other-rider
    55: 13,  # object--vehicle--car
    61: 14,  # object--vehicle--truck
    54: 15,  # object--vehicle--bus
    58: 16,  # object--vehicle--on-rails
    57: 17,  # object--vehicle--motorcycle
    52: 18,  # object--vehicle--bicycle
}
#: Mapillary Vistas v1.2 ids (0..64 classes, 65 = unlabeled).
MAPILLARY_KNOWN_IDS: frozenset[int] = frozenset(range(66))

#: BDD100K semantic segmentation masks hold the 19 Cityscapes trainIds directly (255 = ignore).
BDD100K_KNOWN_IDS: frozenset[int] = frozenset(range(19)) | {IGNORE_INDEX}


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


# --- class tables of a run: the built-in ones, or a user's classes file ----------------------


class ClassesError(ValueError):
    """A classes file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class ClassTable:
    """The classes a run trains and scores: names, colours and (for a user's own data) the label
    values each class is made of. Index = class id (the trainId stored in the shards).

    ``values``/``ignore`` only matter at shard time (``folder`` layout): they map a label PNG's
    grey values onto class ids; a value in neither is refused there."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    values: tuple[tuple[int, ...], ...] = ()
    ignore: tuple[int, ...] = ()
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        return np.array(self.colors, dtype=np.uint8).reshape(-1, 3)

    def value_lut(self) -> np.ndarray:
        """256-entry label value -> class id (ignore and unlisted values -> 255)."""
        return lookup_table({v: i for i, vs in enumerate(self.values) for v in vs})

    def known_values(self) -> frozenset[int]:
        return frozenset(v for vs in self.values for v in vs) | frozenset(self.ignore)

    def to_json(self) -> dict:
        """The table as plain data (recorded in a folder layout's shard manifest)."""
        return {
            "classes": [
                {"name": n, "color": list(c), "values": list(v)}
                for n, c, v in zip(self.names, self.colors, self.values or [()] * len(self.names))
            ],
            "ignore": list(self.ignore),
        }


def builtin_table(num_classes: int) -> ClassTable:
    """The Cityscapes 19-class or SYNTHIA 16-class table (names and Cityscapes colours)."""
    names = class_names(num_classes)
    return ClassTable(names, tuple(tuple(int(x) for x in c) for c in palette_for(num_classes)), source="builtin")


_CLASS_KEYS = {"name", "color", "values"}


def load_classes(path: str | Path) -> ClassTable:
    """Read and check a classes file (YAML, docs/datasets.md)::

        classes:                  # list index = class id
          - {name: road, color: [128, 64, 128], values: [1]}
          - {name: car, color: [0, 0, 142], values: [5, 6]}
        ignore: [0, 255]          # label values never trained on or scored

    ``values`` may be left out: the class is then the label value equal to its index. Every
    problem raises ``ClassesError`` with one line naming the file and the entry at fault."""
    import yaml

    p = Path(path)

    def bad(what: str) -> ClassesError:
        return ClassesError(f"{p}: {what}")

    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise bad(f"cannot read the classes file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise bad(f"not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if not isinstance(doc, dict) or "classes" not in doc:
        raise bad("expected a mapping with a 'classes' list (and optionally 'ignore')")
    extra = sorted(set(doc) - {"classes", "ignore"})
    if extra:
        raise bad(f"unknown key(s) {', '.join(map(str, extra))} (expected classes, ignore)")
    entries = doc["classes"]
    if not isinstance(entries, list) or not entries:
        raise bad("'classes' must be a non-empty list")
    if len(entries) > 254:
        raise bad(f"{len(entries)} classes; at most 254 (class ids are stored as 8-bit, 255 = ignore)")

    def byte_list(value, what: str) -> tuple[int, ...]:
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad(f"{what} must be a list of integers, got {value!r}")
        out = tuple(int(v) for v in value)
        if any(not 0 <= v <= 255 for v in out):
            raise bad(f"{what} must lie in 0..255 (8-bit label values), got {list(out)}")
        return out

    ignore = byte_list(doc.get("ignore", []) or [], "'ignore'")
    names, colors, values = [], [], []
    owner: dict[int, str] = {v: "ignore" for v in ignore}
    for i, e in enumerate(entries):
        where = f"class {i}"
        if not isinstance(e, dict):
            raise bad(f"{where} must be a mapping {{name, color, values}}, got {e!r}")
        unknown = sorted(set(map(str, e)) - _CLASS_KEYS)
        if unknown:
            raise bad(f"{where}: unknown key(s) {', '.join(unknown)} (expected name, color, values)")
        name = e.get("name")
        if not isinstance(name, str) or not name.strip():
            raise bad(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"class {i} ({name})"
        if name in names:
            raise bad(f"{where}: the name is used twice")
        color = byte_list(e.get("color"), f"{where}: 'color'")
        if len(color) != 3:
            raise bad(f"{where}: 'color' must be [R, G, B], got {list(color)}")
        vals = byte_list(e["values"], f"{where}: 'values'") if "values" in e else (i,)
        if not vals:
            raise bad(f"{where}: 'values' is empty")
        for v in vals:
            if v in owner:
                raise bad(f"{where}: label value {v} is already taken by {owner[v]}")
            owner[v] = name
        names.append(name)
        colors.append(color)
        values.append(vals)
    return ClassTable(tuple(names), tuple(colors), tuple(values), ignore, str(p))


def run_classes(data) -> ClassTable:
    """The class table of a run's ``data`` section: its classes file, else the built-in table."""
    path = getattr(data, "classes", None) if not isinstance(data, dict) else data.get("classes")
    if path:
        return load_classes(path)
    return builtin_table(int(data["num_classes"] if isinstance(data, dict) else data.num_classes))
