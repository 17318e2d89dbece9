"""WebDataset shards: writing (atomic, deterministic bytes), the JSON manifest, random access.

A shard set is one folder: ``<prefix>-NNNNNN.tar`` (samples ``key.<image ext>``, ``key.png`` =
uint8 "L" trainId label with 255 = ignore, ``key.json``), a DALI index ``.idx`` and a sidecar
``.tar.json`` per shard (its sample records: what resuming and manifest-combining read), and
``manifest.json``. Files appear only complete, under their final names (temp name + rename), and
the tar bytes depend only on the inputs (fixed header fields), so a resumed run reproduces them.
Sidecars written by ``python -m sdca_dist.shard`` also carry the shard's source records (raw-file
hashes, see ``packing``). Manifest shard and index names are plain file names in the manifest's
folder (checked on load); reading outside DALI with ``webdataset``: ``webdataset_reader.iter_samples``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from sdca_dist.data.errors import DataError, OutputError
from sdca_dist.files import atomic_write_bytes

MANIFEST_FORMAT = "sdca_dist.shards/1"
DEFAULT_SHARD_SIZE = 1 << 30
IMAGE_EXTS = ("jpg", "img.png")  # JPEG (default) or lossless PNG (another extension than the label's)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def os_error(path: object, e: OSError) -> OutputError:
    """A file-system failure as one line naming the path (the OSError's own file name if it has one)."""
    where = e.filename if e.filename else path
    return OutputError(where, f"cannot write ({e.strerror or type(e).__name__})")


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed separators): equal content, equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_label(label: np.ndarray, num_classes: int) -> tuple[bytes, list[int]]:
    """("L" PNG bytes, per-class pixel counts) of an HxW uint8 trainId map."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be HxW uint8, got {label.dtype} {label.shape}")
    counts = np.bincount(label.ravel(), minlength=256)[:num_classes]
    buf = io.BytesIO()
    Image.fromarray(label, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), [int(c) for c in counts]


def parse_size(text: str | int, option: str = "--shard-size") -> int:
    """'1GB', '256MiB', '500k', '123' -> bytes (>= 1); anything else is a ``UsageError`` naming ``option``."""
    from sdca_dist.data.errors import UsageError

    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip().upper().replace("IB", "B")
        units = {
            "KB": 1 << 10,
            "MB": 1 << 20,
            "GB": 1 << 30,
            "TB": 1 << 40,
            "K": 1 << 10,
            "M": 1 << 20,
            "G": 1 << 30,
            "B": 1,
        }
        mult = 1
        for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(u):
                t, mult = t[: -len(u)], m
                break
        try:
            number = float(t)
        except ValueError:
            raise UsageError(option, f"{text!r} is not a size (e.g. 1GB, 256MB, 500k, 12000)") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UsageError(option, f"{text!r} is not a size (e.g. 1GB, 256MB, 500k, 12000)")
        value = int(number * mult)
    if value < 1:
        raise UsageError(option, f"must be at least 1 byte, got {text!r}")
    return value


@dataclass
class ShardInfo:
    """One complete shard and the records of its samples (in tar order)."""

    name: str
    sha256: str
    count: int
    bytes: int
    class_pixels: list[int]
    samples: list[
        dict
    ]  # {"key","image":[off,size],"image_ext","label":[off,size],"meta":[off,size],"size":[W,H],"classes":[...]}
    options: dict = field(default_factory=dict)
    # source identity, in input order: one record per input pair consumed since the previous shard
    # (packed ones and skipped ones), e.g. {"key","path","label_path","image": sha256,"label": sha256}
    provenance: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "sha256": self.sha256,
            "count": self.count,
            "bytes": self.bytes,
            "class_pixels": self.class_pixels,
            "samples": self.samples,
            "options": self.options,
        }
        if self.provenance:
            d["provenance"] = self.provenance
        return d

    @staticmethod
    def from_json(d: dict) -> "ShardInfo":
        return ShardInfo(
            d["name"],
            d["sha256"],
            int(d["count"]),
            int(d["bytes"]),
            list(d["class_pixels"]),
            list(d["samples"]),
            dict(d.get("options", {})),
            list(d.get("provenance", [])),
        )

    def source_sha256(self) -> str | None:
        """Digest of this shard's source records (None for shards written without them, e.g. pseudo labels)."""
        return hashlib.sha256(json_bytes(self.provenance)).hexdigest() if self.provenance else None


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name + ".json")


