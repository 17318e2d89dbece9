"""A few target-val images of a stage's evaluation, kept for the summary's picture panel.

The evaluation hands each image it scores on rank 0 (until ``COUNT``) with its ground truth and
the prediction; they are written to ``<stage>/val_examples/`` as ``NN_image.png`` (RGB), and
``NN_label.png`` / ``NN_pred.png`` (class ids, 255 = ignore, grey PNGs), all at the label's own
resolution scaled to at most ``MAX_WIDTH`` pixels wide. Class ids rather than colours: the
summary colours them with the run's class table (``sdca_dist.launch.figures``). Each
evaluation of the stage replaces them, so the files show its last evaluation. Rank 0 evaluates
images 0, W, 2W, ... of a W-rank run, so the same run on the same world size shows the same images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from sdca_dist.files import atomic_write_bytes
from sdca_dist.run_folder import VAL_EXAMPLES as FOLDER

COUNT = 4
MAX_WIDTH = 320


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class ValExamples:
    """Collects up to ``COUNT`` (image, label, prediction) triples; ``write`` stores them."""

    def __init__(self, stage_folder: Path, enabled: bool) -> None:
        self.folder = Path(stage_folder) / FOLDER
        self.enabled = enabled
        self.items: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    @property
    def wanted(self) -> bool:
        return self.enabled and len(self.items) < COUNT

    def add(self, image_rgb: np.ndarray, label: np.ndarray, pred: np.ndarray) -> None:
        """``image_rgb`` HxWx3 uint8 at any size; ``label``/``pred`` h x w class ids (same size)."""
        if not self.wanted:
            return
        h, w = label.shape
        scale = min(1.0, MAX_WIDTH / w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = Image.fromarray(image_rgb).resize(size, Image.BILINEAR)
        lab = Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST)
        prd = Image.fromarray(pred.astype(np.uint8)).resize(size, Image.NEAREST)
        self.items.append((np.asarray(img), np.asarray(lab), np.asarray(prd)))

    def write(self) -> None:
        if not self.enabled or not self.items:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, (img, lab, prd) in enumerate(self.items):
            for name, arr in (("image", img), ("label", lab), ("pred", prd)):
                atomic_write_bytes(self.folder / f"{i:02d}_{name}.png", _png(arr))


def read_examples(stage_folder: Path) -> list[dict[str, np.ndarray]]:
    """The stored triples of a stage, in order: ``[{"image", "label", "pred"}, ...]`` (empty if none)."""
    folder = Path(stage_folder) / FOLDER
    out = []
    for i in range(COUNT):
        paths = {k: folder / f"{i:02d}_{k}.png" for k in ("image", "label", "pred")}
        if not all(p.is_file() for p in paths.values()):
            break
        out.append({k: np.asarray(Image.open(p)) for k, p in paths.items()})
    return out
