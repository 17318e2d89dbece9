"""Locks as a site's shared file systems treat them, through the real CLI.

Specifications:
* with ``flock`` failing as Lustre without ``-o flock`` (ENOSYS) and ``fcntl`` locks as NFSv3
  ``nolock`` (ENOLCK) fail them - a shim in the child process - a plain ``python -m
  sdca_dist.train conf=synthetic stage=src`` on a new run folder works: it freezes the
  configuration, generates the synthetic benchmark, holds the stage lock and the stage-cache
  key, publishes, and leaves no lock file behind;
* a file system that refuses the lock file itself is one line naming the file, the mount and the
  setting, exit 2, and the refused start leaves nothing behind;
* a refused start writes nothing: with the stage's lock held by another job, a second start
  into a folder without a configuration is refused and leaves no config.yaml; a start refused for
  a missing input leaves no run folder;
* two concurrent launches (2 ranks each) with equal settings and a short process-group timeout
  (15 s), while the
  stage-cache key is held by another job: every rank of both waits together (no rank in a
  collective while rank 0 waits), then one computes and publishes and the other reuses it; both
  exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from engine_fixtures import REPO, child_env, last_error, run_train, tiny, train_cmd

from sdca_dist.lineage import StageLock

#: the child's sitecustomize: flock fails as on Lustre without -o flock, fcntl locks as on NFSv3 nolock
_NO_FLOCK = """
import errno, fcntl, os

def _refuse(code):
    def call(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return call

fcntl.flock = _refuse(errno.ENOSYS)
fcntl.lockf = _refuse(errno.ENOLCK)
_fcntl = fcntl.fcntl

def _no_record_locks(fd, cmd, *args):
    if cmd in (fcntl.F_SETLK, fcntl.F_SETLKW, fcntl.F_GETLK):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    return _fcntl(fd, cmd, *args)

fcntl.fcntl = _no_record_locks
"""

#: the child's sitecustomize: the file system refuses lock files themselves
_NO_LOCK_FILES = """
import errno, os
_open = os.open

def _open_refusing_locks(path, flags, *args, **kwargs):
    if str(path).endswith(".lock") and flags & os.O_CREAT:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK), str(path))
    return _open(path, flags, *args, **kwargs)

os.open = _open_refusing_locks
"""


def _shim_path(tmp_path: Path, code: str) -> str:
    """PYTHONPATH for a child whose startup runs ``code`` (as its sitecustomize)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(code)
    return os.pathsep.join([str(shim), str(REPO), os.environ.get("PYTHONPATH", "")])


def _lock_files(*roots: Path) -> list[Path]:
    return [p for r in roots for p in r.rglob("*") if p.name.endswith(".lock") or p.name.endswith(".break")]


