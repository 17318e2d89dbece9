"""Shard verification records: hashing at cluster scale.

Specifications:
* the writer records every tar it completes (hashed while written); the record holds while the
  tar's inode, size, mtime and ctime are unchanged, and a tar rewritten in place (same size, new
  bytes; even with its mtime set back) is seen as changed from ``stat`` alone, naming what changed;
* where the shard set's parent cannot hold records they go to the cache folder
  (``SDCA_VERIFY_DIR``) and are found there;
* a stage start hashes the tars without a valid record on all ranks at once, each its share
  (disjoint, together all), and rank 0's check then takes the gathered results (real gloo ranks);
* ``status=true`` and a launch of a finished run read no shard tar (a process in which opening
  any ``.tar`` fails still reports every stage done and starts no stage process), and a
  pseudo-label tar rewritten in place makes its reader stale in the status view, still without
  reading it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from engine_fixtures import REPO, child_env, copy_run, run_launcher

from sdca_dist.data import verification as ver
from sdca_dist.data.shard_set import load_manifest
from sdca_dist.files import sha256_file

#: runs the launcher in a process where opening any ``*.tar`` fails, as an unreadable tar would
_NO_TARS = """
import os, runpy, sys
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(os.fspath(args[0]))
        if path.endswith(".tar"):
            raise PermissionError(13, "opening a shard tar is not allowed here", path)
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _no_tars_launcher(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _NO_TARS, str(REPO / "launch" / "slurm.py"), *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _copy_set(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / "manifest.json"


def test_the_writer_records_each_tar_and_a_rewritten_tar_is_seen_from_stat(shard_sets, tmp_path):
    m = load_manifest(shard_sets["gta5"])
    assert len(m.shards) > 1
    for s in m.shards:  # written by ShardWriter: a record per tar, with the manifest's sha256
        assert ver.lookup(m.folder / s["name"]) == s["sha256"]
    copy = load_manifest(_copy_set(shard_sets["gta5"], tmp_path / "gta5"))
    tar = copy.folder / copy.shards[0]["name"]
    assert ver.lookup(tar) is None, "a copy is another file: no record until it is hashed"
    assert "no verification record" in ver.why_unverified(tar)
    assert ver.verified_sha(tar) == copy.shards[0]["sha256"]  # hashed once, recorded
    assert ver.lookup(tar) == copy.shards[0]["sha256"] == ver.recorded_sha(tar)

    before = os.stat(tar)
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))  # same size, other bytes
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the mtime set back
    assert os.stat(tar).st_size == before.st_size and os.stat(tar).st_mtime_ns == before.st_mtime_ns
    assert ver.lookup(tar) is None
    why = ver.why_unverified(tar)
    assert str(tar) in why and "ctime_ns" in why and "size" not in why, why
    try:
        ver.recorded_sha(tar)
        raise AssertionError("an unverified tar must not be given a sha256")
    except ver.Unverified as exc:
        assert exc.tar == tar
    assert ver.verified_sha(tar) == sha256_file(tar) != copy.shards[0]["sha256"]

    tar.write_bytes(bytes(data) + b"\0" * 512)  # another size
    assert ver.lookup(tar) is None and "size" in ver.why_unverified(tar)


def test_records_go_to_the_cache_folder_where_the_sets_parent_cannot_hold_them(shard_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("SDCA_VERIFY_DIR", str(tmp_path / "cache"))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / ver.RECORDS).write_text("a file where the records folder would be")
    copy = load_manifest(_copy_set(shard_sets["synthia"], tmp_path / "ro" / "synthia"))
    tar = copy.folder / copy.shards[0]["name"]
    assert ver.verified_sha(tar) == copy.shards[0]["sha256"]
    beside, cached = ver.record_paths(tar)
    assert not beside.exists() and cached.is_file() and cached.is_relative_to(tmp_path / "cache")
    assert ver.lookup(tar) == copy.shards[0]["sha256"]


