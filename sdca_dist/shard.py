"""``python -m sdca_dist.shard``: pack a dataset layout into WebDataset shards + manifest.json.

Build:   ``python -m sdca_dist.shard --layout gta5 --root data/gta5 --out shards/gta5_train``
         (layouts gta5, synthia, cityscapes, acdc, dark_zurich, bdd100k, mapillary and folder:
         docs/datasets.md; ``--condition night`` picks ACDC / Dark Zurich conditions; a user's own
         data: ``--layout folder --split S --classes classes.yaml``)
         (a rerun into the same --out resumes with identical bytes; other data or options there are
         refused, ``--overwrite`` rebuilds). Images: JPEG q90 for gta5 / synthia (GPU decode), PNG
         (lossless) for cityscapes; ``--image-format jpeg|png`` chooses explicitly.
Verify:  ``python -m sdca_dist.shard --verify --out shards/gta5_train`` (no raw data needed).
Repair:  ``python -m sdca_dist.shard --repair --root data/gta5 --out shards/gta5_train``.
Inspect: ``python -m sdca_dist.shard --inspect shards/gta5_train [--limit 5]`` (reads with webdataset).

Exit status: 0 done, 1 verify found damaged shards, 2 an error (one line naming the file or option;
nothing half-written stays on disk), 128+N stopped by signal N (SIGTERM, SIGINT, SIGHUP: the
incomplete shard's temp file is removed first; a rerun resumes). Only SIGKILL can leave a
``.tmp-*`` file, which the next build into the same ``--out`` removes.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
from pathlib import Path

from sdca_dist import arguments
from sdca_dist.data.errors import DataError
from sdca_dist.data.layouts import LAYOUTS


def shard_command(layout: str, root: Path | str, split: str, out: Path | str, workers: int = 1) -> list[str]:
    """The command line that packs one split (``python -m sdca_dist.shard ...``), for callers that
    run the tool as a subprocess (the synthetic benchmark's first use, the benchmarks, the GPU check)."""
    return [
        sys.executable,
        "-m",
        "sdca_dist.shard",
        "--layout",
        layout,
        "--root",
        str(root),
        "--split",
        split,
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    ap = arguments.parser(
        "python -m sdca_dist.shard",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--layout", choices=sorted(LAYOUTS))
    ap.add_argument("--root", type=Path, help="dataset root folder")
    ap.add_argument("--split", default="train", help="train or val (folder layout: any folder under images/)")
    ap.add_argument(
        "--condition",
        default=None,
        help="acdc: fog,night,rain,snow; dark_zurich: day,night,twilight (comma-separated; default: all)",
    )
    ap.add_argument("--classes", type=Path, default=None, help="the classes YAML file of --layout folder")
    ap.add_argument("--out", type=Path, help="folder that receives the tars + manifest.json")
    ap.add_argument("--shard-size", default="1GB", help="target shard size, e.g. 1GB, 256MB, 500k")
    ap.add_argument("--workers", type=_int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--image-format",
        choices=["jpeg", "png"],
        default=None,
        help="how images are stored: jpeg (GPU decode; default for gta5, synthia) or png (lossless, "
        "pixel-exact; default for cityscapes)",
    )
    ap.add_argument("--jpeg-quality", type=_int, default=90, help="1-100, for --image-format jpeg")
    ap.add_argument("--lossless", action="store_true", help="same as --image-format png")
    ap.add_argument(
        "--skip-mismatched", action="store_true", help="skip image/label size mismatches (listed in the manifest)"
    )
    ap.add_argument(
        "--unknown-ids",
        choices=["error", "ignore"],
        default="error",
        help="label ids outside the dataset table: fail (default) or map to 255 and count",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="rebuild --out even if it holds shards of other data or options"
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="check every shard against the manifest (after building; alone: without the raw data)",
    )
    ap.add_argument("--repair", action="store_true", help="rebuild exactly the damaged shards of --out from --root")
    ap.add_argument("--inspect", type=Path, metavar="SET", help="print a shard set's summary and first samples")
    ap.add_argument("--limit", type=_int, default=5, help="samples shown by --inspect")
    ap.add_argument("--quiet", action="store_true")
    return ap


class _Stopped(BaseException):
    """A stop signal, raised in the main thread so every cleanup path runs (temp shard removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise _Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if in_main else ()
    previous = {s: signal.signal(s, _raise_stopped) for s in stops}
    try:
        return _main(a, ap)
    except _Stopped as e:
        name = signal.Signals(e.signum).name
        where = a.out or a.inspect
        print(f"error: stopped by {name}; no incomplete shard left in {where}; rerun to resume", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(a, ap) -> int:
    try:
        if a.inspect is not None:
            return inspect(a.inspect, a.limit)
        if a.out is None:
            ap.error("--out is required")
        if a.repair:
            return _repair(a, ap)
        if a.verify and a.root is None and a.layout is None:
            return _verify(a.out)
        return _build(a, ap)
    except DataError as e:  # also OutputError, UsageError
        print(f"error: {e}", file=sys.stderr)
        return 2


def _build(a, ap) -> int:
    from sdca_dist.data.packing import PackOptions, pack
    from sdca_dist.data.shard_set import parse_size

    if a.layout is None or a.root is None:
        ap.error("--layout and --root are required to build (--verify alone checks an existing --out)")
    if a.lossless and a.image_format == "jpeg":
        ap.error("--lossless contradicts --image-format jpeg")
    opts = PackOptions(
        layout=a.layout,
        root=a.root,
        out=a.out,
        split=a.split,
        shard_size=parse_size(a.shard_size),
        workers=a.workers,
        jpeg_quality=a.jpeg_quality,
        image_format="png" if a.lossless else a.image_format,
        skip_mismatched=a.skip_mismatched,
        unknown_ids=a.unknown_ids,
        progress=not a.quiet,
        overwrite=a.overwrite,
        classes=a.classes,
        conditions=tuple(c for c in (a.condition or "").split(",") if c),
    )
    m = pack(opts)
    unknown = sum(u["pixels"] for u in m.info.get("unknown_ids", []))
    print(
        f"{m.path}: {m.num_samples} samples in {len(m.shards)} shards ({opts.format})"
        + (f", {len(m.skipped)} skipped: " + "; ".join(s["path"] for s in m.skipped) if m.skipped else "")
        + (
            f", {unknown} pixels with unknown ids mapped to 255 in {len(m.info['unknown_ids'])} labels"
            if unknown
            else ""
        )
        + ("" if m.info.get("labelled", True) else ", unlabelled (every label pixel is ignore)")
    )
    return _verify(a.out) if a.verify else 0


def _verify(out: Path) -> int:
    from sdca_dist.data.packing import verify
    from sdca_dist.data.shard_set import load_manifest

    m = load_manifest(out)
    problems = verify(m.path)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        print(
            f"verify: {len(problems)} of {len(m.shards)} shards damaged; rebuild them with "
            f"python -m sdca_dist.shard --repair --root <dataset root> --out {out}",
            file=sys.stderr,
        )
        return 1
    print(f"verify: {len(m.shards)}/{len(m.shards)} shards ok")
    return 0


def _repair(a, ap) -> int:
    from sdca_dist.data.packing import repair, verify

    if a.root is None:
        ap.error("--repair needs --root (the raw dataset the shards were built from)")
    repaired = repair(a.out, a.root, workers=a.workers)
    left = verify(a.out)
    print(
        f"repair: {len(repaired)} shard(s) rebuilt"
        + (": " + ", ".join(repaired) if repaired else "")
        + ("" if not left else f"; still damaged: {'; '.join(left)}")
    )
    return 1 if left else 0


def inspect(path: Path, limit: int = 5) -> int:
    """Summary of a shard set, read with the ``webdataset`` library (as any WebDataset user would)."""
    import numpy as np
    from PIL import Image

    from sdca_dist.data.shard_set import load_manifest
    from sdca_dist.data.webdataset_reader import iter_samples

    m = load_manifest(path)
    info = m.info
    print(
        f"{m.path}: {m.num_samples} samples, {len(m.shards)} shards, {m.num_classes} classes, "
        f"{sum(int(s['bytes']) for s in m.shards)} bytes; layout {info.get('layout', '?')}/{info.get('split', '?')}, "
        f"options {info.get('options', {})}, source {info.get('source', {}).get('root', info.get('root', '?'))}"
    )
    classes = (info.get("options") or {}).get("classes")
    if classes:
        print("classes: " + ", ".join(f"{i} {c['name']}" for i, c in enumerate(classes["classes"])))
    if not info.get("labelled", True):
        print("unlabelled: every label pixel is ignore")
    if m.skipped:
        print(f"skipped: {len(m.skipped)} ({m.skipped[0]['path']}: {m.skipped[0]['reason']}, ...)")
    for n, s in enumerate(iter_samples(m)):
        if n >= max(0, limit):
            break
        with Image.open(io.BytesIO(s.image)) as im, Image.open(io.BytesIO(s.label)) as lb:
            classes = sorted(int(c) for c in np.unique(np.asarray(lb)) if c != 255)
            print(
                f"  {s.key}  {s.shard}  image {s.image_ext} {im.size[0]}x{im.size[1]} {im.mode} "
                f"({len(s.image)} B)  label {lb.size[0]}x{lb.size[1]} classes {classes}  path {s.meta.get('path')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
