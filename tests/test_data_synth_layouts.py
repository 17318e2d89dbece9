"""Synthetic generator determinism + dataset layout readers (GTA5 palette, SYNTHIA 16-bit, Cityscapes)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import TINY
from PIL import Image

from sdca_dist.classes import CITYSCAPES_ID_PALETTE
from sdca_dist.data.errors import DataError
from sdca_dist.data.layouts import list_pairs, read_label
from sdca_dist.data.png16 import read_png16_rgb, write_png16_rgb
from sdca_dist.synth import SynthConfig, generate


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))
    }


def test_synth_is_deterministic_per_seed(tmp_path, synth_root):
    again = tmp_path / "again"
    generate(again, TINY)
    assert _digest(again) == _digest(synth_root)
    other = tmp_path / "other"
    generate(other, SynthConfig(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    assert _digest(other) != _digest(synth_root)
    assert len(_digest(synth_root)) == 2 * (2 * TINY.num_source + TINY.num_target_train + TINY.num_target_val)


def test_synth_gap_knob_moves_target_colours(tmp_path):
    """gap=0: a class looks alike in both domains; gap=1: its colour moves (a real domain gap)."""

    def road_colour_distance(gap: float) -> float:
        cfg = SynthConfig(
            seed=1,
            num_source=3,
            num_target_train=3,
            num_target_val=0,
            source_size=(64, 32),
            target_size=(64, 32),
            gap=gap,
        )
        root = tmp_path / f"g{gap}"
        generate(root, cfg)
        means = []
        for layout, split in (("gta5", "train"), ("cityscapes", "train")):
            px = []
            for p in list_pairs(layout, root / layout, split):
                lbl, _ = read_label(layout, p.label)
                px.append(np.asarray(Image.open(p.image).convert("RGB"), np.float64)[lbl == 8])  # vegetation
            means.append(np.concatenate(px).mean(0))
        return float(np.linalg.norm(means[0] - means[1]))

    assert road_colour_distance(0.0) < 15 < road_colour_distance(1.0)


def test_layout_readers_map_ids_to_train_ids(synth_root):
    gta = list_pairs("gta5", synth_root / "gta5")
    syn = list_pairs("synthia", synth_root / "synthia")
    cs = list_pairs("cityscapes", synth_root / "cityscapes", "val")
    assert len(gta) == len(syn) == TINY.num_source and len(cs) == TINY.num_target_val
    assert cs[0].rel.startswith("leftImg8bit/val/") and cs[0].key.endswith("_000019")
    # GTA5: palette PNG, indices are Cityscapes ids (road=7 -> 0, car=26 -> 13, unlabeled -> 255)
    im = Image.open(gta[0].label)
    assert im.mode == "P"
    ids = np.asarray(im)
    lbl, bad = read_label("gta5", gta[0].label)
    assert bad == 0 and np.array_equal(lbl[ids == 7], np.zeros((ids == 7).sum(), np.uint8))
    assert (lbl[ids == 26] == 13).all() and (lbl[ids == 0] == 255).all()
    # SYNTHIA: 16-bit, id in channel 0 (road 3 -> 0, sky 1 -> 9, terrain 16 -> ignore), instance ids > 255 in ch 1
    raw = read_png16_rgb(syn[0].label)
    assert raw.dtype == np.uint16 and raw[..., 1].max() > 255
    lbl, _ = read_label("synthia", syn[0].label)
    assert (lbl[raw[..., 0] == 3] == 0).all() and (lbl[raw[..., 0] == 1] == 9).all()
    assert (lbl[raw[..., 0] == 16] == 255).all() and lbl.max() == 255 and lbl[lbl < 255].max() < 16


def test_png16_reader_undoes_png_filters(tmp_path):
    """Real SYNTHIA files use PNG row filters: write one with the Sub filter (bpp 6) by hand."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, size=(5, 7, 3), dtype=np.uint16)
    rows = arr.astype(">u2").view(np.uint8).reshape(5, 42).astype(np.int64)
    sub = rows.copy()
    sub[:, 6:] = (rows[:, 6:] - rows[:, :-6]) % 256
    raw = np.concatenate([np.ones((5, 1), np.int64), sub], 1).astype(np.uint8).tobytes()

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)

    p = tmp_path / "sub.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 7, 5, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert np.array_equal(read_png16_rgb(p), arr)
    write_png16_rgb(tmp_path / "plain.png", arr)
    assert np.array_equal(read_png16_rgb(tmp_path / "plain.png"), arr)


def test_gta_labels_use_indices_not_colours(tmp_path):
    ids = np.array([[7, 26], [0, 33]], np.uint8)
    im = Image.fromarray(ids, mode="P")
    pal = CITYSCAPES_ID_PALETTE.copy()[::-1]  # nonsense colours: only indices may matter
    im.putpalette(pal.reshape(-1).tolist())
    im.save(tmp_path / "l.png")
    lbl, _ = read_label("gta5", tmp_path / "l.png")
    assert lbl.tolist() == [[0, 13], [255, 18]]


def test_unknown_ids_error_or_ignore(tmp_path):
    Image.fromarray(np.array([[7, 200], [201, 26]], np.uint8)).save(tmp_path / "x_gtFine_labelIds.png")
    with pytest.raises(DataError, match=r"x_gtFine_labelIds.png: 2 pixels with ids outside the cityscapes table"):
        read_label("cityscapes", tmp_path / "x_gtFine_labelIds.png")
    lbl, n = read_label("cityscapes", tmp_path / "x_gtFine_labelIds.png", unknown="ignore")
    assert n == 2 and lbl.tolist() == [[0, 255], [255, 13]]


def test_class_tone_knob_changes_classes_unequally():
    """class_tone: per-class brightness moves that no global photometric change can imitate."""
    import colorsys

    from sdca_dist.synth import class_colours

    def value_ratios(tone: float) -> np.ndarray:
        cfg = SynthConfig(seed=3, class_tone=tone)
        src = class_colours(cfg.source_style, cfg.seed)
        tgt = class_colours(cfg.target_style(), cfg.seed)
        return np.array([colorsys.rgb_to_hsv(*t)[2] / colorsys.rgb_to_hsv(*s)[2] for s, t in zip(src, tgt)])

    flat, toned = value_ratios(0.0), value_ratios(0.3)
    assert np.ptp(flat) < 1e-5  # default: every class darkened by the same factor
    assert np.ptp(toned) > 0.2  # per class, fixed per seed
    assert np.array_equal(
        class_colours(SynthConfig(seed=3, class_tone=0.3).source_style, 3),
        class_colours(SynthConfig(seed=3).source_style, 3),
    )  # source untouched
