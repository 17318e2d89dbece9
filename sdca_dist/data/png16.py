"""16-bit RGB PNGs (SYNTHIA's GT/LABELS) without FreeImage.

Pillow opens 48-bit PNGs but keeps only the high byte of each sample. Its C zip decoder still
undoes every PNG filter correctly, so we decode twice, once keeping the high bytes ("RGB;16B")
and once the low bytes ("RGB;16L"), and recombine: full speed, exact values, no new dependency.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def read_png16_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint16 array of a 16-bit RGB PNG (8-bit PNGs are returned widened)."""
    with Image.open(path) as probe:
        tile = probe.tile[0] if probe.tile else None
        if probe.format != "PNG" or tile is None or tile[3] != "RGB;16B":
            return np.asarray(probe.convert("RGB"), dtype=np.uint16)
    planes = []
    for rawmode in ("RGB;16B", "RGB;16L"):  # high bytes, then low bytes
        im = Image.open(path)
        t = im.tile[0]
        im.tile = [t._replace(args=rawmode)]
        im.load()
        planes.append(np.asarray(im, dtype=np.uint16))
        im.close()
    return (planes[0] << 8) | planes[1]


def write_png16_rgb(path: str | Path, array: np.ndarray, compress_level: int = 6) -> None:
    """Write HxWx3 uint16 as a 16-bit RGB PNG (filter 0), the format SYNTHIA ships."""
    h, w, c = array.shape
    if c != 3:
        raise ValueError(f"{path}: expected HxWx3, got {array.shape}")
    rows = array.astype(">u2").view(np.uint8).reshape(h, w * 6)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    blob = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, compress_level))
        + chunk(b"IEND", b"")
    )
    Path(path).write_bytes(blob)