def test_the_split_over_ranks_is_balanced_and_complete():
    sizes = [10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9]
    parts = [ver.share(sizes, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes) // 2, loads


def _verify_on_ranks(rank: int, world: int, cfg_args: list[str], run: str) -> dict:
    import torch

    from sdca_dist.config import compose_config
    from sdca_dist.engine.distributed import DistContext
    from sdca_dist.engine.runner import verify_tars_in_parallel
    from sdca_dist.lineage import Lineage

    cfg = compose_config(cfg_args)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    lineage = Lineage(run)
    logs: list[str] = []
    mine = verify_tars_in_parallel(cfg, "src", lineage, ctx, logs)
    again = verify_tars_in_parallel(cfg, "src", Lineage(run), ctx, [])
    return {"mine": sorted(mine), "known": sorted(lineage.known), "logs": logs, "again": sorted(again)}


def test_a_stage_start_hashes_unrecorded_tars_on_all_ranks_at_once(shard_sets, tmp_path):
    from method_fixtures import run_distributed

    source = _copy_set(shard_sets["gta5"], tmp_path / "sets" / "gta5")
    val = _copy_set(shard_sets["cityscapes_val"], tmp_path / "sets" / "val")
    tars = {str(p) for m in (source, val) for p in load_manifest(m).shard_paths()}
    assert len(tars) >= 4 and all(ver.lookup(Path(t)) is None for t in tars)
    args = ["conf=synthetic", f"data.source={source.parent}", f"data.target_val={val.parent}"]
    out = run_distributed(_verify_on_ranks, 2, args, str(tmp_path / "run"))
    mine = [set(o["mine"]) for o in out]
    assert mine[0] and mine[1] and not mine[0] & mine[1], "each rank hashes its own share"
    assert mine[0] | mine[1] == tars, "together, every tar"
    assert set(out[0]["known"]) == set(out[1]["known"]) == tars, "every rank has every result"
    assert f"hashed {len(tars)} of {len(tars)} shard tars" in out[0]["logs"][0]
    assert all(ver.lookup(Path(t)) == sha256_file(t) for t in tars)
    assert out[0]["again"] == out[1]["again"] == [], "with every record valid, nothing is read again"


def test_status_and_a_launch_of_a_finished_run_read_no_shard_tar(tiny_chain, tmp_path):
    run = copy_run(tiny_chain, tmp_path / "run")
    first = run_launcher([f"run_dir={run}"])  # the copied pseudo-label tars are new files: hashed here, once
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    again = _no_tars_launcher([f"run_dir={run}"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = re.findall(r"^\[launch\] \S+ (\w+): DONE with these settings and inputs, skipped$", again.stdout, re.M)
    assert {"src", "dist_init", "sdca", "pseudo_label", "ssl"} <= set(skipped), again.stdout[-3000:]
    assert not re.search(r"^\[launch\] seed \d+ \w+ \(", again.stdout, re.M), "no stage process started"

    status = _no_tars_launcher([f"run_dir={run}", "status=true"])
    assert status.returncode == 0, status.stderr[-2000:]
    rows = dict(re.findall(r"^seed \d+\s+(\w+)\s+(\w+)", status.stdout, re.M))
    assert rows and set(rows.values()) == {"done"}, status.stdout

    # a pseudo-label tar rewritten in place (same size): ssl is stale, still without reading a tar
    tar = sorted((run / "pseudo_label" / "shards").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[-2000] ^= 0x01
    tar.write_bytes(bytes(data))
    status = _no_tars_launcher([f"run_dir={run}", "status=true"])
    assert status.returncode == 0, status.stderr[-2000:]
    line = next(ln for ln in status.stdout.splitlines() if re.match(r"seed \d+\s+ssl\s", ln))
    assert " stale " in line and str(tar) in line and "changed since it was verified" in line, line
    assert dict(re.findall(r"^seed \d+\s+(\w+)\s+(\w+)", status.stdout, re.M))["pseudo_label"] == "done"
