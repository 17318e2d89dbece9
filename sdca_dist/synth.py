"""``python -m sdca_dist.synth``: the embedded synthetic benchmark (GTA5 / SYNTHIA / Cityscapes style).

Procedural street scenes share one layout model (horizon, road in perspective, sidewalks,
buildings, vegetation, poles with lights and signs, vehicles, people), so the label statistics
match across domains, while the RENDERING differs per domain: class colours (hue shift and a
per-class hue jitter), texture strength, sensor noise, blur, lighting and colour cast. Every class
stays separable by colour/texture inside a domain, but a source-trained model sees shifted
colours on the target: a real, tunable domain gap. ``SynthConfig.gap`` scales all target
deviations at once (0 = no gap); the individual knobs set their size.

Files are written in the real datasets' layouts and label encodings (GTA5 palette PNGs with
Cityscapes ids as indices, SYNTHIA 16-bit 3-channel PNGs with the id in channel 0, Cityscapes
``*_gtFine_labelIds.png``), so everything downstream runs as on the real data.
"""

from __future__ import annotations

import argparse
import colorsys
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from sdca_dist.classes import (
    CITYSCAPES_EGO_VEHICLE_ID,
    CITYSCAPES_ID_PALETTE,
    CITYSCAPES_TRAINID_TO_ID,
    CITYSCAPES_UNLABELED_ID,
    SYNTHIA_ID_OF_CS19,
    SYNTHIA_VOID_ID,
    lookup_table,
)
from sdca_dist.data.png16 import write_png16_rgb

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BICYCLE = range(11, 19)
VOID = 254  # internal: unlabelled clutter (Cityscapes 'unlabeled', SYNTHIA 'void')
EGO = 253  # internal: ego-vehicle bonnet, Cityscapes style only

