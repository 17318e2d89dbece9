"""``python -m sdca_dist.shard``: pack a dataset layout into WebDataset shards + manifest.json.

Example: ``python -m sdca_dist.shard --layout gta5 --root data/gta5 --out shards/gta5_train``.
Every bad input ends the run with one line naming the file, and leaves no partial shard.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sdca_dist.data.errors import DataError
from sdca_dist.data.layouts import LAYOUTS
from sdca_dist.data.packing import PackOptions, pack, verify
from sdca_dist.data.shards import parse_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdca_dist.shard", description=__doc__.splitlines()[0])
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--root", required=True, type=Path, help="dataset root folder")
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--out", required=True, type=Path, help="folder that receives the tars + manifest.json")
    ap.add_argument("--shard-size", default="1GB", help="target shard size, e.g. 1GB, 256MB, 500k")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--lossless", action="store_true", help="store images as lossless PNG (key.img.png)")
    ap.add_argument("--skip-mismatched", action="store_true", help="skip image/label size mismatches (listed in the manifest)")
    ap.add_argument("--unknown-ids", choices=["error", "ignore"], default="error",
                    help="label ids outside the dataset table: fail (default) or map to 255 and count")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        opts = PackOptions(layout=a.layout, root=a.root, out=a.out, split=a.split, shard_size=parse_size(a.shard_size),
                           workers=max(1, a.workers), jpeg_quality=a.jpeg_quality, lossless=a.lossless,
                           skip_mismatched=a.skip_mismatched, unknown_ids=a.unknown_ids, progress=not a.quiet)
        m = pack(opts)
        unknown = sum(u["pixels"] for u in m.info.get("unknown_ids", []))
        print(f"{m.path}: {m.num_samples} samples in {len(m.shards)} shards"
              + (f", {len(m.skipped)} skipped: " + "; ".join(s["path"] for s in m.skipped) if m.skipped else "")
              + (f", {unknown} pixels with unknown ids mapped to 255 in {len(m.info['unknown_ids'])} labels" if unknown else ""))
        if a.verify:
            problems = verify(m.path)
            for p in problems:
                print(f"verify: {p}", file=sys.stderr)
            print(f"verify: {len(m.shards) - len(problems)}/{len(m.shards)} shards ok" if not problems
                  else f"verify: {len(problems)} problem(s)")
            if problems:
                return 1
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
