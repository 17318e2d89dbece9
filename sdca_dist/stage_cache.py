"""The stage cache: finished stages' files, stored under their stage key, reused by other runs.

A stage whose key (``sdca_dist.stage_keys``) is in the cache does not run: its files are put in
its folder (hard link, else copy), each verified against the sha256 the entry records, and its
DONE carries the producer's summary, the same output hashes and ``reused_from``. Every later
stage and every check then sees ordinary files. A finished stage that ran publishes its files.

Layout of ``cache_dir``::

    <key>/ENTRY.json    {key, stage, files: {relative path: sha256}, summary, producer, code}
    <key>/files/...     the stage folder's files (not its checkpoints, TensorBoard events,
                        DONE, LINEAGE.json, progress record, lock or shard
                        verification records)
    .locks/<key>.lock   held (``sdca_dist.locks``) by the job computing or restoring that key

* publishing is atomic: the files are copied (never linked: the entry must not change when a
  run folder's file does) into ``.tmp-<key>.<pid>``, verified, then the folder is renamed to
  ``<key>``; a crash leaves only a temporary folder that no reader looks at;
* a corrupt entry (a file missing or with another sha256) is reported in one line, removed,
  and the stage computed again (and published again);
* two jobs racing for one key: the first takes the key's lock and computes; the second waits
  for the lock and then reuses the published entry. Never both write one entry. The engine's
  wait is taken by all ranks together before the stage (``CachedStage.attempt``, polled), so no
  rank waits inside a collective for another job's whole stage.
* the launcher restores a hit itself (``sdca_dist.launch.restore``), before it starts or
  submits anything: a stage whose key has an entry gets no job, no allocation and no stage
  process. It reads the entry without the key's lock (``peek``: an entry is complete once its
  folder exists) and never waits: a key being computed is left to the stage's job as before.

Which cache a run folder uses is in ``<run_dir>/cache.json`` (written by the launcher at each
launch: ``{"enabled": bool, "dir": path, "recompute": [stages]}``); a run folder without one
(a stage run directly with ``python -m sdca_dist.train``) uses no cache. No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from sdca_dist.files import atomic_write_text, sha256_file
from sdca_dist.run_folder import ATTEMPT_RECORDS, SHARD_RECORDS
from sdca_dist.run_folder import CACHE_SETTING as CACHE_FILE

ENTRY = "ENTRY.json"
DEFAULT_DIR_NAME = "stage_cache"
#: stage-folder names that are records of one attempt, not results
_NOT_CACHED = ATTEMPT_RECORDS | {SHARD_RECORDS}


def default_cache_dir(launch_root: Path | str) -> Path:
    """``<runs folder>/stage_cache``: beside the launch's run (or grid) folder, so runs started
    next to each other share it."""
    return Path(launch_root).resolve().parent / DEFAULT_DIR_NAME


def launch_cache_dir(launch: Any, launch_root: Path | str) -> Optional[Path]:
    """The cache a launch uses: ``cache_dir=`` or the default; None with ``cache=false``."""
    if not launch.cache:
        return None
    return Path(launch.cache_dir).resolve() if launch.cache_dir else default_cache_dir(launch_root)


def recomputed(stages: list[str], redo: list[str]) -> list[str]:
    """The planned stages ``redo=`` asks to compute again: the named ones and every later one
    (a redo means "run it", not "find it in the cache")."""
    if not redo:
        return []
    first = min(stages.index(s) for s in redo if s in stages) if any(s in stages for s in redo) else len(stages)
    return [s for i, s in enumerate(stages) if i >= first or s in redo]


def write_run_cache_setting(run_dir: Path | str, cache_dir: Optional[Path], recompute: list[str] = ()) -> None:
    """The launcher's choice for this launch (``cache_dir=None``: off)."""
    payload = {"enabled": cache_dir is not None, "dir": str(Path(cache_dir).resolve()) if cache_dir else None}
    payload["recompute"] = list(recompute)
    atomic_write_text(Path(run_dir) / CACHE_FILE, json.dumps(payload, indent=1) + "\n")


