"""The stage cache: publish, verify, reuse, race; and reuse through the real launcher.

Specifications:
* a published entry holds the stage folder's result files (not its checkpoints, TensorBoard
  events or records), each verified by sha256; restoring gives byte-identical files;
* a corrupt entry is reported in one line, removed, and the stage computed again;
* two processes racing for one key: the second waits on the key's lock and reuses what the
  first published; never both compute;
* through the launcher: a second run whose src reads the same settings (only ``method.tau``
  differs) reuses src (DONE ``reused_from``, same output hashes), byte-identical to the src a
  ``cache=false`` run computes (its metrics too, but for their timings); the launcher restores
  it itself (DONE ``restored_by: launcher``; it starts no stage process for it); ``redo=[src]``
  computes it again instead of reusing.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
from engine_fixtures import run_launcher, tiny

from sdca_dist.files import sha256_file
from sdca_dist.stage_cache import CachedStage, StageCache, recomputed

#: the launcher tests start four tiny src stages (about a minute on an idle 2-core machine)
pytestmark = pytest.mark.timeout(2400)


def _stage_folder(root: Path, payload: bytes = b"weights") -> Path:
    folder = root / "src"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "tb").mkdir()
    (folder / "model_final.pt").write_bytes(payload)
    (folder / "metrics.json").write_text('{"mIoU": 1.0}')
    (folder / "shards").mkdir()
    (folder / "shards" / "part-0.tar").write_bytes(b"tar" * 100)
    (folder / "checkpoints" / "iter_1.pt").write_bytes(b"ckpt")
    (folder / "tb" / "events").write_bytes(b"ev")
    for name in ("DONE", "LINEAGE.json", ".lock", "progress.json"):
        (folder / name).write_text("{}")
    return folder


def test_publish_then_restore_gives_the_same_bytes_and_only_the_results(tmp_path):
    cache = StageCache(tmp_path / "cache", log=lambda m: None)
    folder = _stage_folder(tmp_path / "a")
    assert cache.publish("k1", "src", folder, {"mIoU": 1.0}, str(folder), "code")
    assert not cache.publish("k1", "src", folder, {"mIoU": 1.0}, str(folder), "code"), "an entry is written once"
    record = cache.lookup("k1")
    assert sorted(record["files"]) == ["metrics.json", "model_final.pt", "shards/part-0.tar"]
    target = tmp_path / "b" / "src"
    cache.restore("k1", record, target)
    for rel in record["files"]:
        assert (target / rel).read_bytes() == (folder / rel).read_bytes()
    assert not list((tmp_path / "cache").glob(".tmp-*")), "no temporary folder left"
    # the entry is a copy: rewriting the producer's file in place leaves it intact
    (folder / "model_final.pt").write_bytes(b"changed")
    assert cache.lookup("k1") is not None


def test_a_corrupt_entry_is_reported_in_one_line_removed_and_recomputed(tmp_path):
    lines: list[str] = []
    cache = StageCache(tmp_path / "cache", log=lines.append)
    folder = _stage_folder(tmp_path / "a")
    cache.publish("k2", "src", folder, {}, str(folder), "code")
    entry = tmp_path / "cache" / "k2" / "files" / "model_final.pt"
    entry.write_bytes(b"weightz")
    use = CachedStage(cache, "k2", "src", tmp_path / "b" / "src")
    assert use.reuse() is None, "a corrupt entry is not reused"
    assert len(lines) == 1 and lines[0].startswith("stage cache: entry k2 is corrupt (")
    assert "model_final.pt is not the file published (sha256 differs)" in lines[0]
    assert not (tmp_path / "cache" / "k2").exists()
    _stage_folder(tmp_path / "b", payload=b"weights")  # the stage computed again
    use.publish({"mIoU": 2.0}, "code")  # and published again
    use.release()
    assert cache.lookup("k2")["summary"] == {"mIoU": 2.0}


def _racer(cache_dir: str, folder: str, out: str, role: str, holding, asking) -> None:
    """One job of the race. Ordered by events, not by time: the second asks for the key only once
    the first has found it missing (and so holds it), and the first publishes only once the second
    is asking. A lock that did not keep the second out would let it compute too."""
    cache = StageCache(cache_dir, log=lambda m: None)
    use = CachedStage(cache, "race", "src", Path(folder) / "src")
    if role == "second":
        if not holding.wait(120):
            raise SystemExit("the first job never took the key")
        asking.set()
    summary = use.reuse()
    if summary is None:  # computing, holding the key
        if role == "first":
            holding.set()
            if not asking.wait(120):
                raise SystemExit("the second job never asked for the key")
        _stage_folder(Path(folder), payload=folder.encode())
        use.publish({"by": folder}, "code")
        use.release()
        Path(out).write_text("computed")
    else:
        Path(out).write_text("reused " + summary["by"])


def test_two_jobs_racing_for_one_key_compute_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    holding, asking = ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(
            target=_racer,
            args=(str(tmp_path / "cache"), str(tmp_path / n), str(tmp_path / f"{n}.out"), n, holding, asking),
        )
        for n in ("first", "second")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "first.out").read_text() == "computed"
    assert (tmp_path / "second.out").read_text() == f"reused {tmp_path / 'first'}"
    assert (tmp_path / "second" / "src" / "model_final.pt").read_bytes() == str(tmp_path / "first").encode()


def test_redo_recomputes_the_named_stage_and_every_later_one():
    assert recomputed(["src", "dist_init", "sdca"], ["dist_init"]) == ["dist_init", "sdca"]
    assert recomputed(["src", "dist_init", "sdca"], []) == []


@pytest.fixture(scope="module")
def two_runs(shards, tmp_path_factory):
    """tau=100 computes src; tau=10 reuses it; a cache=false run computes it again."""
    root = tmp_path_factory.mktemp("cache_runs")
    common = ["cluster=local", "train.iters=2", "stages=[src]", f"cache_dir={root / 'cache'}"]
    out = {}
    for name, extra in (("a", ["method.tau=100"]), ("b", ["method.tau=10"]), ("c", ["method.tau=10", "cache=false"])):
        proc = run_launcher(tiny(shards, *common, *extra, f"run_dir={root / name}"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = proc
    return root, out


def test_a_run_reading_the_same_settings_reuses_src_byte_identical_to_a_recomputation(two_runs):
    root, procs = two_runs
    a, b, c = (json.loads((root / n / "src" / "DONE").read_text()) for n in "abc")
    assert "reused_from" not in a and "reused_from" not in c
    assert b["reused_from"] == a["key"] == b["key"] and b["lineage"]["reused_from"] == a["key"]
    assert "[src] reused from " in procs["b"].stdout
    # the hit is restored by the launcher itself: no job, no stage process (the local backend
    # prints "[launch] seed N <stage> (why): <command>" for every process it starts)
    assert b["restored_by"] == "launcher" and "restored by the launcher" in procs["b"].stdout
    assert not re.search(r"^\[launch\] seed \d+ src \(", procs["b"].stdout, re.M), procs["b"].stdout
    assert re.search(r"^\[launch\] seed \d+ src \(", procs["a"].stdout, re.M)  # a computed it in a process
    assert b["outputs"] == a["outputs"] == c["outputs"], "reuse and recomputation give the same bytes"
    assert sha256_file(root / "b" / "src" / "model_final.pt") == sha256_file(root / "c" / "src" / "model_final.pt")
    reused, recomputed = (json.loads((root / n / "src" / "metrics.json").read_text()) for n in "bc")
    assert reused["mIoU"] == recomputed["mIoU"] and reused["per_class"] == recomputed["per_class"]
    # metrics.json also holds the producer's timings (eval_seconds, images/s): those are measurements
    assert b["mIoU"] == a["mIoU"] and b["computed_wall_seconds"] == a["wall_seconds"]
    assert b["model_final"] == str(root / "b" / "src" / "model_final.pt")
    assert "stage cache: off (cache=false)" in procs["c"].stdout


def test_redo_computes_again_instead_of_reusing(two_runs):
    root, _ = two_runs
    proc = run_launcher([f"run_dir={root / 'b'}", "stages=[src]", "redo=[src]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads((root / "b" / "src" / "DONE").read_text())
    assert "reused_from" not in done and "[src] reused from" not in proc.stdout
    assert done["outputs"] == json.loads((root / "a" / "src" / "DONE").read_text())["outputs"]