def index_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def dali_index_text(members: list[tuple[str, str, int, int]]) -> str:
    """DALI webdataset index (the format of DALI's wds2idx, v1.2) from (key, ext, data offset, size)."""
    samples: list[list[tuple[str, str, int, int]]] = []
    for m in members:
        if samples and samples[-1][0][0] == m[0]:
            samples[-1].append(m)
        else:
            samples.append([m])
    lines = [f"v1.2 {len(samples)}"]
    for s in samples:
        lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for key, ext, off, size in s))
    return "\n".join(lines) + "\n"


class ShardWriter:
    """Append samples to size-bounded tar shards in ``out_dir``; each shard appears only when complete.

    Used by ``python -m sdca_dist.shard`` and by stages that write new shards (pseudo labels):
    ``add(key, image_bytes, image_ext, label, meta)`` ... ``close() -> list[ShardInfo]``, then
    ``write_manifest`` (on one rank) over the infos of every writer.

    File-system failures (no space, not writable) raise ``OutputError`` naming the path, after
    removing the incomplete shard's temp file: nothing half-written stays behind.

    Each completed tar gets a verification record (``sdca_dist.data.verification``) from the
    sha256 computed while writing, so nothing reads it again to verify it; ``record=False`` for
    a writer whose shards are moved elsewhere afterwards (the record is of the file where it is).
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        num_classes: int = 19,
        start_index: int = 0,
        options: dict | None = None,
        record: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.record = record
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(self.out_dir, e) from None
        self.pending: list[dict] = []  # source records noted since the last complete shard
        self.prefix = prefix
        self.shard_size = parse_size(shard_size)
        self.num_classes = num_classes
        self.next_index = start_index
        self.options = dict(options or {})
        self.infos: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None  # the open shard's temp file, until it has its final name
        self._reset_current()

    def _reset_current(self) -> None:
        self._members: list[tuple[str, str, int, int]] = []
        self._samples: list[dict] = []
        self._pixels = np.zeros(self.num_classes, dtype=np.int64)

    @property
    def _name(self) -> str:
        return f"{self.prefix}-{self.next_index:06d}.tar"

    def _open(self) -> None:
        self._tmp = self.out_dir / f".tmp-{self._name}"
        try:
            self._file = open(self._tmp, "wb")
        except OSError as e:
            raise os_error(self._tmp.parent, e) from None
        self._hash = hashlib.sha256()
        self._tar = tarfile.open(fileobj=_HashingWriter(self._file, self._hash), mode="w", format=tarfile.USTAR_FORMAT)

    def _member(self, key: str, ext: str, data: bytes) -> list[int]:
        assert self._tar is not None
        name = f"{key}.{ext}"
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        offset = self._tar.offset + 512  # USTAR: one 512-byte header before the data
        self._tar.addfile(info, io.BytesIO(data))
        self._members.append((key, ext, offset, len(data)))
        return [offset, len(data)]

    def add(self, key: str, image_bytes: bytes, image_ext: str, label: np.ndarray, meta: dict) -> None:
        """Append one sample: already-encoded image bytes + an HxW uint8 trainId label."""
        label_png, pixels = encode_label(label, self.num_classes)
        self.add_encoded(key, image_bytes, image_ext, label_png, pixels, (label.shape[1], label.shape[0]), meta)

    def note_source(self, record: dict) -> None:
        """Record an input consumed without a sample (e.g. a skipped pair); it goes with the next shard."""
        self.pending.append(dict(record))

    def add_encoded(
        self,
        key: str,
        image_bytes: bytes,
        image_ext: str,
        label_png: bytes,
        pixels: list[int],
        size_wh: tuple[int, int],
        meta: dict,
        source: dict | None = None,
    ) -> None:
        """Append one encoded sample; ``source`` (its input identity) goes into the shard's provenance."""
        if "." in key or "/" in key or len(key) > 80:
            raise DataError(key, "sample key must have no '.' or '/' and at most 80 characters")
        if image_ext not in IMAGE_EXTS:
            raise DataError(key, f"image extension {image_ext!r} not one of {IMAGE_EXTS}")
        try:
            self._add(key, image_bytes, image_ext, label_png, pixels, size_wh, meta)
        except OSError as e:
            name = self._name
            self.abort()
            raise os_error(self.out_dir / name, e) from None
        if source is not None:
            self.pending.append({"key": key, **source})
        if self._tar is not None and self._tar.offset >= self.shard_size:
            self.finish_shard()

    def _add(self, key, image_bytes, image_ext, label_png, pixels, size_wh, meta) -> None:
        if self._tar is None:
            self._open()
        classes = [int(c) for c in np.flatnonzero(np.asarray(pixels))]
        meta = {**meta, "key": key, "classes": classes, "label_size": list(size_wh)}
        rec = {"key": key, "image_ext": image_ext, "size": list(size_wh), "classes": classes}
        rec["image"] = self._member(key, image_ext, image_bytes)
        rec["label"] = self._member(key, "png", label_png)
        rec["meta"] = self._member(key, "json", json_bytes(meta))
        self._samples.append(rec)
        self._pixels += np.asarray(pixels, dtype=np.int64)

    def finish_shard(self) -> None:
        """Complete the open shard: tar, then DALI index and sidecar, then the tar's final name (last)."""
        if self._tar is None:
            return
        final = self.out_dir / self._name
        try:
            self._finish(final)
        except BaseException as e:  # also a stop signal raised as an exception (python -m sdca_dist.shard)
            self.abort()
            if not final.exists():
                for p in (index_path(final), sidecar_path(final)):  # never a sidecar without its tar
                    _unlink_quietly(p)
            if isinstance(e, OSError):
                raise os_error(final, e) from None
            raise

    def _finish(self, final: Path) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the end-of-archive blocks through the hashing writer
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self._file = None
        info = ShardInfo(
            final.name,
            self._hash.hexdigest(),
            len(self._samples),
            size,
            [int(x) for x in self._pixels],
            self._samples,
            self.options,
            list(self.pending),
        )
        atomic_write_bytes(index_path(final), dali_index_text(self._members).encode())
        atomic_write_bytes(sidecar_path(final), json_bytes(info.to_json()))
        os.replace(self._tmp, final)  # last: the shard "appears" only now, complete
        self._tmp = None
        if self.record:
            from sdca_dist.data.verification import FileState, write_record

            write_record(final, info.sha256, FileState.of(final))  # hashed while written: no second read
        self.infos.append(info)
        self.pending = []
        self._tar = None
        self.next_index += 1
        self._reset_current()

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any); returns every shard this writer completed.

        Source records noted after the last sample stay in ``pending`` (no shard carries them).
        """
        if self._tar is not None and self._samples:
            self.finish_shard()
        return list(self.infos)

    def abort(self) -> None:
        """Drop the incomplete shard (after an error): its temp file is removed even when closing
        fails, and also when the tar was complete and its index or sidecar could not be written."""
        f, self._file, self._tar = self._file, None, None
        if f is not None:
            try:
                f.close()  # may raise again (ENOSPC while flushing): the unlink below still runs
            except OSError:
                pass
        if self._tmp is not None:
            _unlink_quietly(self._tmp)
            self._tmp = None
        self._reset_current()


class _HashingWriter:
    """File wrapper that hashes what tarfile writes (no second pass over a 1 GB shard)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell()


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass
class Manifest:
    """A shard set: what the loader, samplers and stages read (JSON on disk, never pickle)."""

    path: Path
    num_samples: int
    num_classes: int
    shards: list[dict]  # {"name","index","sha256","count","bytes"}
    class_pixels: list[int]
    samples: list[dict]  # per manifest index: key, shard, image/label/meta [offset,size], image_ext, size, classes
    skipped: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def shard_paths(self) -> list[Path]:
        return [self.folder / s["name"] for s in self.shards]

    def presence(self) -> list[list[int]]:
        return [s["classes"] for s in self.samples]


