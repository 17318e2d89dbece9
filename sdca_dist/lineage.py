"""Stage lineage, like a build system: a stage is DONE only for the settings and inputs it ran with.

Each stage records, in ``<stage>/LINEAGE.json`` when it starts and again in its ``DONE`` file
when it ends: the hash of the run's settings and the sha256 of every file it reads (outputs of
earlier stages, shard manifests, every shard tar, weights files). ``DONE`` also records the
settings themselves and the sha256 of the files the stage leaves for later stages. Then:

* an input passed between stages is verified against the producer's record before use (a
  corrupt or replaced file: one line naming it, exit 2), and so are the settings the producer
  ran with (other settings than the run's: one line naming the stage and the keys, exit 2);
* every shard tar a stage reads (the data sets and the pseudo-label shards) is checked when the
  stage starts against the sha256 its manifest records, with its DALI index and sidecar: a
  damaged or replaced tar is refused, naming it, so no stage trains on bytes other than the ones
  packed (and a run never counts as done from them). A tar's sha256 comes from its verification
  record while its file is unchanged (``sdca_dist.data.verification``: inode, size, mtime,
  ctime); tars without one are hashed by all ranks in parallel before rank 0 checks
  (``Lineage.known``), and the launcher hashes only tars that changed since their record; the
  status view reads no tar at all (``read_tars=False``);
* a stage whose recorded inputs no longer match is stale: the launcher reruns it, and the
  engine discards its checkpoints (they belong to other inputs) before starting again;
* redoing a stage makes every stage after it stale (their inputs change), and so does a stage
  that is stale, missing or redone: freshness is derived through the lineage (``Lineage.fresh``).

A per-stage lock (``<stage>/.lock``, ``sdca_dist.locks``: a lock file, no ``flock``) keeps two jobs
out of one stage folder on any shared file system; a lock left by a killed job is taken over once
its holder is judged gone (see that module).

No torch here: the launcher plans with it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from sdca_dist.files import atomic_write_text, read_json_dict, sha256_file
from sdca_dist.run_folder import DONE, LINEAGE, LOCK
from sdca_dist.stage_table import StageInput, inputs_of, spec, weights_read


class MissingInputError(FileNotFoundError):
    """A stage's input from an earlier stage is absent or unfinished; the message names the file."""


class StageInputError(ValueError):
    """A stage's input exists but cannot be used (corrupt, replaced); the message names the file."""


class StageOutputError(ValueError):
    """A stage's output cannot be handed on (e.g. weights that are not finite); no DONE is written."""


class RunFolderBusy(RuntimeError):
    """Another live job holds the stage's lock."""


def write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


@dataclass(frozen=True)
class External:
    """An input that no stage of the run produces: a shard manifest, a weights file."""

    key: str  # e.g. "shards:source" or "weights:model.pretrained"
    path: Path


def external_inputs(cfg: Any, stage: str) -> list[External]:
    """The shard manifests and weights files ``stage`` reads (hashed into its lineage)."""
    from sdca_dist.data.sets import manifest_path, shard_set

    out = [
        External(f"shards:{key}", manifest_path(shard_set(cfg, getattr(cfg.data, key))))
        for key in spec(stage).shard_sets
    ]
    out += [External(f"weights:{key}", Path(path)) for key, path in weights_read(stage, cfg)]
    return out


def stage_inputs(cfg: Any, stage: str) -> tuple[StageInput, ...]:
    return inputs_of(stage, cfg)


def settings_record(cfg: Any) -> dict[str, Any]:
    """The settings a DONE record keeps (flat ``key: value``), so a consumer can name differences."""
    from sdca_dist.config.run_config import flat_settings

    return flat_settings(cfg)


def producer_mismatch(cfg: Any, done: dict) -> Optional[list[str]]:
    """Whether a DONE record holds for the run's settings ``cfg``: None when it does, else the
    differing keys (``key: recorded -> run``; ``[]`` when the record names none, or lacks its
    stage settings key and so cannot hold).

    The ONE comparison of a stage's record with the run's settings: the engine (a consumer's
    inputs, before a stage starts) and the launcher (freshness) both ask it. The record's stage
    settings key (``sdca_dist.stage_keys``) covers the settings that stage reads, so a setting only
    later stages read (``method.tau`` for src) leaves it valid."""
    from sdca_dist.stage_keys import reads_of, settings_key

    lineage = done.get("lineage") if isinstance(done, dict) else None
    stage = done.get("stage") if isinstance(done, dict) else None
    if not isinstance(lineage, dict) or "stage_settings" not in lineage or stage is None:
        return []
    if lineage["stage_settings"] == settings_key(cfg, stage):
        return None
    reads = reads_of(stage)
    recorded = done.get("settings")
    if not isinstance(recorded, dict):
        return []
    now = settings_record(cfg)
    return [
        f"{k}: {recorded.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
        for k in sorted(set(recorded) | set(now))
        if any(k == r or k.startswith(r + ".") for r in reads) and recorded.get(k) != now.get(k)
    ]


