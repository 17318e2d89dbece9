"""Image scale: how large each stage's training images are relative to the test images.

The evaluation resizes every target image to ``data.eval_resize``: that is the scale a model is
tested at. A segmentation model learns object sizes, so a stage that trains far from that scale
teaches the model objects of a size it never meets at test time, and nothing in the loss shows
it. Every target-side size setting therefore means the same thing for data stored at ANY
resolution: ``target_resize`` and ``ssl_crop`` are absolute [H, W] sizes, and ``ssl_scale`` is a
zoom relative to ``eval_resize`` (1.0 = the test scale).

The reference zooms the STORED image in ssl; Cityscapes is stored at 2048x1024 and evaluated at
1024x512, so its [0.5, 1.5] of the stored image is [1.0, 3.0] of the evaluation size, which is
the published presets' ``ssl_scale`` here. On Cityscapes the two are the same recipe; on data
stored at another size the stored-image zoom would train at another scale than the one tested.

``scale_mismatch`` refuses a configuration whose target-side training range misses
[1/WIDE, WIDE] x the test scale entirely, unless ``data.allow_scale_mismatch=true`` says it is on
purpose. Source images are printed, never checked: their scale against the target's test scale
is a property of the two domains (GTA5 at 1280x720 against Cityscapes at 1024x512: 1.41x in
height, in the published recipe).

No torch here: the configuration checks run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sdca_dist.stage_table import STAGE_NAMES, spec

#: a target-side training range entirely above WIDE x or below 1/WIDE x the test scale is refused
WIDE = 2.0


@dataclass(frozen=True)
class ScaleRange:
    """Train/test size ratio of one side of a stage: ``low``..``high`` over samples and axes."""

    side: str  # "source" or "target"
    low: float
    high: float
    #: the settings that give it, as the user writes them
    settings: str

    def text(self) -> str:
        ratio = f"{self.low:.2f}x" if abs(self.high - self.low) < 5e-3 else f"{self.low:.2f}-{self.high:.2f}x"
        return f"{self.side} {ratio} ({self.settings})"


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def _resize_range(side: str, key: str, size: Any, eval_size: Any) -> ScaleRange:
    """A fixed resize: its ratio to the evaluation size, per axis (they differ if the aspect does)."""
    ratios = [s / e for s, e in zip(_ints(size), _ints(eval_size))]
    return ScaleRange(side, min(ratios), max(ratios), f"data.{key}={_ints(size)}")


def ssl_range(data: Any) -> ScaleRange:
    """ssl's zoom of the target image relative to the evaluation size, as the loader resolves it:
    ``data.ssl_scale`` times ``eval_resize``, floored where the image would not cover ``ssl_crop``
    (crop policy "fit": a crop never pads)."""
    low, high = (float(v) for v in data.ssl_scale)
    (ch, cw), (eh, ew) = _ints(data.ssl_crop), _ints(data.eval_resize)
    floor = max(ch / eh, cw / ew)
    settings = f"data.ssl_scale={[low, high]} of data.eval_resize, data.ssl_crop={[ch, cw]} never padded"
    return ScaleRange("target", max(low, floor), max(high, floor), settings)


def stage_scales(cfg: Any, stage: str) -> list[ScaleRange]:
    """The train/test ratios of ``stage``'s images (empty for a stage that reads no images to
    train or label on).

    Derived from the stage table: a stage's image sizes are the size settings it declares it reads
    (``StageSpec.reads``, which ``tests/test_stage_reads.py`` holds to what the stage really reads):
    ``data.source_resize`` gives its source side, ``data.target_resize`` or ``data.ssl_scale`` its
    target side. ``data.eval_resize`` alone (every scoring reads it) is the test scale itself."""
    reads, d = set(spec(stage).reads), cfg.data
    out = []
    if "data.source_resize" in reads:
        out.append(_resize_range("source", "source_resize", d.source_resize, d.eval_resize))
    if "data.ssl_scale" in reads:
        out.append(ssl_range(d))
    elif "data.target_resize" in reads:
        out.append(_resize_range("target", "target_resize", d.target_resize, d.eval_resize))
    return out


def scale_line(cfg: Any, stage: str) -> str:
    """One line for the stage's log: its train/test scale ratios."""
    parts = [r.text() for r in stage_scales(cfg, stage)]
    return f"train/test scale vs data.eval_resize={_ints(cfg.data.eval_resize)}: " + ("; ".join(parts) or "none")


def ssl_zoom_below_crop(data: Any) -> Optional[str]:
    """None, or one line when ``ssl_scale`` starts below the smallest zoom at which the image
    covers ``ssl_crop``: those zooms are all raised to that floor (the crop never pads), so the
    range is not what it says; a stored-image value such as the reference's [0.5, 1.5] shows up
    here and is named with its evaluation-size equivalent."""
    low, high = (float(v) for v in data.ssl_scale)
    (ch, cw), (eh, ew) = _ints(data.ssl_crop), _ints(data.eval_resize)
    floor = max(ch / eh, cw / ew)
    if low >= floor * (1 - 1e-6):
        return None
    return (
        f"data.ssl_scale={[low, high]} is a zoom of data.eval_resize={[eh, ew]}, and zooms below "
        f"{floor:g} cannot cover data.ssl_crop={[ch, cw]} (never padded): start it at >= {floor:g} "
        "(the reference's [0.5, 1.5] of a 2048x1024 image evaluated at 1024x512 is [1.0, 3.0])"
    )


def scale_mismatch(cfg: Any) -> Optional[str]:
    """None, or one line naming the settings whose target-side training range misses the test
    scale by more than ``WIDE`` (every crop above 2x or below 0.5x the test scale)."""
    if bool(cfg.data.get("allow_scale_mismatch", False)):
        return None
    seen: dict[str, list[str]] = {}
    ranges: dict[str, ScaleRange] = {}
    for stage in STAGE_NAMES:
        for r in stage_scales(cfg, stage):
            if r.side == "target" and (r.low > WIDE or r.high < 1 / WIDE):
                seen.setdefault(r.settings, []).append(stage)
                ranges[r.settings] = r
    if not seen:
        return None
    settings, stages = next(iter(seen.items()))
    r = ranges[settings]
    ratio = r.text().split(" (")[0].removeprefix("target ")
    return (
        f"{settings} puts {', '.join(stages)} at {ratio} the test scale (data.eval_resize="
        f"{_ints(cfg.data.eval_resize)}): no target image within {1 / WIDE:g}-{WIDE:g}x of it; "
        "set data.allow_scale_mismatch=true if that is on purpose"
    )