def cache_for_run(run_dir: Path | str, stage: str, log: Callable[[str], None] = print) -> Optional["StageCache"]:
    """The cache this run folder's stage ``stage`` uses, or None (no cache.json, cache off, or
    ``stage`` to be recomputed on this launch's ``redo=``)."""
    try:
        setting = json.loads((Path(run_dir) / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(setting, dict) or not setting.get("enabled") or not setting.get("dir"):
        return None
    if stage in (setting.get("recompute") or []):
        return None
    return StageCache(Path(setting["dir"]), log=log)


def _cached_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in _NOT_CACHED or any(p.startswith(".tmp-") for p in rel.parts):
            continue
        if path.is_file() and not path.is_symlink():
            out.append(rel)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


class CorruptEntry(ValueError):
    pass


class StageCache:
    def __init__(self, root: Path | str, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.log = log
        self._lock = None

    def entry(self, key: str) -> Path:
        return self.root / key

    # --- the key's lock ---------------------------------------------------------------------------
    def _key_lock(self, key: str):
        from sdca_dist.locks import FileLock

        if self._lock is None or self._lock.path.name != f"{key}.lock":
            self._lock = FileLock(self.root / ".locks" / f"{key}.lock", setting="cache_dir (or cache=false)")
        return self._lock

    def try_acquire(self, key: str) -> bool:
        """Take ``key``'s lock if no live job holds it (never waits)."""
        return self._key_lock(key).try_acquire()

    def holder(self, key: str) -> str:
        h = self._key_lock(key).holder()
        return h.describe() if h else "another job"

    def acquire(self, key: str, poll_s: float = 2.0) -> None:
        """Hold ``key``'s lock; waits (polling, saying so once) while another job holds it."""
        self._key_lock(key).acquire(
            poll_s=poll_s,
            on_wait=lambda h: self.log(
                f"stage cache: key {key[:12]} is being computed by {h.describe() if h else 'another job'}; "
                "waiting for it"
            ),
        )

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # --- reading --------------------------------------------------------------------------------
    def record(self, key: str) -> Optional[dict]:
        """The entry's record, every file verified by sha256; None when absent. A corrupt entry
        raises CorruptEntry naming the file."""
        folder = self.entry(key)
        if not folder.is_dir():
            return None
        try:
            record = json.loads((folder / ENTRY).read_text())
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CorruptEntry(f"{folder / ENTRY} is missing or unreadable") from None
        for rel, sha in files.items():
            path = folder / "files" / rel
            if not path.is_file():
                raise CorruptEntry(f"{path} is missing")
            if sha256_file(path) != sha:
                raise CorruptEntry(f"{path} is not the file published (sha256 differs)")
        return record

    def peek(self, key: str) -> Optional[dict]:
        """``record`` without the key's lock and without removing anything: None when the entry
        is absent or corrupt (a stage job reports and removes a corrupt entry under the lock).
        An entry that exists is complete: ``publish`` renames it into place. For the launcher,
        which must never wait for a job that is computing the key."""
        try:
            return self.record(key)
        except CorruptEntry:
            return None

    def lookup(self, key: str) -> Optional[dict]:
        """``record``, with a corrupt entry reported in one line and removed (then None)."""
        try:
            return self.record(key)
        except CorruptEntry as exc:
            self.log(f"stage cache: entry {key[:12]} is corrupt ({exc}); removed, computing the stage again")
            self._remove(self.entry(key))
            return None

    def restore(self, key: str, record: dict, folder: Path) -> None:
        """Put the entry's files in ``folder`` (link, else copy), each verified by sha256."""
        for rel, sha in record["files"].items():
            dst = folder / rel
            _link_or_copy(self.entry(key) / "files" / rel, dst)
            if sha256_file(dst) != sha:
                raise CorruptEntry(f"{dst} differs from the cache entry {key[:12]} after restoring it")

    # --- writing --------------------------------------------------------------------------------
    def publish(self, key: str, stage: str, folder: Path, summary: dict, producer: str, code: str) -> bool:
        """Copy ``folder``'s result files into a new entry, atomically; False when one exists."""
        final = self.entry(key)
        if final.is_dir():
            return False
        tmp = self.root / f".tmp-{key}.{os.getpid()}"
        self._remove(tmp)
        try:
            tmp.mkdir(parents=True)
            files = {}
            for rel in _cached_files(folder):
                dst = tmp / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / rel, dst)
                files[str(rel)] = sha256_file(dst)
                if sha256_file(folder / rel) != files[str(rel)]:
                    raise OSError(f"copy of {folder / rel} differs from its source")
            record = {
                "key": key,
                "stage": stage,
                "files": files,
                "summary": summary,
                "producer": producer,
                "code": code,
                "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_text(tmp / ENTRY, json.dumps(record, indent=1) + "\n")
            os.rename(tmp, final)
            return True
        except OSError as exc:
            self._remove(tmp)
            if final.is_dir():
                return False
            self.log(f"stage cache: could not publish {stage} under {final} ({exc}); the run is unaffected")
            return False

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def rebase_summary(summary: dict[str, Any], producer_folder: str, folder: Path) -> dict[str, Any]:
    """A producer's DONE summary for the consumer: paths into the producer's stage folder point
    into ``folder`` instead."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, str) and producer_folder and v.startswith(producer_folder):
            v = str(folder) + v[len(producer_folder) :]
        out[k] = v
    return out


class CachedStage:
    """Rank 0's use of the cache for one stage attempt: ``reuse`` (a hit restores the files and
    returns the DONE summary; a miss keeps the key's lock, so a racing job waits for this one's
    result), then ``publish`` after the stage finished, and ``release`` in any case."""

    def __init__(self, cache: StageCache, key: str, stage: str, folder: Path) -> None:
        self.cache, self.key, self.stage, self.folder = cache, key, stage, Path(folder)

    def attempt(self) -> tuple[str, Optional[dict]]:
        """One try, never waiting: ``("hit", summary)`` (the entry's files restored, the lock
        released), ``("miss", None)`` (this job computes; the key's lock is kept until
        publish/release) or ``("busy", None)`` (another live job holds the key: try again later).

        The waiting is the caller's: the engine polls with every rank together (one short
        collective per try), so no rank sits in a collective while another job computes."""
        t0 = time.time()
        if not self.cache.try_acquire(self.key):
            return "busy", None
        record = self.cache.lookup(self.key)
        if record is None:
            return "miss", None  # computing: the lock is kept until publish/release
        summary = self.restore(record, t0)
        if summary is None:
            return "miss", None  # the corrupt entry is removed; this job computes (lock kept)
        self.cache.release()
        self.cache.log(f"reused from {self.key} (computed in {record.get('producer')}); no training")
        return "hit", summary

    def restore(self, record: dict, t0: float, remove_corrupt: bool = True) -> Optional[dict]:
        """Put the entry ``record`` describes in the stage folder; the DONE summary, or None when
        it could not be restored (the restored files removed again, and with ``remove_corrupt``,
        which needs the key's lock, the entry too)."""
        try:
            self.cache.restore(self.key, record, self.folder)
        except (OSError, CorruptEntry) as exc:
            self.cache.log(f"stage cache: entry {self.key[:12]} could not be restored ({exc}); computing the stage")
            for rel in record["files"]:
                (self.folder / rel).unlink(missing_ok=True)
            if remove_corrupt:
                self.cache._remove(self.cache.entry(self.key))
            return None
        summary = rebase_summary(dict(record.get("summary") or {}), str(record.get("producer") or ""), self.folder)
        summary["computed_wall_seconds"] = summary.get("computed_wall_seconds", summary.get("wall_seconds"))
        summary["wall_seconds"] = round(time.time() - t0, 2)
        summary["reused_from"] = self.key
        summary["reused_producer"] = record.get("producer")
        return summary

    def reuse(self, poll_s: float = 2.0) -> Optional[dict]:
        """``attempt`` until it is not busy (one process: waits here); the summary on a hit."""
        said = False
        while True:
            outcome, summary = self.attempt()
            if outcome != "busy":
                return summary
            if not said:
                holder = self.cache.holder(self.key)
                self.cache.log(f"stage cache: key {self.key[:12]} is being computed by {holder}; waiting for it")
                said = True
            time.sleep(poll_s)

    def publish(self, summary: dict, code: str) -> None:
        if self.cache.publish(self.key, self.stage, self.folder, summary, str(self.folder), code):
            self.cache.log(f"published to the stage cache as {self.key}")

    def release(self) -> None:
        self.cache.release()


def open_cached_stage(run_dir: Path | str, stage: str, key: str) -> Optional[CachedStage]:
    """Rank 0's cache handle for ``stage`` of ``run_dir`` under ``key``; None without a cache."""
    cache = cache_for_run(run_dir, stage, log=lambda m: print(f"[{stage}] {m}", flush=True))
    return None if cache is None else CachedStage(cache, key, stage, Path(run_dir) / stage)
