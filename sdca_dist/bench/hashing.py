"""``python -m sdca_dist.bench hashing``: what a status call, a launch and a stage start read of
a >= 2 GB shard set, hashing every tar versus trusting verification records.

Builds, in ``--dir`` (default: a new folder under /tmp, deleted at the end), a shard set of
``--gb`` GB (incompressible payloads through ``ShardWriter``, ``--shard-mb`` MB tars) as
``data.source`` and a one-tar set as ``data.target_val``, and a run folder whose stage src is
DONE on them (its lineage made by the real ``Lineage.current``, as a stage start makes it).
Then, in this process, each measured with the set's pages dropped from the page cache first
(``posix_fadvise DONTNEED``, so the tars are read from the disk, not memory):

* before: every tar hashed, as a status call and a launch did for every stage of every run
  folder (``Lineage.fresh`` with no record trusted), and as rank 0 did at every stage start
  while the other ranks waited (``Lineage.verified_inputs``, no record trusted);
* after: ``status=true``'s whole view (``status_rows``, read-only: records only), the launch's
  ``fresh`` and a stage start's check with valid records (``verify_tars_in_parallel``'s share,
  then ``verified_inputs``);
* a first stage start without records on ``--ranks`` ranks: each rank's share hashed in turn
  here (on a cluster the ranks read at once, on their own nodes); the longest share is how long
  the ranks wait for one another in the gather, against rank 0 alone hashing everything.

Ends with ``status speedup: Nx`` and ``stage start wait ratio: Nx``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sdca_dist import arguments


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build_set(out: Path, gb: float, shard_mb: int, seed: int = 0) -> Path:
    """A shard set of about ``gb`` GB of incompressible 1 MB "images" (64x128 labels)."""
    from sdca_dist.data.shard_set import ShardWriter, encode_label, write_manifest

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 19, size=(64, 128), dtype=np.uint8)
    label_png, pixels = encode_label(label, 19)
    writer = ShardWriter(out, shard_size=shard_mb << 20)
    n = max(1, int(gb * 1e9 / (1 << 20)))
    for i in range(n):
        writer.add_encoded(f"s{i:06d}", rng.bytes(1 << 20), "jpg", label_png, pixels, (128, 64), {})
    infos = writer.close()
    return write_manifest(out, infos, 19).path


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str]) -> int:
    ap = arguments.parser("python -m sdca_dist.bench hashing", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gb", type=arguments.float_above(0.0), default=2.0, help="size of the shard set in GB (default 2)"
    )
    ap.add_argument("--shard-mb", type=arguments.int_between(1, 4096), default=256, help="tar size in MB (default 256)")
    ap.add_argument(
        "--ranks", type=arguments.int_between(1, 1024), default=8, help="ranks of a first start (default 8)"
    )
    ap.add_argument("--dir", default=None, help="where to build (default a new folder under /tmp, removed)")
    args = ap.parse_args(argv)
    if args.gb > 64:
        ap.error(f"argument --gb: at most 64 (the set is built on this disk), got {args.gb}")

    from sdca_dist.config import compose_config
    from sdca_dist.config.run_config import freeze
    from sdca_dist.data.shard_set import load_manifest
    from sdca_dist.data.verification import FULL_CHECK_DAYS, record_paths, share
    from sdca_dist.engine.distributed import DistContext
    from sdca_dist.launch import grid  # noqa: F401 - the status view's imports, before the clock starts
    from sdca_dist.launch.status import status_rows
    from sdca_dist.lineage import Lineage, settings_record
    from sdca_dist.run_folder import PLAN

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sdca-bench-hashing-", dir="/tmp"))
    try:
        t_build, big = _timed(lambda: build_set(work / "sets" / "big", args.gb, args.shard_mb))
        small = build_set(work / "sets" / "small", 0.002, 64, seed=1)
        tars = load_manifest(big).shard_paths() + load_manifest(small).shard_paths()
        total = sum(p.stat().st_size for p in tars)
        print(f"shard set: {len(tars) - 1} tars, {total / 1e9:.2f} GB, built in {t_build:.1f}s ({work})")

        overrides = ["conf=synthetic", f"data.source={big.parent}", f"data.target_val={small.parent}"]
        cfg = compose_config(overrides)
        run = work / "run"
        freeze(run, cfg, overrides)
        (run / PLAN).write_text(json.dumps({"stages": {"src": {}}}))
        maker = Lineage(run)
        record = maker.current(cfg, "src")  # records exist: the writer made them
        maker.begin("src", record)
        maker.finish("src", record, {"wall_seconds": 0.0}, settings=settings_record(cfg))

        rows: dict[str, float] = {}
        _drop_cache(tars)
        rows["before: status/launch, one stage (every tar hashed)"], ok = _timed(
            lambda: Lineage(run, max_age_days=0).fresh(cfg, "src")
        )
        assert ok == (True, "done"), ok
        _drop_cache(tars)
        rows["before: stage start, rank 0 alone (every tar hashed)"], _ = _timed(
            lambda: Lineage(run, max_age_days=0).verified_inputs(cfg, "src")
        )
        _drop_cache(tars)
        rows["after: status=true, whole view (records)"], srows = _timed(lambda: status_rows(run))
        assert [r[3] for r in srows] == ["done"], srows
        rows["after: launch, one stage (records)"], ok = _timed(lambda: Lineage(run).fresh(cfg, "src"))
        assert ok == (True, "done"), ok

        from sdca_dist.engine.runner import verify_tars_in_parallel  # imported before the clock starts

        def stage_start() -> None:
            lineage = Lineage(run, max_age_days=FULL_CHECK_DAYS)
            verify_tars_in_parallel(cfg, "src", lineage, DistContext(0, 1, 0, _cpu(), "gloo"), [])
            lineage.verified_inputs(cfg, "src")

        rows["after: stage start (records)"], _ = _timed(stage_start)

        # a first stage start: no records; each rank hashes its share (here one after the other)
        for tar in tars:
            for p in record_paths(tar):
                p.unlink(missing_ok=True)
        from sdca_dist.data.verification import verify_share

        shares = []
        for r in range(args.ranks):
            _drop_cache(tars)
            shares.append(_timed(lambda r=r: verify_share([(t, t.stat().st_size) for t in tars], r, args.ranks))[0])
        sizes = [t.stat().st_size for t in tars]
        biggest = max(sum(sizes[i] for i in share(sizes, r, args.ranks)) for r in range(args.ranks))
        rows[f"after: first stage start, longest of {args.ranks} shares ({biggest / 1e9:.2f} GB)"] = max(shares)
        rows[f"after: first stage start, all {args.ranks} shares one after the other"] = sum(shares)

        width = max(len(k) for k in rows)
        for k, v in rows.items():
            print(f"{k:<{width}}  {v:8.3f} s")
        before_status = rows["before: status/launch, one stage (every tar hashed)"]
        after_status = rows["after: status=true, whole view (records)"]
        before_start = rows["before: stage start, rank 0 alone (every tar hashed)"]
        first_start = max(shares)
        print(f"read per status call: before {total / 1e9:.2f} GB per stage of every run folder, after 0 GB")
        print(f"status speedup: {before_status / max(after_status, 1e-9):.0f}x")
        print(
            f"stage start wait ratio: {first_start / before_start:.2f}x (first start on {args.ranks} ranks), "
            f"{rows['after: stage start (records)'] / before_start:.4f}x (later starts)"
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _cpu():
    import torch

    return torch.device("cpu")
