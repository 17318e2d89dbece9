"""Checkpoints written by all ranks together at a step boundary.

Layout under ``<stage>/checkpoints/``::

    iter_00000400/          complete checkpoint (renamed from iter_00000400.tmp/ when whole)
        common.pt           rank 0: iteration, model, replicated optimizer, estimators, ...
        rank00000.pt ...    each rank: its data-loader position, RNG states, optimizer shard
        COMPLETE.json       written last: sha256 and size of every file above

A folder without COMPLETE.json never counts. On load the newest checkpoint is verified against
its hashes and loaded with ``weights_only=True`` (no arbitrary pickle); a truncated or corrupt
one is reported and the previous one is used. The shared file system of the run folder is the
only channel: the engine assumes ``run_dir`` is visible from every node (as on any cluster).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sdca_dist.engine.distributed import DistContext, broadcast_object
from sdca_dist.files import atomic_write, atomic_write_text, sha256_file  # noqa: F401 - atomic_write_text re-exported

COMPLETE = "COMPLETE.json"


class _WriteErrors:
    """A file that remembers the OSError of a failed write: torch.save reports it only as an
    opaque ``RuntimeError: [enforce fail at inline_container.cc]``."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save to ``path`` via a temporary name + fsync + rename: never a half-written file. A
    file-system failure (no space, read-only) is an OSError naming ``path``."""

    def write(f) -> None:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise OSError(out.error.errno, out.error.strerror, str(path)) from None

    atomic_write(path, write)


def rng_state() -> dict[str, Any]:
    """RNG states of every library involved, as tensors/ints so ``weights_only`` can load them.

    CUDA: only the CURRENT device's generator (the one this rank draws from). The states of every
    visible GPU would tie the checkpoint to the device count of the first allocation; a requeued
    job may see other GPUs."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _cpu(t: Any) -> Any:
    return t.cpu() if isinstance(t, torch.Tensor) else t


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states; tensors may arrive on any device (they are read on the
    CPU: ``torch.set_rng_state`` and numpy take CPU data only). The CUDA state goes to the current
    device; a CPU-only process (or a checkpoint written without CUDA) skips it."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in _cpu(py["internal"]).tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", _cpu(npst["keys"]).numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(_cpu(state["torch"]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # one state per visible GPU: this rank's device's entry
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_cpu(cuda))


class Checkpointer:
    """Periodic all-rank checkpoints of one stage; keeps the newest ``keep``."""

    def __init__(self, folder: Path, ctx: DistContext, keep: int = 2, log=print) -> None:
        self.folder = Path(folder)
        self.ctx = ctx
        self.keep = max(1, keep)
        self.log = log

    def _name(self, iteration: int) -> str:
        return f"iter_{iteration:08d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [
            p
            for p in self.folder.iterdir()
            if p.is_dir() and p.name.startswith("iter_") and not p.name.endswith(".tmp") and (p / COMPLETE).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def save(self, iteration: int, common: dict[str, Any], per_rank: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step boundary."""
        final = self.folder / self._name(iteration)
        tmp = self.folder / (self._name(iteration) + ".tmp")
        if self.ctx.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.ctx.barrier()
        atomic_torch_save(per_rank, tmp / f"rank{self.ctx.rank:05d}.pt")
        if self.ctx.is_main:
            atomic_torch_save(common, tmp / "common.pt")
        self.ctx.barrier()
        if self.ctx.is_main:
            files = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.suffix == ".pt"
            }
            meta = {"iteration": iteration, "world_size": self.ctx.world_size, "files": files}
            atomic_write_text(tmp / COMPLETE, json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete_checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.ctx.barrier()
        return final

    def _verify(self, path: Path) -> Optional[str]:
        """None when the checkpoint is whole, else the reason it is not."""
        try:
            meta = json.loads((path / COMPLETE).read_text())
        except (OSError, ValueError) as exc:
            return f"{path / COMPLETE}: unreadable ({exc})"
        if meta.get("world_size") != self.ctx.world_size:
            return (
                f"{path}: written by {meta.get('world_size')} ranks, this run has {self.ctx.world_size}; "
                "per-rank loader/RNG state cannot be mapped"
            )
        for name, info in meta["files"].items():
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != info["bytes"]:
                return f"{f}: truncated ({f.stat().st_size} of {info['bytes']} bytes)"
            if sha256_file(f) != info["sha256"]:
                return f"{f}: sha256 mismatch (corrupt)"
        return None

    def latest_valid(self) -> Optional[Path]:
        """Rank 0 picks the newest whole checkpoint and tells the others (one decision)."""
        choice: Optional[str] = None
        if self.ctx.is_main:
            for path in reversed(self.complete_checkpoints()):
                problem = self._verify(path)
                if problem is None:
                    choice = str(path)
                    break
                self.log(f"warning: skipping checkpoint {path.name}: {problem}")
        choice = broadcast_object(choice, self.ctx)
        return Path(choice) if choice else None

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
        """(common, this rank's) states, weights-only. ``map_location`` places the model and
        optimizer tensors; the rank file's RNG and loader states always stay on the CPU, where they
        are consumed (``torch.set_rng_state`` and numpy refuse device tensors). A file the safe
        loader refuses (a crafted or foreign pickle whose hashes were forged) is a StageInputError
        naming it."""
        common = _safe_load(path / "common.pt", map_location)
        per_rank = _safe_load(path / f"rank{self.ctx.rank:05d}.pt", "cpu")
        if "optimizer" in per_rank and torch.device(map_location).type != "cpu":
            per_rank["optimizer"] = _to_device(per_rank["optimizer"], map_location)
        return common, per_rank


def _to_device(obj: Any, device: str | torch.device) -> Any:
    """``obj`` (nested dicts/lists of tensors) with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _safe_load(path: Path, map_location) -> Any:
    import pickle

    from sdca_dist.lineage import StageInputError

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split())[:160]
        raise StageInputError(
            f"checkpoint file {path} is refused by the weights-only loader (not a checkpoint this engine "
            f"wrote: crafted or foreign): {detail}; delete {path.parent} to resume from an earlier checkpoint"
        ) from None