def _is_manifest(rel: str) -> bool:
    return rel.endswith("manifest.json")


class Lineage:
    """The lineage records of one run folder."""

    def __init__(self, root: Path | str, read_tars: bool = True, max_age_days: Optional[float] = None) -> None:
        """``read_tars=False`` (the status view): a shard tar's sha256 comes from its
        verification record only, and a tar without a valid one counts as changed. Otherwise a
        tar without a valid record (or one older than ``max_age_days``: a stage start's
        periodic full check) is hashed and recorded."""
        self.root = Path(root)
        self.read_tars = read_tars
        self.max_age_days = max_age_days
        self._hashes: dict[Path, str] = {}
        #: {tar path: {"sha256", **stat}} hashed by the ranks of this stage (``verify_share``)
        self.known: dict[str, dict] = {}

    def _sha(self, path: Path) -> str:
        """sha256 of ``path``, once per Lineage (the launcher checks a model for every consumer)."""
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path)
        return self._hashes[path]

    def _tar_sha(self, tar: Path) -> str:
        """sha256 of a shard tar: hashed by a rank of this stage, else from its verification
        record, else (``read_tars``) hashed and recorded; ``Unverified`` when it may not read."""
        from sdca_dist.data.verification import FileState, Unverified, recorded_sha, same_file, verified_sha

        seen = self.known.get(str(tar))
        if seen is not None:
            try:
                if same_file(seen, FileState.of(tar)):
                    return seen["sha256"]
            except OSError:
                raise Unverified(tar) from None
        if not self.read_tars:
            return recorded_sha(tar)
        return verified_sha(tar, max_age_days=self.max_age_days)

    def shard_tars(self, cfg: Any, stage: str) -> list[tuple[Path, int]]:
        """(tar path, manifest size) of every shard tar ``stage`` reads (its data sets and the
        shard sets earlier stages wrote for it); manifests that are missing or unreadable are
        left out (the stage's own checks name them)."""
        from sdca_dist.data.errors import DataError
        from sdca_dist.data.shard_set import load_manifest

        manifests = [self.root / i.rel for i in stage_inputs(cfg, stage) if _is_manifest(i.file)]
        manifests += [e.path for e in external_inputs(cfg, stage) if e.key.startswith("shards:")]
        out = []
        for path in manifests:
            try:
                m = load_manifest(path)
            except DataError:
                continue
            out += [(m.folder / s["name"], int(s["bytes"])) for s in m.shards]
        return out

    def folder(self, stage: str) -> Path:
        return self.root / stage

    def done_record(self, stage: str) -> Optional[dict]:
        return read_json_dict(self.folder(stage) / DONE)

    # --- what a stage reads ---------------------------------------------------------------------
    def verified_inputs(self, cfg: Any, stage: str) -> dict[str, str]:
        """sha256 of every input of ``stage``, each stage input checked against its producer's
        DONE record. Raises MissingInputError / StageInputError naming the file."""
        hashes: dict[str, str] = {}
        for inp in stage_inputs(cfg, stage):
            path = self.root / inp.rel
            done = self.done_record(inp.producer)
            if not path.exists():
                raise MissingInputError(
                    f"stage {stage!r} needs {path}, which does not exist (run stage {inp.producer} first)"
                )
            if done is None:
                raise MissingInputError(
                    f"stage {stage!r} needs {path}, but stage {inp.producer} has not finished "
                    f"(no {self.folder(inp.producer) / DONE}); run stage {inp.producer} first"
                )
            differ = producer_mismatch(cfg, done)
            if differ is not None:
                keys = "; ".join(differ) if differ else "its DONE records another settings hash"
                raise StageInputError(
                    f"stage {stage!r} needs {path}, but stage {inp.producer} was done with other settings "
                    f"than this run's ({keys}); run stage {inp.producer} again (launcher: redo=[{inp.producer}])"
                )
            actual = sha256_file(path)
            recorded = (done.get("outputs") or {}).get(inp.file)
            if recorded is not None and recorded != actual:
                raise StageInputError(
                    f"{path} is not the file stage {inp.producer} wrote (sha256 differs from its "
                    f"DONE record): corrupt or replaced; run stage {inp.producer} again "
                    f"(launcher: redo=[{inp.producer}])"
                )
            hashes[inp.rel] = actual
            if _is_manifest(inp.file):
                hint = f"run stage {inp.producer} again (launcher: redo=[{inp.producer}])"
                hashes.update(self.verified_shards(stage, inp.rel, path, hint))
        for ext in external_inputs(cfg, stage):
            if not ext.path.is_file():
                raise MissingInputError(f"stage {stage!r} needs {ext.path} ({ext.key}), which does not exist")
            hashes[ext.key] = sha256_file(ext.path)
            if ext.key.startswith("shards:"):
                hint = "rebuild the damaged shards (python -m sdca_dist.shard ... --repair)"
                hashes.update(self.verified_shards(stage, ext.key, ext.path, hint))
        return hashes

    def verified_shards(self, stage: str, key: str, manifest: Path, hint: str) -> dict[str, str]:
        """``{key/tar name: sha256}`` of every shard of ``manifest``, each checked against the
        manifest's record (size, sha256, DALI index, sidecar). Raises StageInputError naming the
        first damaged tar."""
        from sdca_dist.data.errors import DataError
        from sdca_dist.data.packing import damaged_shards
        from sdca_dist.data.shard_set import load_manifest

        try:
            m = load_manifest(manifest)
        except DataError as exc:
            raise StageInputError(f"stage {stage!r}: {exc}") from None
        bad = damaged_shards(m, sha=self._tar_sha)
        if bad:
            first = bad[min(bad)]
            more = f" (and {len(bad) - 1} more shard(s))" if len(bad) > 1 else ""
            raise StageInputError(
                f"stage {stage!r} refuses {first}{more}: the shard is not the one its manifest {manifest} "
                f"records (corrupt or replaced); {hint}"
            )
        return {f"{key}/{s['name']}": s["sha256"] for s in m.shards}

    def current(self, cfg: Any, stage: str) -> dict:
        from sdca_dist.config.run_config import settings_hash
        from sdca_dist.stage_keys import settings_key

        return {
            "settings": settings_hash(cfg),
            "stage_settings": settings_key(cfg, stage),
            "inputs": self.verified_inputs(cfg, stage),
        }

    # --- a stage's own records ------------------------------------------------------------------
    def begin(self, stage: str, lineage: dict, log=print) -> bool:
        """Record the lineage this attempt runs with. A folder left by an attempt with another
        lineage (other settings or inputs) is emptied first: its checkpoints must not be resumed.
        Returns True when earlier work was discarded."""
        folder = self.folder(stage)
        folder.mkdir(parents=True, exist_ok=True)
        previous = read_json_dict(folder / LINEAGE)
        stale = previous != lineage and any(p.name not in (LOCK, LINEAGE) for p in folder.iterdir())
        if stale:
            log(f"{folder} holds work from other settings or inputs; discarding it")
            for p in folder.iterdir():
                if p.name == LOCK:
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            (folder / DONE).unlink(missing_ok=True)  # a rerun: DONE again only when it finishes
        write_json_atomic(folder / LINEAGE, lineage)
        return stale

    def finish(self, stage: str, lineage: dict, summary: dict, settings: Optional[dict] = None) -> None:
        """DONE, last: the summary, the lineage, the settings (flat, see ``settings_record``) and
        the sha256 of every output for later stages."""
        folder = self.folder(stage)
        outputs = {name: sha256_file(folder / name) for name in spec(stage).outputs if (folder / name).is_file()}
        payload = {
            "stage": stage,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **summary,
            "lineage": lineage,
            "outputs": outputs,
        }
        if settings is not None:
            payload["settings"] = settings
        write_json_atomic(folder / DONE, payload)

    def invalidate(self, stage: str) -> None:
        """Make ``stage`` run again from scratch (``redo=[stage]``)."""
        folder = self.folder(stage)
        for name in (DONE, LINEAGE):
            (folder / name).unlink(missing_ok=True)

    # --- freshness (the launcher) ---------------------------------------------------------------
    def fresh(self, cfg: Any, stage: str, rerun: Iterable[str] = ()) -> tuple[bool, str]:
        """Whether ``stage``'s DONE still holds for these settings and inputs, and why not.

        Derived through the lineage: a stage is fresh only when its own record holds (settings,
        outputs, the inputs it read, its shards) and every stage it reads from is fresh, so a
        stage built on a stale, missing or redone stage is stale too, naming that stage (and,
        further up, the stage where the change began). The launcher and the status view both
        ask this. ``rerun``: stages that this launch runs again, whose outputs will therefore
        change."""
        ok, why, _, _ = self._fresh(cfg, stage, frozenset(rerun), {})
        return ok, why

    def _fresh(self, cfg: Any, stage: str, rerun: frozenset, memo: dict[str, tuple]) -> tuple[bool, str, str, str]:
        """(fresh, why, the stage where the staleness begins, that stage's own reason) of
        ``stage``, memoised per call."""
        if stage not in memo and self.done_record(stage) is None:
            memo[stage] = (False, "not done", stage, "not done")
        if stage not in memo:
            upstream = self._upstream(cfg, stage, rerun, memo)
            if upstream is None:
                ok, why = self._record_holds(cfg, stage, rerun)
                upstream = (ok, why, stage, why)
            memo[stage] = upstream
        return memo[stage]

    def _upstream(self, cfg: Any, stage: str, rerun: frozenset, memo: dict[str, tuple]) -> Optional[tuple]:
        """Why ``stage`` is stale because of a stage it reads from (None: they all hold)."""
        for inp in stage_inputs(cfg, stage):
            if inp.producer in rerun:
                why = f"its input stage {inp.producer} runs again"
                return False, why, inp.producer, why
        for inp in stage_inputs(cfg, stage):
            ok, _, origin, cause = self._fresh(cfg, inp.producer, rerun, memo)
            if ok:
                continue
            if origin == inp.producer and cause == "not done":
                return False, f"its input stage {inp.producer} is missing (no {inp.producer}/{DONE})", origin, cause
            through = f"through {origin}: " if origin != inp.producer else ""
            return False, f"its input stage {inp.producer} is stale ({through}{cause})", origin, cause
        return None

    def _record_holds(self, cfg: Any, stage: str, rerun: frozenset) -> tuple[bool, str]:
        """Whether ``stage``'s own DONE record holds (its settings, outputs and the files it read);
        the freshness of the stages it reads from is ``_fresh``'s part."""
        done = self.done_record(stage)
        if done is None:
            return False, "not done"
        lineage = done.get("lineage")
        if not isinstance(lineage, dict):
            return False, "DONE has no lineage record"
        differ = producer_mismatch(cfg, done)
        if differ is not None:
            return False, "done with other settings" + (f" ({'; '.join(differ)})" if differ else "")
        for name, sha in (done.get("outputs") or {}).items():
            try:
                if self._sha(self.folder(stage) / name) != sha:
                    return False, f"its output {name} is not the file it wrote (corrupt or replaced)"
            except OSError:
                return False, f"its output {name} is missing"
        recorded = lineage.get("inputs") or {}
        for inp in stage_inputs(cfg, stage):
            if inp.producer in rerun:
                return False, f"its input stage {inp.producer} runs again"
            producer = self.done_record(inp.producer)
            if producer is None:
                return False, f"its input stage {inp.producer} is missing (no {inp.producer}/{DONE})"
            if (producer.get("outputs") or {}).get(inp.file) != recorded.get(inp.rel):
                return False, f"its input stage {inp.producer} was redone since it ran ({inp.rel} changed)"
            try:
                if self._sha(self.root / inp.rel) != recorded.get(inp.rel):
                    return False, f"{inp.rel} is not the file it read (corrupt or replaced)"
            except OSError:
                return False, f"{inp.rel} is missing"
            if _is_manifest(inp.file):
                why = self._shards_changed(inp.rel, self.root / inp.rel, recorded)
                if why:
                    return False, why
        for ext in external_inputs(cfg, stage):
            try:
                if self._sha(ext.path) != recorded.get(ext.key):
                    return False, f"{ext.path} changed since it ran"
            except OSError:
                return False, f"{ext.path} is missing"
            if ext.key.startswith("shards:"):
                why = self._shards_changed(ext.key, ext.path, recorded)
                if why:
                    return False, why
        return True, "done"

    def _shards_changed(self, key: str, manifest: Path, recorded: dict) -> Optional[str]:
        """Why the shard tars of ``manifest`` are not the ones a stage read (None: the same)."""
        from sdca_dist.data.errors import DataError
        from sdca_dist.data.shard_set import load_manifest
        from sdca_dist.data.verification import Unverified

        try:
            m = load_manifest(manifest)
        except DataError as exc:
            return str(exc)
        for s in m.shards:
            tar = m.folder / s["name"]
            want = recorded.get(f"{key}/{s['name']}")
            if want is None:
                return f"it has no record of the shard {tar} (it ran before shard contents were recorded)"
            try:
                if self._tar_sha(tar) != want:
                    return f"the shard {tar} is not the one it read (corrupt or replaced)"
            except Unverified as exc:
                return f"{exc}; a launch re-hashes it"
            except OSError:
                return f"the shard {tar} is missing"
        return None


class StageLock:
    """Exclusive use of one stage folder by one job (rank 0 holds it for the stage's duration)."""

    def __init__(self, folder: Path) -> None:
        from sdca_dist.locks import FileLock

        self.path = Path(folder) / LOCK
        self._lock = FileLock(self.path, setting="run_dir")

    def acquire(self) -> None:
        if not self._lock.try_acquire():
            holder = self._lock.holder()
            raise RunFolderBusy(
                f"run folder {self.path.parent.parent} (stage {self.path.parent.name}) is in use by "
                f"{holder.describe() if holder else 'another process'}; wait for it or use another run_dir"
            )

    def release(self) -> None:
        self._lock.release()