#: Base appearance per class (hue in [0,1), saturation, value): distinct hues so that every
#: class is recognisable by colour; the domain styles below shift these.
BASE_HSV: tuple[tuple[float, float, float], ...] = (
    (0.75, 0.10, 0.35),  # road: dark, nearly grey
    (0.90, 0.35, 0.65),  # sidewalk: pinkish light
    (0.08, 0.25, 0.50),  # building
    (0.15, 0.30, 0.60),  # wall
    (0.55, 0.25, 0.55),  # fence
    (0.60, 0.15, 0.45),  # pole
    (0.12, 0.90, 0.95),  # traffic light
    (0.17, 0.90, 0.90),  # traffic sign
    (0.30, 0.70, 0.45),  # vegetation
    (0.22, 0.55, 0.65),  # terrain
    (0.58, 0.45, 0.90),  # sky
    (0.98, 0.75, 0.80),  # person
    (0.02, 0.90, 0.55),  # rider
    (0.65, 0.80, 0.55),  # car
    (0.45, 0.70, 0.40),  # truck
    (0.50, 0.85, 0.70),  # bus
    (0.40, 0.40, 0.30),  # train
    (0.80, 0.70, 0.60),  # motorcycle
    (0.70, 0.60, 0.85),  # bicycle
)
#: Per-class texture gain (buildings and vegetation are textured, sky and road smooth).
TEXTURE_GAIN = np.array(
    [0.4, 0.6, 1.0, 0.8, 0.8, 0.3, 0.2, 0.2, 1.2, 1.0, 0.3, 0.5, 0.5, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=np.float32
)


@dataclass
class DomainStyle:
    """How one domain renders the shared layouts (all knobs in natural units)."""

    hue_shift: float = 0.0  # degrees, all classes
    hue_jitter: float = 0.0  # degrees, per class (fixed per seed): colours move "permuted-ish"
    tone_jitter: float = 0.0  # per class (fixed per seed): value and saturation gains 1 +- this
    saturation: float = 1.0  # gain
    value: float = 1.0  # gain
    texture: float = 0.05  # amplitude of the multiplicative texture field
    texture_scale: int = 8  # pixels per texture cell (low = fine grain)
    noise: float = 1.0  # Gaussian pixel noise, std in 0..255 units
    blur: float = 0.0  # Gaussian blur sigma in pixels
    lighting: float = 0.1  # +- global gain and vertical gradient amplitude
    cast: float = 0.0  # +- per-image colour cast (fraction)
    window_period: int = 6  # building window grid period (px); a structural texture cue


@dataclass
class SynthConfig:
    """Every knob of the generator. Deterministic per ``seed``."""

    seed: int = 0
    num_source: int = 200  # images in gta5/ and in synthia/ each
    num_target_train: int = 200
    num_target_val: int = 50
    source_size: tuple[int, int] = (256, 144)  # (W, H), GTA5-like aspect
    synthia_size: tuple[int, int] | None = None  # (W, H); None = source_size
    target_size: tuple[int, int] = (256, 128)  # (W, H), Cityscapes 2:1
    # the domain gap: target = source style + gap * (these deviations)
    gap: float = 1.0
    # Defaults: a gap of rendering, not of semantics. Class hues sit ~20-40 degrees apart, so a
    # large global hue rotation maps one class onto another's source colour (car -> bicycle),
    # a "permuted palette" no alignment can undo; the hue moves stay small and the gap comes
    # from desaturation, darkening, grain, sensor noise, blur, lighting and colour casts.
    palette_shift: float = 10.0  # degrees of hue rotation of every class colour
    palette_jitter: float = 6.0  # degrees of extra per-class hue rotation (fixed per seed)
    desaturate: float = 0.35  # fraction of saturation lost
    darken: float = 0.15  # fraction of value lost
    texture: float = 0.30  # extra texture amplitude
    noise: float = 12.0  # extra pixel noise std
    blur: float = 1.0  # extra blur sigma (px)
    lighting: float = 0.25  # extra lighting variation
    cast: float = 0.15  # per-image colour cast
    # per-class brightness/saturation change (fixed per seed): the one part of the gap that the
    # sdca stage's global photometric augmentation cannot imitate (it moves every class together)
    class_tone: float = 0.0
    workers: int = 1
    source_style: DomainStyle = field(default_factory=DomainStyle)

    def target_style(self) -> DomainStyle:
        s, g = self.source_style, self.gap
        return DomainStyle(
            hue_shift=s.hue_shift + g * self.palette_shift,
            hue_jitter=s.hue_jitter + g * self.palette_jitter,
            tone_jitter=s.tone_jitter + g * self.class_tone,
            saturation=s.saturation * max(0.0, 1 - g * self.desaturate),
            value=s.value * max(0.05, 1 - g * self.darken),
            texture=s.texture + g * self.texture,
            texture_scale=max(2, s.texture_scale - 4),
            noise=s.noise + g * self.noise,
            blur=s.blur + g * self.blur,
            lighting=s.lighting + g * self.lighting,
            cast=s.cast + g * self.cast,
            window_period=s.window_period + 2,
        )

    def synthia_style(self) -> DomainStyle:
        """A second synthetic look: close to GTA5's, slightly shifted (SYNTHIA is its own domain)."""
        s = self.source_style
        return DomainStyle(
            **{
                **asdict(s),
                "hue_shift": s.hue_shift - 0.25 * self.gap * self.palette_shift,
                "texture": s.texture + 0.05,
                "window_period": s.window_period - 1,
            }
        )


# ---------------------------------------------------------------------------------------------
# layouts (labels in 19-class trainId space, plus VOID / EGO)


def _rect(lbl: np.ndarray, y0: float, y1: float, x0: float, x1: float, c: int) -> None:
    h, w = lbl.shape
    ya, yb = max(0, int(round(y0))), min(h, int(round(y1)))
    xa, xb = max(0, int(round(x0))), min(w, int(round(x1)))
    if ya < yb and xa < xb:
        lbl[ya:yb, xa:xb] = c


def _ellipse(lbl: np.ndarray, cy: float, cx: float, ry: float, rx: float, c: int) -> None:
    h, w = lbl.shape
    ry, rx = max(ry, 0.5), max(rx, 0.5)
    ya, yb = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
    xa, xb = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
    if ya >= yb or xa >= xb:
        return
    yy, xx = np.ogrid[ya:yb, xa:xb]
    inside = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0
    lbl[ya:yb, xa:xb][inside] = c


def scene_layout(rng: np.random.Generator, h: int, w: int, ego: bool = False) -> np.ndarray:
    """One street scene as an HxW uint8 map of trainIds (plus VOID/EGO codes)."""
    lbl = np.full((h, w), SKY, dtype=np.uint8)
    hz = h * rng.uniform(0.36, 0.5)  # horizon
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    # buildings / trees along the horizon
    x = 0.0
    while x < w:
        bw = w * rng.uniform(0.07, 0.22)
        kind = rng.choice(3, p=[0.65, 0.25, 0.10])
        top = hz - h * rng.uniform(0.08, 0.36)
        if kind == 0:
            _rect(lbl, top, hz + 2, x, x + bw, BUILDING)
        elif kind == 1:
            _ellipse(lbl, top + (hz - top) * 0.45, x + bw / 2, (hz - top) * 0.6, bw * 0.6, VEG)
            _rect(lbl, top + (hz - top) * 0.5, hz + 2, x + bw * 0.2, x + bw * 0.8, VEG)
        x += bw
    # ground below the horizon: terrain / vegetation patches
    ground = yy >= hz
    lbl[np.broadcast_to(ground, lbl.shape)] = TERRAIN
    for _ in range(rng.integers(1, 4)):
        cx = rng.uniform(0, w)
        _ellipse(lbl, hz + rng.uniform(0.05, 0.3) * h, cx, h * rng.uniform(0.05, 0.15), w * rng.uniform(0.05, 0.2), VEG)
    # road and sidewalks in perspective
    vx = w * rng.uniform(0.4, 0.6)
    bottom_half = w * rng.uniform(0.45, 0.7)
    t = np.clip((yy - hz) / max(h - hz, 1.0), 0, 1)
    cxr = vx + (w / 2 + rng.uniform(-0.1, 0.1) * w - vx) * t
    half = 0.01 * w + bottom_half * t
    dist = np.abs(xx - cxr)
    walk = rng.uniform(1.25, 1.5)
    lbl[(dist < half * walk) & ground] = SIDEWALK
    lbl[(dist < half) & ground] = ROAD
    # wall / fence segments in front of buildings
    for _ in range(rng.integers(0, 3)):
        x0 = rng.uniform(0, w * 0.9)
        _rect(
            lbl,
            hz - h * rng.uniform(0.03, 0.09),
            hz + 1,
            x0,
            x0 + w * rng.uniform(0.05, 0.2),
            WALL if rng.random() < 0.5 else FENCE,
        )
    # lane markings (void) and clutter
    for k in range(rng.integers(2, 6)):
        yb = hz + (h - hz) * rng.uniform(0.1, 0.95)
        tt = (yb - hz) / max(h - hz, 1)
        cx = vx + (w / 2 - vx) * tt
        _rect(lbl, yb, yb + max(1, 3 * tt), cx - 1 - 2 * tt, cx + 1 + 2 * tt, VOID)
    # objects, far to near
    objs: list[tuple[float, int, float]] = []
    for _ in range(rng.integers(2, 6)):
        objs.append((rng.uniform(0.05, 1.0), POLE, rng.choice([-1, 1])))
    for _ in range(rng.integers(1, 6)):
        objs.append((rng.uniform(0.05, 1.0), CAR, rng.uniform(-0.8, 0.8)))
    if rng.random() < 0.35:
        objs.append((rng.uniform(0.1, 0.8), TRUCK if rng.random() < 0.5 else BUS, rng.uniform(-0.6, 0.6)))
    if rng.random() < 0.08:
        objs.append((rng.uniform(0.1, 0.5), TRAIN, rng.uniform(-0.3, 0.3)))
    for _ in range(rng.integers(0, 5)):
        objs.append((rng.uniform(0.05, 1.0), PERSON, rng.choice([-1, 1]) * rng.uniform(1.02, walk)))
    for _ in range(rng.integers(0, 3)):
        objs.append((rng.uniform(0.05, 1.0), RIDER, rng.uniform(-0.8, 0.8)))
    for _ in range(rng.integers(0, 2)):
        objs.append((rng.uniform(0.05, 0.6), VOID, rng.choice([-1, 1]) * rng.uniform(1.0, 1.6)))
    objs.sort(key=lambda o: o[0])
    for depth, kind, lateral in objs:
        yb = hz + (h - hz) * depth  # ground contact
        s = max(depth, 0.03)  # perspective scale
        cx = vx + (w / 2 - vx) * depth + lateral * (0.01 * w + bottom_half * depth)
        if kind == POLE:
            ph, pw = h * 0.9 * s + 4, max(1.0, w * 0.008 * s + 0.6)
            cx = cx * 1.0 + lateral * pw
            _rect(lbl, yb - ph, yb, cx - pw / 2, cx + pw / 2, POLE)
            if rng.random() < 0.5:
                _rect(lbl, yb - ph - 1, yb - ph + max(3, ph * 0.15), cx - pw * 1.5, cx + pw * 1.5, LIGHT)
            else:
                r = max(1.5, ph * 0.07)
                _ellipse(lbl, yb - ph * 0.85, cx, r, r * 1.1, SIGN)
        elif kind in (CAR, TRUCK, BUS, TRAIN):
            cw = w * {CAR: 0.22, TRUCK: 0.3, BUS: 0.36, TRAIN: 0.8}[kind] * s + 2
            ch = cw * {CAR: 0.55, TRUCK: 0.8, BUS: 0.75, TRAIN: 0.35}[kind]
            _rect(lbl, yb - ch * 0.6, yb, cx - cw / 2, cx + cw / 2, kind)
            _rect(lbl, yb - ch, yb - ch * 0.55, cx - cw * (0.3 if kind == CAR else 0.5), cx + cw * 0.45, kind)
        elif kind == PERSON:
            ph = h * 0.45 * s + 3
            _ellipse(lbl, yb - ph * 0.45, cx, ph * 0.42, max(1.0, ph * 0.14), PERSON)
            _ellipse(lbl, yb - ph * 0.92, cx, ph * 0.09, ph * 0.08, PERSON)
        elif kind == RIDER:
            bw = w * 0.09 * s + 2
            vehicle = MOTO if rng.random() < 0.4 else BICYCLE
            _ellipse(lbl, yb - bw * 0.3, cx - bw * 0.35, bw * 0.3, bw * 0.3, vehicle)
            _ellipse(lbl, yb - bw * 0.3, cx + bw * 0.35, bw * 0.3, bw * 0.3, vehicle)
            _rect(lbl, yb - bw * 0.55, yb - bw * 0.3, cx - bw * 0.4, cx + bw * 0.4, vehicle)
            _ellipse(lbl, yb - bw * 0.95, cx, bw * 0.45, bw * 0.18, RIDER)
            _ellipse(lbl, yb - bw * 1.5, cx, bw * 0.14, bw * 0.12, RIDER)
        else:
            _rect(lbl, yb - h * 0.08 * s - 2, yb, cx - w * 0.03 * s - 1, cx + w * 0.03 * s + 1, VOID)
    if ego:
        _ellipse(lbl, h * 1.05, w / 2, h * 0.12, w * 0.7, EGO)
    return lbl


# ---------------------------------------------------------------------------------------------
# rendering


def class_colours(style: DomainStyle, seed: int) -> np.ndarray:
    """19x3 float32 RGB in [0,1] for a domain style; the per-class jitter is fixed per seed."""
    jitter = np.random.default_rng([seed, 977]).uniform(-1, 1, size=19)
    tone = 1.0 + style.tone_jitter * np.random.default_rng([seed, 978]).uniform(-1, 1, size=(19, 2))
    out = np.zeros((19, 3), dtype=np.float32)
    for k, (hh, ss, vv) in enumerate(BASE_HSV):
        hue = (hh + (style.hue_shift + style.hue_jitter * jitter[k]) / 360.0) % 1.0
        sat = min(1.0, max(0.0, ss * style.saturation * tone[k, 0]))
        out[k] = colorsys.hsv_to_rgb(hue, sat, min(1.0, max(0.0, vv * style.value * tone[k, 1])))
    return out


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency value noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / cell
    xs = np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding), vectorised as a sum of shifted copies."""
    if sigma <= 0.05:
        return img
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        acc = np.zeros_like(img)
        for i, kv in enumerate(k):
            acc += kv * np.take(p, np.arange(i, i + n), axis=axis)
        img = acc
    return img


def render(lbl: np.ndarray, style: DomainStyle, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a layout in a domain's style: HxWx3 uint8."""
    h, w = lbl.shape
    pal = np.concatenate([colours, np.array([[0.25, 0.22, 0.2]], np.float32)])  # row 19: void / ego
    cls = np.where(lbl < 19, lbl, 19).astype(np.int64)
    img = pal[cls]  # HxWx3
    gain = np.concatenate([TEXTURE_GAIN, [0.5]]).astype(np.float32)[cls]
    tex = _smooth_field(rng, h, w, style.texture_scale) * 0.7 + rng.uniform(-1, 1, size=(h, w)).astype(np.float32) * 0.3
    img = img * (1.0 + style.texture * gain * tex)[..., None]
    # buildings: a window grid, a structural cue whose period differs between domains
    p = max(2, style.window_period)
    win = ((np.arange(h)[:, None] // (p // 2 + 1)) % 2 == 0) & ((np.arange(w)[None, :] // (p // 2 + 1)) % 2 == 0)
    img[(lbl == BUILDING) & win] *= 0.75
    # lighting: global gain, vertical gradient, colour cast
    g = 1.0 + style.lighting * rng.uniform(-1, 1)
    grad = 1.0 + style.lighting * rng.uniform(-0.5, 0.5) * (np.arange(h, dtype=np.float32)[:, None, None] / h - 0.5)
    cast = 1.0 + style.cast * rng.uniform(-1, 1, size=3).astype(np.float32)
    img = img * g * grad * cast
    img = img * 255.0
    img = _gaussian_blur(img, style.blur)
    if style.noise > 0:
        img = img + rng.normal(0, style.noise, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# layouts on disk

_CS_LUT = lookup_table(CITYSCAPES_TRAINID_TO_ID, fill=CITYSCAPES_UNLABELED_ID)
_CS_LUT[VOID], _CS_LUT[EGO] = CITYSCAPES_UNLABELED_ID, CITYSCAPES_EGO_VEHICLE_ID
_SYN_LUT = lookup_table(SYNTHIA_ID_OF_CS19, fill=SYNTHIA_VOID_ID)
_SYN_LUT[VOID] = _SYN_LUT[EGO] = SYNTHIA_VOID_ID
TRAIN_CITIES = ("aachen", "bochum", "bremen")
VAL_CITIES = ("frankfurt", "lindau", "munster")
_DOMAIN_CODE = {"gta5": 1, "synthia": 2, "cityscapes_train": 3, "cityscapes_val": 4}


def _save_png(path: Path, img: Image.Image) -> None:
    """Write via a temp name + rename: a crash never leaves a half-written PNG."""
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)


def _one(job: tuple[str, int, SynthConfig, Path]) -> None:
    domain, i, cfg, out = job
    rng = np.random.default_rng([cfg.seed, _DOMAIN_CODE[domain], i])
    if domain == "gta5":
        w, h = cfg.source_size
        lbl = scene_layout(rng, h, w)
        img = render(lbl, cfg.source_style, class_colours(cfg.source_style, cfg.seed), rng)
        _save_png(out / "gta5" / "images" / f"{i + 1:05d}.png", Image.fromarray(img))
        p = Image.fromarray(_CS_LUT[lbl], mode="P")
        p.putpalette(CITYSCAPES_ID_PALETTE.reshape(-1).tolist())
        _save_png(out / "gta5" / "labels" / f"{i + 1:05d}.png", p)
    elif domain == "synthia":
        w, h = cfg.synthia_size or cfg.source_size
        lbl = scene_layout(rng, h, w)
        style = cfg.synthia_style()
        img = render(lbl, style, class_colours(style, cfg.seed), rng)
        base = out / "synthia" / "RAND_CITYSCAPES"
        _save_png(base / "RGB" / f"{i:07d}.png", Image.fromarray(img))
        gt = np.zeros((h, w, 3), np.uint16)
        gt[..., 0] = _SYN_LUT[lbl]
        gt[..., 1] = rng.integers(0, 4000, size=(h, w), dtype=np.uint16) * (gt[..., 0] > 0)  # instance ids
        tmp = base / "GT" / "LABELS" / f"{i:07d}.png.tmp"
        write_png16_rgb(tmp, gt, compress_level=1)
        tmp.replace(tmp.with_suffix(""))
    else:
        split = "train" if domain == "cityscapes_train" else "val"
        w, h = cfg.target_size
        lbl = scene_layout(rng, h, w, ego=True)
        style = cfg.target_style()
        img = render(lbl, style, class_colours(style, cfg.seed), rng)
        cities = TRAIN_CITIES if split == "train" else VAL_CITIES
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19:06d}"
        _save_png(out / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", Image.fromarray(img))
        _save_png(
            out / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", Image.fromarray(_CS_LUT[lbl])
        )


def generate(out_dir: str | Path, cfg: SynthConfig, progress: bool = False) -> None:
    """Write the three layouts under ``out_dir`` (gta5/, synthia/, cityscapes/)."""
    out = Path(out_dir)
    (out / "gta5" / "images").mkdir(parents=True, exist_ok=True)
    (out / "gta5" / "labels").mkdir(parents=True, exist_ok=True)
    (out / "synthia" / "RAND_CITYSCAPES" / "RGB").mkdir(parents=True, exist_ok=True)
    (out / "synthia" / "RAND_CITYSCAPES" / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    for split, cities in (("train", TRAIN_CITIES), ("val", VAL_CITIES)):
        for c in cities:
            (out / "cityscapes" / "leftImg8bit" / split / c).mkdir(parents=True, exist_ok=True)
            (out / "cityscapes" / "gtFine" / split / c).mkdir(parents=True, exist_ok=True)
    jobs = (
        [("gta5", i, cfg, out) for i in range(cfg.num_source)]
        + [("synthia", i, cfg, out) for i in range(cfg.num_source)]
        + [("cityscapes_train", i, cfg, out) for i in range(cfg.num_target_train)]
        + [("cityscapes_val", i, cfg, out) for i in range(cfg.num_target_val)]
    )
    t0 = time.time()
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for n, _ in enumerate(pool.map(_one, jobs, chunksize=16), 1):
                _progress(progress, n, len(jobs), t0)
    else:
        for n, job in enumerate(jobs, 1):
            _one(job)
            _progress(progress, n, len(jobs), t0)
    if progress:
        print(file=sys.stderr)


def _progress(on: bool, n: int, total: int, t0: float) -> None:
    if on and (n % 50 == 0 or n == total):
        el = time.time() - t0
        eta = el / n * (total - n)
        print(f"\rsynth: {n}/{total} images, {el:.0f}s elapsed, ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)


def synth_command(
    out: Path | str,
    counts: tuple[int, int, int],
    source_wh: tuple[int, int],
    target_wh: tuple[int, int],
    *,
    seed: int | None = None,
    workers: int = 1,
    knobs: dict[str, float] | None = None,
) -> list[str]:
    """The command line that generates a synthetic benchmark (``python -m sdca_dist.synth ...``),
    for callers that run the tool as a subprocess (the synthetic preset's first use, the
    benchmarks, the GPU check, tests). ``counts`` = (source, target train, target val) images;
    sizes are (W, H); ``seed`` None = the tool's default; ``knobs`` are domain-gap settings by field
    name (``gap``, ...)."""
    cmd = [sys.executable, "-m", "sdca_dist.synth", "--out", str(out)]
    cmd += [] if seed is None else ["--seed", str(seed)]
    cmd += ["--num-source", str(counts[0]), "--num-target-train", str(counts[1]), "--num-target-val", str(counts[2])]
    cmd += ["--source-size", "%dx%d" % tuple(source_wh), "--target-size", "%dx%d" % tuple(target_wh)]
    for name, value in (knobs or {}).items():
        cmd += ["--" + str(name).replace("_", "-"), str(float(value))]
    return cmd + ["--workers", str(workers)]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH (e.g. 256x128)") from None


def main(argv: list[str] | None = None) -> int:
    d = SynthConfig()
    from sdca_dist import arguments

    ap = arguments.parser("python -m sdca_dist.synth", __doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=arguments.int_at_least(0), default=d.seed)
    ap.add_argument("--num-source", type=arguments.int_at_least(1), default=d.num_source)
    ap.add_argument("--num-target-train", type=arguments.int_at_least(0), default=d.num_target_train)
    ap.add_argument("--num-target-val", type=arguments.int_at_least(0), default=d.num_target_val)
    ap.add_argument("--source-size", type=_size, default=d.source_size, help="WxH")
    ap.add_argument("--synthia-size", type=_size, default=None, help="WxH (default: --source-size)")
    ap.add_argument("--target-size", type=_size, default=d.target_size, help="WxH")
    ap.add_argument("--gap", type=float, default=d.gap, help="scales every target deviation (0 = no gap)")
    for name in (
        "palette_shift",
        "palette_jitter",
        "desaturate",
        "darken",
        "texture",
        "noise",
        "blur",
        "lighting",
        "cast",
        "class_tone",
    ):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--workers", type=arguments.int_between(1, 256), default=1)
    a = ap.parse_args(argv)
    cfg = SynthConfig(**{f.name: getattr(a, f.name) for f in fields(SynthConfig) if hasattr(a, f.name)})
    t0 = time.time()
    generate(a.out, cfg, progress=True)
    n = cfg.num_source * 2 + cfg.num_target_train + cfg.num_target_val
    print(f"wrote {n} images under {a.out} in {time.time() - t0:.1f}s (seed {cfg.seed}, gap {cfg.gap})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