def load_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.json`` (a folder is accepted too); one-line error if missing or corrupt."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise DataError(p, "manifest does not exist (pack the set with python -m sdca_dist.shard)")
    try:
        d = json.loads(p.read_text())
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {MANIFEST_FORMAT!r}")
        m = Manifest(
            p,
            int(d["num_samples"]),
            int(d["num_classes"]),
            list(d["shards"]),
            list(d["class_pixels"]),
            list(d["samples"]),
            list(d.get("skipped", [])),
            dict(d.get("info", {})),
        )
        if len(m.samples) != m.num_samples or sum(s["count"] for s in m.shards) != m.num_samples:
            raise ValueError("sample counts disagree")
        for s in m.shards:  # names are plain file names: a manifest never reaches outside its folder
            for k in ("name", "index"):
                if not _plain_name(s[k]):
                    raise ValueError(f"shard {k} {s[k]!r} is not a file name inside the manifest's folder")
        for rec in m.samples:
            if not 0 <= int(rec["shard"]) < len(m.shards):
                raise ValueError(f"sample {rec.get('key')!r} names shard #{rec['shard']}, which does not exist")
    except DataError:
        raise
    except Exception as e:
        raise DataError(p, f"corrupt manifest ({type(e).__name__}: {e})") from None
    return m