def test_every_lock_site_works_where_flock_fails(tmp_path):
    run, shards, cache = tmp_path / "run", tmp_path / "shards", tmp_path / "cache"
    run.mkdir()  # the launcher's choice of cache, so the stage-cache key's lock is taken too
    (run / "cache.json").write_text(json.dumps({"enabled": True, "dir": str(cache), "recompute": []}))
    proc = subprocess.run(
        [*train_cmd(1, tiny(shards, "stage=src", f"run_dir={run}", "train.iters=2"))],
        cwd=REPO,
        env=child_env(PYTHONPATH=_shim_path(tmp_path, _NO_FLOCK)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "generating the synthetic benchmark" in proc.stdout
    assert "published to the stage cache as" in proc.stdout
    assert (run / "config.yaml").is_file() and (run / "src" / "DONE").is_file()
    assert not _lock_files(run, shards, cache), "a released lock left its file"


def test_a_file_system_refusing_lock_files_is_one_line_and_leaves_nothing(tmp_path, shards):
    run = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(1, tiny(shards, "stage=src", f"run_dir={run}")),
        cwd=REPO,
        env=child_env(PYTHONPATH=_shim_path(tmp_path, _NO_LOCK_FILES)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = last_error(proc)
    assert err.startswith(f"error: cannot create the lock file {run / '.config.lock'} (No locks available) on /")
    assert err.endswith("locks need a folder this job can write on a file system all nodes share; set run_dir to one")
    assert not run.exists(), "the refused start left its run folder"


def test_a_start_refused_by_a_held_stage_writes_no_configuration(tmp_path, shards):
    run = tmp_path / "run"
    lock = StageLock(run / "src")  # another job holds the stage of a folder without configuration
    lock.acquire()
    try:
        proc = run_train(1, tiny(shards, "stage=src", f"run_dir={run}"), timeout=300)
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is in use by pid" in last_error(proc)
    assert not (run / "config.yaml").exists() and not (run / "config.origin.json").exists()
    assert sorted(p.name for p in run.rglob("*")) == ["src"], "the refused start wrote into the folder"


def test_a_start_refused_for_a_missing_input_leaves_no_run_folder(tmp_path, shards):
    run = tmp_path / "run"
    proc = run_train(1, tiny(shards, "stage=sdca", f"run_dir={run}"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not exist (run stage src first)" in last_error(proc)
    assert not run.exists()


def test_two_launches_wait_together_for_a_held_cache_key_and_share_one_result(tmp_path, shards):
    from sdca_dist.data.sets import ensure_synthetic_shards
    from sdca_dist.lineage import Lineage
    from sdca_dist.locks import FileLock
    from sdca_dist.stage_keys import stage_key
    from sdca_dist.train import prepare

    cache = tmp_path / "cache"
    argv = {n: tiny(shards, "stage=src", f"run_dir={tmp_path / n}", "train.iters=2") for n in ("a", "b")}
    for name in argv:
        (tmp_path / name).mkdir()
        (tmp_path / name / "cache.json").write_text(json.dumps({"enabled": True, "dir": str(cache), "recompute": []}))
    cfg, _ = prepare(argv["a"])  # the key both launches compute (2 CPU ranks)
    ensure_synthetic_shards(cfg)  # the shared benchmark, made on first use
    key = stage_key(cfg, "src", Lineage(cfg.run_dir).current(cfg, "src")["inputs"], world_size=2, device="cpu")
    held = FileLock(cache / ".locks" / f"{key}.lock")  # another job computing the key
    assert held.try_acquire()

    env = child_env(SDCA_PG_TIMEOUT_S="15")
    procs = {
        n: subprocess.Popen(
            train_cmd(2, a), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for n, a in argv.items()
    }
    out: dict[str, list[str]] = {n: [] for n in procs}
    waiting = {n: threading.Event() for n in procs}

    def read(name: str) -> None:
        for line in procs[name].stdout:
            out[name].append(line)
            if "is being computed by" in line:
                waiting[name].set()

    readers = [threading.Thread(target=read, args=(n,), daemon=True) for n in procs]
    for t in readers:
        t.start()
    try:
        for name, ev in waiting.items():
            assert ev.wait(600), f"launch {name} never waited for the key: {''.join(out[name])[-3000:]}"
        # both wait: hold the key for more than two process-group timeouts (the duration under
        # test, not an ordering: a rank left in a collective meanwhile fails after 15 s)
        time.sleep(35)
        assert all(p.poll() is None for p in procs.values()), {n: "".join(o)[-3000:] for n, o in out.items()}
    finally:
        held.release()
    codes = {n: p.wait(timeout=900) for n, p in procs.items()}
    for t in readers:
        t.join(timeout=60)
    text = {n: "".join(o) for n, o in out.items()}
    assert codes == {"a": 0, "b": 0}, {n: t[-3000:] for n, t in text.items()}
    published = [n for n in text if "published to the stage cache as" in text[n]]
    reused = [n for n in text if "reused from" in text[n]]
    assert len(published) == 1 and len(reused) == 1 and published != reused, text