def _plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and Path(name).name == name
    )


def read_sidecars(out_dir: str | Path) -> list[ShardInfo]:
    """ShardInfos of every complete shard in a folder (sidecar + tar of the recorded size)."""
    out = Path(out_dir)
    infos = []
    for side in sorted(out.glob("*.tar.json")):
        tar = side.with_name(side.name[: -len(".json")])
        if not tar.is_file():
            continue
        try:
            info = ShardInfo.from_json(json.loads(side.read_text()))
        except Exception as e:
            raise DataError(side, f"corrupt shard sidecar ({type(e).__name__}: {e})") from None
        if tar.stat().st_size == info.bytes:
            infos.append(info)
    return infos


def write_manifest(
    out_dir: str | Path,
    shard_infos: Iterable[ShardInfo] | None,
    num_classes: int,
    skipped: list[dict] | None = None,
    info: dict | None = None,
) -> Manifest:
    """Combine shards (e.g. parts written by several ranks) into ``out_dir/manifest.json``.

    ``shard_infos=None`` reads every complete shard's sidecar in the folder. Shards are ordered
    by name, so the manifest index of a sample does not depend on which rank finished first.
    """
    out = Path(out_dir)
    infos = sorted(read_sidecars(out) if shard_infos is None else list(shard_infos), key=lambda i: i.name)
    shards, samples = [], []
    pixels = np.zeros(num_classes, dtype=np.int64)
    seen: set[str] = set()
    for si, s in enumerate(infos):
        entry = {
            "name": s.name,
            "index": index_path(Path(s.name)).name,
            "sha256": s.sha256,
            "count": s.count,
            "bytes": s.bytes,
        }
        if s.provenance:
            entry["source_sha256"] = s.source_sha256()
        shards.append(entry)
        pixels += np.asarray(s.class_pixels[:num_classes], dtype=np.int64)
        for rec in s.samples:
            if rec["key"] in seen:
                raise DataError(out / s.name, f"duplicate sample key {rec['key']!r} in the shard set")
            seen.add(rec["key"])
            samples.append({**rec, "shard": si})
    doc = {
        "format": MANIFEST_FORMAT,
        "num_samples": len(samples),
        "num_classes": num_classes,
        "class_pixels": [int(x) for x in pixels],
        "shards": shards,
        "samples": samples,
        "skipped": list(skipped or []),
        "info": dict(info or {}),
    }
    path = out / "manifest.json"
    atomic_write_bytes(path, json.dumps(doc, sort_keys=True, indent=None, separators=(",", ":")).encode())
    return load_manifest(path)


class ShardReader:
    """Random access to one sample's raw bytes by manifest index (tar offsets, no tar parsing)."""

    def __init__(self, manifest: str | Path | Manifest):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.manifest.num_samples

    def _pread(self, shard: int, off_size: list[int]) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.manifest.folder / self.manifest.shards[shard]["name"]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(path, f"cannot open shard ({e.strerror})") from None
            self._fds[shard] = fd
        data = os.pread(fd, off_size[1], off_size[0])
        if len(data) != off_size[1]:
            raise DataError(self.manifest.folder / self.manifest.shards[shard]["name"], "shard is truncated")
        return data

    def read(self, index: int) -> dict:
        """{"key", "image" (bytes), "image_ext", "label" (PNG bytes), "meta" (dict), "index"}."""
        rec = self.manifest.samples[index]
        sh = rec["shard"]
        try:
            raw = self._pread(sh, rec["meta"])
            meta = json.loads(raw)
        except DataError:
            raise
        except ValueError as e:  # damaged bytes: name the shard and the sample, not a JSON traceback
            raise DataError(
                self.manifest.folder / self.manifest.shards[sh]["name"],
                f"sample {rec['key']!r}: corrupt meta json ({type(e).__name__})",
            ) from None
        return {
            "index": index,
            "key": rec["key"],
            "image": self._pread(sh, rec["image"]),
            "image_ext": rec["image_ext"],
            "label": self._pread(sh, rec["label"]),
            "meta": meta,
        }

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
